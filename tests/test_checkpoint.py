"""Checkpoints for elastic restarts: atomic writes, completeness, metadata checks, and torchrun resumes that
end bitwise equal to an uninterrupted run."""

import errno
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from pyparallel import checkpoint
from pyparallel.train import checkpoint_metadata, parser, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"world_size": 1, "algorithm": "pyparallel", "hook": "topk", "hook_config": {"ratio": 0.05, "warmup_steps": 0}}


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((5,), value)}, "step_value": value}


def test_save_load_round_trip_and_latest(tmp_path):
    d = str(tmp_path)
    assert checkpoint.latest(d) is None
    checkpoint.save(d, 10, 0, _state(1.0), META)
    checkpoint.save(d, 20, 0, _state(2.0), META)
    assert checkpoint.latest(d) == 20
    step, state = checkpoint.load(d, 0, META)
    assert step == 20 and torch.equal(state["model"]["w"], torch.full((5,), 2.0))
    step, state = checkpoint.load(d, 0, META, step=10)
    assert state["step_value"] == 1.0
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.load(str(tmp_path / "empty"), 0, META)


def test_keeps_only_the_newest_complete_checkpoints(tmp_path):
    d = str(tmp_path)
    for step in (1, 2, 3, 4):
        checkpoint.save(d, step, 0, _state(step), META, keep=2)
    assert sorted(os.listdir(d)) == ["step-000000003", "step-000000004"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.save(d, 5, 0, _state(5), META, keep=0)


@pytest.mark.parametrize("field, value", [("world_size", 2), ("algorithm", "torch"), ("hook", "int8"),
                                          ("hook_config", {"ratio": 0.01, "warmup_steps": 0})])
def test_metadata_mismatch_names_the_field(tmp_path, field, value):
    checkpoint.save(str(tmp_path), 7, 0, _state(1.0), META)
    with pytest.raises(checkpoint.CheckpointMismatch, match=f"{field}: checkpoint has .*this run has"):
        checkpoint.load(str(tmp_path), 0, dict(META, **{field: value}))


def test_format_version_and_missing_rank_are_clear_errors(tmp_path):
    d = str(tmp_path)
    path = checkpoint.save(d, 3, 0, _state(1.0), META)
    with pytest.raises(FileNotFoundError, match="no file for rank 1"):
        checkpoint.load(d, 1, META)
    complete = os.path.join(path, "COMPLETE")
    meta = json.load(open(complete))
    meta["format_version"] = 999
    with open(complete, "w") as f:
        json.dump(meta, f)
    with pytest.raises(checkpoint.CheckpointMismatch, match="format version 999"):
        checkpoint.load(d, 0, META)
    with pytest.raises(ValueError, match="world_size"):
        checkpoint.save(d, 4, 0, _state(1.0), {"hook": "topk"})
    with pytest.raises(ValueError, match="JSON values only"):
        checkpoint.save(d, 4, 0, _state(1.0), dict(META, device=torch.device("cpu")))


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "f.bin")
    checkpoint.atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, broken)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        n = len(memoryview(data))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # torch.save on a full disk raised "RuntimeError: [enforce fail at inline_container.cc] unexpected pos",
    # the ENOSPC only in its context.
    d = str(tmp_path)
    checkpoint.save(d, 10, 0, _state(1.0), META)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: real_save(obj, _FullDisk(f, 300), *a, **kw))
    with pytest.raises(OSError, match=r"could not write .*step-000000020/rank0\.pt: No space left on device") as exc:
        checkpoint.save(d, 20, 0, {"model": {"w": torch.zeros(10_000)}}, META)
    assert exc.value.errno == errno.ENOSPC
    assert os.listdir(os.path.join(d, "step-000000020")) == [], "the temporary file is removed"
    assert checkpoint.latest(d) == 10 and checkpoint.load(d, 0, META)[1]["step_value"] == 1.0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-checkpoint", "complete"])
def test_damaged_checkpoint_file_is_named(tmp_path, damage):
    # A truncated rank file failed in torch.load with "OSError: [Errno 22] Invalid argument", naming nothing.
    d = str(tmp_path)
    path = checkpoint.save(d, 10, 0, _state(1.0), META)
    rank0, complete = os.path.join(path, "rank0.pt"), os.path.join(path, "COMPLETE")
    if damage == "truncate":
        os.truncate(rank0, os.path.getsize(rank0) // 2)
    elif damage == "garbage":
        with open(rank0, "wb") as f:
            f.write(b"\x00not a zip file" * 10)
    elif damage == "not-a-checkpoint":
        torch.save([1, 2, 3], rank0)
    else:
        os.truncate(complete, os.path.getsize(complete) // 2)
    bad = complete if damage == "complete" else rank0
    with pytest.raises(checkpoint.CheckpointDamaged, match=f"{re.escape(bad)} is damaged .*move {re.escape(path)} aside"):
        checkpoint.load(d, 0, META)


def _die_while_writing(directory):
    """Writes checkpoint 20 but is SIGKILLed in the middle of torch.save (a real crash: no cleanup runs)."""
    import torch as t

    real_save = t.save

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)  # half of the bytes are on disk when the process dies
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    t.save = save_then_die
    checkpoint.save(directory, 20, 0, _state(2.0), META)


def test_crash_mid_write_leaves_the_previous_checkpoint_readable(tmp_path):
    d = str(tmp_path)
    checkpoint.save(d, 10, 0, _state(1.0), META)
    proc = mp.get_context("spawn").Process(target=_die_while_writing, args=(d,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert any(name.endswith(".tmp") for name in os.listdir(os.path.join(d, "step-000000020")))  # the torn file
    assert checkpoint.latest(d) == 10
    step, state = checkpoint.load(d, 0, META)
    assert step == 10 and state["step_value"] == 1.0
    checkpoint.save(d, 20, 0, _state(2.0), META)  # the next incarnation writes it again, stale temp file gone
    assert checkpoint.latest(d) == 20
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.join(d, "step-000000020")))


def test_incomplete_checkpoint_of_a_dead_rank_is_skipped(tmp_path):
    # World size 2: rank 0 wrote its file of step 20, rank 1 died before writing: no COMPLETE marker.
    d = str(tmp_path)
    meta = dict(META, world_size=2)
    os.makedirs(os.path.join(d, "step-000000010"))
    for rank in (0, 1):
        blob = {"metadata": dict(meta, format_version=checkpoint.FORMAT_VERSION, step=10), "state": _state(rank)}
        torch.save(blob, os.path.join(d, "step-000000010", f"rank{rank}.pt"))
    with open(os.path.join(d, "step-000000010", "COMPLETE"), "w") as f:
        json.dump(dict(meta, format_version=checkpoint.FORMAT_VERSION, step=10), f)
    os.makedirs(os.path.join(d, "step-000000020"))
    torch.save({"metadata": {}, "state": _state(9)}, os.path.join(d, "step-000000020", "rank0.pt"))
    assert checkpoint.latest(d) == 10
    assert checkpoint.load(d, 1, meta)[1]["step_value"] == 1
    with pytest.raises(FileNotFoundError, match="not complete"):
        checkpoint.load(d, 0, meta, step=20)


# ---- elastic restarts under torchrun ----

_COMMON = ["--epochs", "2", "--hidden", "64", "--transport", "ring", "--threads", "1", "--seed", "5", "--no-progress"]


def _uninterrupted(argv):
    args = parser().parse_args(argv)
    result = run(args)
    return result["parameter_digest"], result["steps"]


def _torchrun_killed_and_resumed(tmp, argv, kill_step=12):
    out = os.path.join(tmp, "out.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "2", "--monitor-interval", "0.2", "-m", "pyparallel.train", *argv,
           "--checkpoint-dir", os.path.join(tmp, "ckpt"), "--checkpoint-every", "5",
           "--kill-at-step", str(kill_step), "--kill-rank", "1", "--json", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "exitcode: -9" in proc.stderr, "rank 1 was not killed: " + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("config", [["--ddp", "pyparallel", "--hook", "int8"],
                                    ["--ddp", "torch", "--hook", "allreduce"]],
                         ids=["pyparallel-int8", "torch-ddp-allreduce"])
def test_torchrun_restart_resumes_bitwise_equal(dist_pool, config):
    # Rank 1 is SIGKILLed in step 12 (checkpoints every 5 steps): torchrun restarts both ranks, they resume
    # from step 10 and must end with exactly the parameters of an uninterrupted run. torch DDP runs the
    # exact hook at world size 2, whose sums do not depend on where DDP puts a gradient in its bucket
    # (a fresh DDP's first bucket layout differs from the rebuilt one; issue 14 point 3).
    argv = _COMMON + config
    straight = dist_pool(2).run(_uninterrupted, argv, timeout=120)
    assert straight[0] == straight[1]
    with tempfile.TemporaryDirectory() as tmp:
        resumed = _torchrun_killed_and_resumed(tmp, argv)
        assert checkpoint.latest(os.path.join(tmp, "ckpt")) == 40
    assert resumed["steps"] == straight[0][1] == 44
    assert resumed["resumed_from_step"] == 10  # not a rerun from scratch (which would end equal too)
    assert resumed["parameter_digest"] == straight[0][0]


def test_resume_with_another_world_size_is_refused(dist_pool, tmp_path):
    argv = _COMMON + ["--max-steps", "3", "--checkpoint-every", "3", "--checkpoint-dir", str(tmp_path)]
    dist_pool(2).run(_uninterrupted, argv, timeout=120)
    assert checkpoint.latest(str(tmp_path)) == 3
    args = parser().parse_args(argv)
    with pytest.raises(checkpoint.CheckpointMismatch, match="world_size: checkpoint has 2, this run has 1"):
        checkpoint.load(str(tmp_path), 0, checkpoint_metadata(args, 1))
    with pytest.raises(checkpoint.CheckpointMismatch, match="hook: checkpoint has 'int8', this run has 'topk'"):
        checkpoint.load(str(tmp_path), 0, checkpoint_metadata(parser().parse_args(argv + ["--hook", "topk"]), 2))


# ---- resuming through pyparallel.train: every rank fails together, with a clear error ----

def _train_error(overrides):
    """pyparallel.train.run in a pool worker (ring transport, one thread): None, or its error as text."""
    args = parser().parse_args(["--transport", "ring", "--no-progress", "--threads", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def test_resume_with_one_ranks_file_damaged_or_missing_fails_on_every_rank(dist_pool, tmp_path):
    # Rank 1 raised alone while rank 0 trained on into its first all-reduce and waited there (the group's
    # timeout, 30 s in the pool); now both raise at once, rank 0 naming rank 1's error.
    pool, d = dist_pool(2), str(tmp_path / "ckpt")
    opts = dict(hidden=8, epochs=1, max_steps=4, checkpoint_every=2, checkpoint_dir=d)
    assert pool.run(_train_error, opts, timeout=60) == [None, None]
    rank1 = os.path.join(d, "step-000000004", "rank1.pt")
    os.truncate(rank1, os.path.getsize(rank1) // 2)
    for damaged in (True, False):
        errors = pool.run(_train_error, dict(opts, max_steps=6), timeout=25)
        expect = f"CheckpointDamaged: checkpoint: {rank1} is damaged" if damaged else "has no file for rank 1"
        assert expect in errors[1], errors
        assert "rank 1 rejected it" in errors[0] and expect in errors[0], errors
        if damaged:
            os.remove(rank1)


def test_resume_with_nothing_left_to_train_or_another_lr_is_refused(dist_pool, tmp_path, capsys):
    from pyparallel.train import check_run, main

    pool, d = dist_pool(2), str(tmp_path / "ckpt")
    opts = dict(hidden=8, epochs=1, checkpoint_dir=d)
    assert pool.run(_train_error, opts, timeout=60) == [None, None]  # 22 steps, checkpointed at the end
    # The same command again (torchrun restarting a job that died after its last checkpoint) returned no
    # evaluation, and the summary crashed on it (TypeError).
    for msg in pool.run(_train_error, opts, timeout=60):
        assert msg is not None and "--checkpoint-dir: the checkpoint is at step 22 (epoch 1 of 1): nothing left" in msg
    # --max-steps at or below the checkpoint's step trained one step more.
    for msg in pool.run(_train_error, dict(opts, epochs=2, max_steps=22), timeout=60):
        assert msg is not None and "the checkpoint is at step 22, --max-steps is 22: nothing left to train" in msg
    # Another --lr was ignored: the optimizer's state_dict brought back the checkpoint's.
    for msg in pool.run(_train_error, dict(opts, epochs=2, lr=0.01), timeout=60):
        assert msg is not None and "lr: checkpoint has 0.05, this run has 0.01" in msg, msg
    with pytest.raises(SystemExit):  # the --nproc launcher checks before it starts any rank
        main(["--nproc", "2", "--epochs", "1", "--hidden", "8", "--checkpoint-dir", d, "--no-progress"])
    assert "--checkpoint-dir: the checkpoint is at step 22 (epoch 1 of 1): nothing left" in capsys.readouterr().err
    # torch's PowerSGD state cannot be saved: refused before training, not after the first epoch.
    args = parser().parse_args(["--hook", "torch-powersgd", "--ddp", "torch", "--checkpoint", d])
    with pytest.raises(ValueError, match="--hook torch-powersgd cannot be checkpointed"):
        check_run(args, 2)


def test_unwritable_output_directories_fail_before_training(dist_pool, tmp_path):
    # Found at the first save (after K steps or a whole epoch) or, for --json, by rank 0 after training.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    opts = dict(hidden=8, epochs=1, max_steps=2, checkpoint_every=2, checkpoint_dir=str(blocker / "ckpt"))
    for msg in dist_pool(2).run(_train_error, opts, timeout=60):
        assert msg is not None and f"checkpoint directory {blocker / 'ckpt'} is not writable" in msg, msg
    out = tmp_path / "missing" / "out.json"
    errors = dist_pool(2).run(_train_error, dict(hidden=8, epochs=1, max_steps=2, json=str(out)), timeout=60)
    assert f"--json: directory {out.parent} is not writable: No such file or directory" in errors[0], errors
    assert "rank 0 rejected it" in errors[1], errors
