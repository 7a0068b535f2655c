"""Bad inputs and faults a careless or hostile user produces (issue 14, point 4): each finding of the probe
has a test here that failed before its fix. Multi-rank cases run in the shared Gloo worker pools."""

import datetime
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pyparallel
from pyparallel import hooks
from pyparallel import train as train_cli
from pyparallel.grad_bucket import Bucket
from pyparallel.pipeline import DistributedPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- worker-side cases (module level: pickled by reference) ----

def _topk_zero_and_empty():
    """Topk(k=0) and top-k of an empty tensor at world size >= 2; a failing call leaves the residual alone."""
    rank = dist.get_rank()
    out = {}
    x = torch.randn(100) + rank
    residual = torch.randn(100)
    before = residual.clone()
    t = x.clone()
    pyparallel.all_reduce(t, compression=pyparallel.Topk(k=0, residual=residual), transport="ring")
    out["k0_result_zero"] = not bool(t.any())
    out["k0_residual_kept_x"] = torch.equal(residual, before + x)
    for k in (0, None):  # explicit k=0, and a ratio that gives k=0 for numel 0
        empty, r_empty = torch.empty(0), torch.empty(0)
        pyparallel.all_reduce(empty, compression=pyparallel.Topk(k=k, residual=r_empty), transport="ring")
        out[f"empty_k{k}"] = empty.numel() == 0 and r_empty.numel() == 0
    # Ranks that disagree on k: every rank raises, and no residual was touched.
    residual = torch.randn(100)
    before = residual.clone()
    t = x.clone()
    try:
        pyparallel.all_reduce(t, compression=pyparallel.Topk(k=rank, residual=residual), transport="ring")
        out["mismatch"] = None
    except RuntimeError as e:
        out["mismatch"] = str(e).splitlines()[0]
    out["mismatch_residual_untouched"] = torch.equal(residual, before) and torch.equal(t, x)
    # A residual of the wrong dtype on every rank: the same, before anything is modified.
    bad = torch.randn(100, dtype=torch.float64)
    bad_before = bad.clone()
    try:
        pyparallel.all_reduce(x.clone(), compression=pyparallel.Topk(k=5, residual=bad), transport="ring")
        out["bad_residual"] = None
    except (RuntimeError, ValueError) as e:
        out["bad_residual"] = str(e).splitlines()[0]
    out["bad_residual_untouched"] = torch.equal(bad, bad_before)
    ok = torch.ones(10)  # the group is still usable
    pyparallel.all_reduce(ok, transport="ring")
    out["usable_after"] = bool((ok == dist.get_world_size()).all())
    return out


class _Net(nn.Module):
    def __init__(self, width=4, dtype=torch.float32, extra=False):
        super().__init__()
        self.fc1 = nn.Linear(8, width).to(dtype)
        self.fc2 = nn.Linear(width, 2).to(dtype)
        self.register_buffer("running", torch.zeros(3))
        if extra:
            self.fc3 = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _data_parallel_mismatch(kind):
    rank = dist.get_rank()
    torch.manual_seed(0)
    if kind == "shape":
        net = _Net(width=4 if rank == 0 else 5)
    elif kind == "dtype":
        net = _Net(dtype=torch.float32 if rank == 0 else torch.float64)
    elif kind == "count":
        net = _Net(extra=rank == 1)
    else:
        net = _Net()
    try:
        pyparallel.DataParallel(net)
    except ValueError as e:
        return str(e)
    return None


def _pipeline_balance_mismatch(balances):
    rank = dist.get_rank()
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    try:
        DistributedPipeline(layers, F.cross_entropy, balance=balances[rank], n_microbatches=2)
    except ValueError as e:
        return str(e)
    return None


def _pipeline_balance_agreed():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    pipe = DistributedPipeline(layers, F.cross_entropy, balance=[2, 1], n_microbatches=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    loss = pipe.step(x if pipe.grid.is_first else None, y if pipe.grid.is_last else None)
    return None if loss is None else float(loss)


def _topk_hook_nonfinite(transport):
    """Step 2 has NaN and Inf gradients on rank 1 only, more of them than k. Every rank must see a
    non-finite result (so every rank's GradScaler skips the step) and count it; rank 1's residual stays as
    it was (it continues exactly like a run without the bad step); no residual holds a NaN or Inf
    afterwards. With 4 ranks on 2 emulated hosts (hierarchical), rank 1's NaNs are summed into the region
    rank 0 owns, so rank 0's residual must drop them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    param = torch.zeros(1000)
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(1000, generator=g) for _ in range(world)] for _ in range(3)]
    poisoned = grads[1][rank].clone()
    if rank == 1:  # 200 non-finite entries, k = 50: not all of them can be sent
        poisoned[::5] = float("nan")
        poisoned[1::50] = float("inf")

    def step(state, grad):
        return hooks.topk_hook(state, Bucket(0, grad.clone(), [param], is_last=True)).wait().clone()

    group = None
    if transport == "hierarchical":
        os.environ["PYPARALLEL_HOST"] = f"host{rank * 2 // world}"
        group = dist.new_group(list(range(world)))
        os.environ.pop("PYPARALLEL_HOST")
    state = hooks.TopkState(group, ratio=0.05, transport=transport)
    skipped = hooks.TopkState(group, ratio=0.05, transport=transport)  # the same run without the bad step
    step(state, grads[0][rank])
    step(skipped, grads[0][rank])
    residual_before = state.residual_of(param).clone()
    bad = step(state, poisoned)
    out = {
        "bad_result_nonfinite": not bool(torch.isfinite(bad).all()),
        "residual_kept": torch.equal(state.residual_of(param), residual_before),
        "residual_finite_after_bad": bool(torch.isfinite(state.residual_of(param)).all()),
        "nonfinite_buckets": state.nonfinite_buckets,
    }
    good = step(state, grads[2][rank])
    step(skipped, grads[2][rank])
    out["next_result_finite"] = bool(torch.isfinite(good).all())
    out["continues_as_if_skipped"] = torch.equal(state.residual_of(param), skipped.residual_of(param))
    out["residual_finite"] = bool(torch.isfinite(state.residual_of(param)).all())
    out["residual_nonzero"] = bool(state.residual_of(param).any())  # error feedback is really at work
    if group is not None:
        pyparallel.release(group)
        dist.destroy_process_group(group)
    return out


def _all_reduce_non_member():
    rank = dist.get_rank()
    g = dist.new_group([0])
    t = torch.ones(10)
    out = {}
    for async_op in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = pyparallel.all_reduce(t, group=g, async_op=async_op)
            torch_got = dist.all_reduce(torch.ones(10), group=g, async_op=async_op)
        out[async_op] = {
            "returned": None if got is None else type(got).__name__,
            "torch_returned": None if torch_got is None else type(torch_got).__name__,
            "warned": sorted({str(w.message) for w in caught}),
            "tensor": t.tolist() == [1.0] * 10,
        }
        if rank == 0 and async_op:
            got.wait()
    if rank == 0:
        pyparallel.release(g)
    return out


def _topk_residual_requires_grad():
    t = torch.ones(10)
    residual = torch.zeros(10, requires_grad=True)
    try:
        pyparallel.all_reduce(t, compression=pyparallel.Topk(k=2, residual=residual), transport="ring")
        message = None
    except ValueError as e:
        message = str(e)
    return {"message": message, "untouched": t.tolist() == [1.0] * 10 and not bool(residual.detach().any())}


def _train_resume_past_the_end(directory, save):
    args = train_cli.parser().parse_args(["--transport", "ring", "--epochs", "1", "--no-progress", "--hidden", "8",
                                          "--checkpoint" if save else "--resume", directory])
    try:
        train_cli.run(args)
    except ValueError as e:
        return str(e)
    return None


# ---- tests ----

def test_topk_k0_and_empty_tensor_at_world_size_2(dist_pool):
    for out in dist_pool(2).run(_topk_zero_and_empty):
        assert out["k0_result_zero"] and out["k0_residual_kept_x"], out
        assert out["empty_k0"] and out["empty_kNone"], out
        assert out["mismatch"] is not None and "ranks disagree" in out["mismatch"], out
        assert out["mismatch_residual_untouched"], out
        assert out["bad_residual"] is not None and "residual" in out["bad_residual"], out
        assert out["bad_residual_untouched"] and out["usable_after"], out


@pytest.mark.parametrize("kind,expect", [
    ("shape", ["fc1.weight", "[4, 8]", "[5, 8]", "rank 0", "rank 1"]),
    ("dtype", ["fc1.weight", "torch.float32", "torch.float64", "rank 1"]),
    ("count", ["rank 0 has 4", "rank 1 has 6", "fc3.weight"]),
])
def test_data_parallel_parameter_mismatch_raises_on_every_rank(dist_pool, kind, expect):
    messages = dist_pool(2).run(_data_parallel_mismatch, kind, timeout=60)
    for msg in messages:
        assert msg is not None, "a rank accepted a model that differs across ranks"
        for piece in expect:
            assert piece in msg, (piece, msg)
    assert messages[0] == messages[1], "every rank raises the same error"
    assert dist_pool(2).run(_data_parallel_mismatch, "same") == [None, None]


def test_pipeline_balance_mismatch_raises_on_every_rank(dist_pool):
    messages = dist_pool(2).run(_pipeline_balance_mismatch, [[2, 3], [3, 2]], timeout=60)
    for msg in messages:
        assert msg is not None and "ranks disagree" in msg and "[2, 3]" in msg and "[3, 2]" in msg, msg
    assert messages[0] == messages[1]
    # A balance only one rank rejects: that rank raises its own error, the other names it.
    messages = dist_pool(2).run(_pipeline_balance_mismatch, [[2, 3], [3, 3]], timeout=60)
    assert "rank 1 rejected it: ValueError: balance [3, 3] covers 6 layers but the model has 5" in messages[0]
    assert messages[1] == "balance [3, 3] covers 6 layers but the model has 5"
    losses = dist_pool(2).run(_pipeline_balance_agreed, timeout=60)  # agreeing ranks still train
    assert losses[0] is None and losses[1] is not None


@pytest.mark.parametrize("transport,world_size", [("ring", 2), ("hierarchical", 4)])
def test_topk_hook_nonfinite_gradients_do_not_enter_the_residual(dist_pool, transport, world_size):
    results = dist_pool(world_size).run(_topk_hook_nonfinite, transport, timeout=60)
    for rank, out in enumerate(results):
        assert out["bad_result_nonfinite"], "every rank must see the non-finite step (GradScaler skips it)"
        assert out["nonfinite_buckets"] == 1, out
        assert out["residual_finite_after_bad"] and out["residual_finite"] and out["residual_nonzero"], (rank, out)
        assert out["next_result_finite"], (rank, out)
    poisoned = results[1]
    assert poisoned["residual_kept"], "the rank with NaN/Inf gradients keeps its residual as it was"
    assert poisoned["continues_as_if_skipped"], poisoned


def test_all_reduce_on_a_non_member_behaves_like_torch(dist_pool):
    results = dist_pool(2).run(_all_reduce_non_member, timeout=60)
    member, outsider = results
    assert member[False]["returned"] is None and member[True]["returned"] == "Future"
    for async_op in (False, True):
        got = outsider[async_op]
        assert got["returned"] is None and got["torch_returned"] is None, got
        assert got["tensor"], "a non-member's tensor is left alone"
        assert any("does not belong to the given group" in w for w in got["warned"]), got


def test_topk_state_load_state_dict_validates():
    good = hooks.TopkState()
    good.load_state_dict({"bytes_sent": 0, "buckets_reduced": 0, "iteration": 3, "nonfinite_buckets": 0,
                          "residuals": {"fc.weight": torch.zeros(4)}})
    assert good.iteration == 3
    base = good.state_dict()
    cases = [
        (dict(iteration=-1), ValueError, "iteration must be a non-negative int, got -1"),
        (dict(iteration=2.5), TypeError, "iteration must be a non-negative int, got 2.5"),
        (dict(iteration=True), TypeError, "iteration must be a non-negative int, got True"),
        (dict(bytes_sent=-5), ValueError, "bytes_sent must be a non-negative int"),
        (dict(residuals=[torch.zeros(4)]), TypeError, "residuals must be a dict"),
        (dict(residuals={"fc.weight": [0.0] * 4}), TypeError, "residual of 'fc.weight' must be a tensor, got list"),
        (dict(residuals={"fc.weight": torch.zeros(4, dtype=torch.int32)}), TypeError,
         "residual of 'fc.weight' must be float32, float16 or bfloat16, got torch.int32"),
        (dict(residuals={0: torch.zeros(4)}), TypeError, "keyed by parameter name"),
        (dict(residuals={"fc.weight": torch.zeros(4, requires_grad=True)}), ValueError,
         "residual of 'fc.weight' requires grad"),
    ]
    for change, error, match in cases:
        state = hooks.TopkState()
        with pytest.raises(error, match=match):
            state.load_state_dict({**base, **change})
        assert state.iteration == 0 and not state.residuals, "a rejected state_dict changes nothing"
    with pytest.raises(ValueError, match="missing 'iteration'"):
        hooks.TopkState().load_state_dict({k: v for k, v in base.items() if k != "iteration"})
    # Shapes are checked against the registered model's parameters.
    model = nn.Linear(2, 2)
    state = hooks.TopkState()
    state.register_model(model)
    with pytest.raises(ValueError, match=r"residual of 'weight' has 5 elements but the parameter has 4"):
        state.load_state_dict({**base, "residuals": {"weight": torch.zeros(5)}})
    with pytest.raises(ValueError, match="'nope' is not a parameter of the registered model"):
        state.load_state_dict({**base, "residuals": {"nope": torch.zeros(4)}})


def test_topk_residual_that_requires_grad_is_refused(dist_pool):
    for out in dist_pool(2).run(_topk_residual_requires_grad, timeout=60):
        assert out["message"] is not None and "residual requires grad" in out["message"], out
        assert out["untouched"], "neither the tensor nor the residual may change"


BAD_ARGS = [
    (["--batch-size", "0"], "--batch-size: must be a positive int, got 0"),
    (["--batch-size", "-3"], "--batch-size: must be a positive int, got -3"),
    (["--batch-size", "5000", "--nproc", "2"], "--batch-size 5000 is larger than the 719 training samples of each"),
    (["--epochs", "0"], "--epochs: must be a positive int, got 0"),
    (["--epochs", "-2"], "--epochs: must be a positive int, got -2"),
    (["--nproc", "-1"], "--nproc: must be a positive int, got -1"),
    (["--nproc", "0"], "--nproc: must be a positive int, got 0"),
    (["--lr", "nan"], "--lr: must be a finite positive number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite positive number, got inf"),
    (["--lr", "0"], "--lr: must be a finite positive number, got 0"),
    (["--lr", "-0.1"], "--lr: must be a finite positive number, got -0.1"),
    (["--max-steps", "0"], "--max-steps: must be a positive int, got 0"),
    (["--timeout", "0"], "--timeout: must be a finite positive number, got 0"),
    (["--ratio", "1.5"], "--ratio: must be in (0, 1], got 1.5"),
    (["--hidden", "0"], "--hidden: must be a positive int, got 0"),
    (["--block-size", "0"], "--block-size: must be a positive int, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be a non-negative int, got -1"),
    # DiLoCo trained on to nan with these (a negative one failed later, in torch's SGD, on every rank).
    (["--algo", "diloco", "--outer-momentum", "nan"], "--outer-momentum: must be a number in [0, 1), got nan"),
    (["--algo", "diloco", "--outer-momentum", "1"], "--outer-momentum: must be a number in [0, 1), got 1"),
    (["--algo", "diloco", "--outer-momentum", "-0.5"], "--outer-momentum: must be a number in [0, 1), got -0.5"),
    # Options that do nothing with the others were ignored silently.
    (["--steps-per-epoch", "5"], "--steps-per-epoch has no effect here (only with --task charlm)"),
    (["--task", "charlm", "--hidden", "64"], "--hidden has no effect here (only with --task digits)"),
    (["--overlap"], "--overlap has no effect here (only with --algo localsgd or diloco)"),
    (["--sync-every", "5"], "--sync-every has no effect here (only with --algo localsgd or diloco)"),
    (["--algo", "localsgd", "--overlap-steps", "2"], "--overlap-steps has no effect here (only with --overlap)"),
    (["--algo", "localsgd", "--outer-lr", "0.5"], "--outer-lr has no effect here (only with --algo diloco)"),
    (["--algo", "diloco", "--hook", "topk"], "--hook has no effect here (only with --algo ddp)"),
    (["--hook", "fp16", "--ratio", "0.1"], "--ratio has no effect here (only with --hook topk (--algo ddp) or"),
    (["--algo", "diloco", "--compression", "topk", "--block-size", "64"], "--block-size has no effect here"),
    (["--hook", "int8", "--powersgd-rank", "4"], "--powersgd-rank has no effect here"),
    (["--checkpoint-every", "5"], "--checkpoint-every has no effect here (only with --checkpoint-dir or --checkpoint)"),
    (["--checkpoint", "a", "--checkpoint-dir", "b"], "--checkpoint has no effect here (ignored with --checkpoint-dir"),
    (["--max-restarts", "2"], "--max-restarts has no effect here (only with --fault-tolerant; torchrun's own"),
    (["--fault-tolerant", "--checkpoint-dir", "c"], "--checkpoint-dir has no effect here (ignored with --fault-tolerant"),
]


@pytest.mark.parametrize("argv,expect", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_train_rejects_bad_arguments(argv, expect, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(argv + ["--no-progress"])
    assert exc.value.code == 2, "argparse's usage error"
    err = capsys.readouterr().err
    assert expect in err, err


@pytest.mark.parametrize("argv", [
    ["--task", "charlm", "--algo", "diloco", "--sync-every", "10", "--outer-lr", "1.0", "--outer-momentum", "0",
     "--compression", "topk", "--ratio", "0.05", "--overlap", "--overlap-steps", "3", "--steps-per-epoch", "20"],
    ["--algo", "localsgd", "--compression", "int8", "--block-size", "64", "--fragments", "2"],
    ["--hook", "topk", "--ratio", "0.1", "--warmup-steps", "3", "--ddp", "torch", "--hidden", "64", "--layers", "1"],
    ["--hook", "powersgd", "--powersgd-rank", "4", "--checkpoint-dir", "c", "--checkpoint-every", "5",
     "--keep-checkpoints", "3", "--kill-at-step", "3", "--kill-rank", "1"],
], ids=["charlm-diloco", "localsgd-int8", "ddp-topk", "powersgd-checkpoints"])
def test_train_accepts_options_that_apply(argv):
    with pytest.raises(SystemExit) as exc:  # past the checks: launched without torchrun
        train_cli.main(argv + ["--no-progress"])
    assert "launch with torchrun" in str(exc.value.code), exc.value.code


def test_train_fault_tolerant_zero_replicas_is_a_clear_error():
    # The default thread count divided the cores by --replicas: ZeroDivisionError.
    with pytest.raises(SystemExit, match="--replicas must be >= 1, got 0"):
        train_cli.main(["--fault-tolerant", "--replicas", "0", "--no-progress"])


def test_train_rejects_resuming_past_the_last_epoch(tmp_path, capsys, dist_pool):
    directory = str(tmp_path / "ckpt")
    assert dist_pool(2).run(_train_resume_past_the_end, directory, True) == [None, None]  # one epoch, saved
    with pytest.raises(SystemExit) as exc:  # the --nproc launcher checks before it starts any rank
        train_cli.main(["--nproc", "2", "--epochs", "1", "--resume", directory, "--no-progress"])
    assert exc.value.code == 2
    assert "--resume: the checkpoint is at step 22 (epoch 1 of 1): nothing left to train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--nproc", "2", "--resume", str(tmp_path / "missing"), "--no-progress"])
    assert "no complete checkpoint" in capsys.readouterr().err
    for msg in dist_pool(2).run(_train_resume_past_the_end, directory, False):  # under torchrun: every rank raises
        assert msg is not None and "nothing left to train" in msg, msg


def test_train_timeout_reaches_the_process_group(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def fake_init(*args, **kwargs):
        seen.append(kwargs["timeout"])
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setenv("RANK", "0")  # the torchrun path
    for argv, expect in ([], 300), (["--timeout", "7.5"], 7.5):
        with pytest.raises(Stop):
            train_cli.main(argv + ["--no-progress"])
        assert seen[-1] == datetime.timedelta(seconds=expect)
    # The --nproc path: each spawned rank's store and group (called here in-process, without its
    # die-with-the-launcher setting and with a stand-in for the launcher's store).
    monkeypatch.setattr(train_cli, "_die_with_launcher", lambda: None)
    monkeypatch.setattr(dist, "TCPStore", lambda *a, **kw: seen.append(kw["timeout"]))
    args = train_cli.parser().parse_args(["--timeout", "12"])
    with pytest.raises(Stop):
        train_cli._worker(0, 2, ("127.0.0.1", 1), args)
    assert seen[-2:] == [datetime.timedelta(seconds=12)] * 2


def test_train_killed_launcher_leaves_no_store_and_no_ranks(tmp_path):
    psutil = pytest.importorskip("psutil")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=ROOT)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pyparallel.train", "--nproc", "2", "--epochs", "100", "--hidden", "16",
         "--transport", "ring", "--no-progress", "--threads", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(launcher.pid)
    ranks = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both ranks started and past their imports
            try:
                ranks = [p for p in parent.children(recursive=True)
                         if "resource_tracker" not in " ".join(p.cmdline())]
                if len(ranks) >= 2 and all(p.cpu_times().user > 1.0 for p in ranks):
                    break
            except psutil.Error:  # a process that just started or ended
                pass
            time.sleep(0.2)
        assert len(ranks) >= 2, "the launcher did not start its ranks"
        time.sleep(1.0)  # ranks are in the process group and training
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        _, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, "ranks must die with their launcher"
        assert sorted(os.listdir(tmp)) == [], "the killed launcher left files behind"
    finally:
        for p in ranks:  # never leave a stray rank running, whatever failed above
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if launcher.poll() is None:
            launcher.kill()
