"""Periodic training checkpoints that survive a crash at any moment, for elastic restarts (torchrun).

Layout: ``<dir>/step-<step>/rank<r>.pt`` (each rank's state: model, optimizer, hook state with its per-rank
error-feedback residuals) and ``<dir>/step-<step>/COMPLETE`` (JSON metadata), written by rank 0 once every
rank's file is on disk. A checkpoint counts only with its ``COMPLETE`` file, so a rank killed while
writing leaves the previous checkpoint as the latest. Every file is written atomically: a temporary file
in the same directory, flushed and fsynced, renamed over the target, and the directory fsynced, so a
reader sees the old file or the new one, never a torn one, even across a power cut.

The metadata (format version, world size, data-parallel algorithm, hook kind and settings, step, ...)
is checked on resume: a checkpoint written by a different configuration raises :class:`CheckpointMismatch`
naming each field that differs, instead of loading residuals into the wrong ranks.
A file that cannot be parsed (changed after it was written) raises :class:`CheckpointDamaged` naming it.

Example::

    meta = {"world_size": world, "algorithm": "pyparallel", "hook": "topk", "hook_config": {"ratio": 0.01}}
    if checkpoint.latest(d) is not None:
        step, state = checkpoint.load(d, rank, meta)
    ...
    checkpoint.save(d, step, rank, {"model": ..., "optimizer": ..., "hook": ...}, meta)   # every rank
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile

import torch
import torch.distributed as dist

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_COMPLETE = "COMPLETE"


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run whose configuration differs from this one's."""


class CheckpointDamaged(ValueError):
    """A file of the checkpoint cannot be parsed (truncated or changed after it was written)."""


def atomic_write(path: str, write) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path`` and renames it over ``path`` once it is
    durable: the file at ``path`` is the old one or the complete new one, whenever the process dies."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = _os_error(exc)
        if cause is not None and not isinstance(exc, OSError):
            # torch.save on a full disk ends with "RuntimeError: [enforce fail at inline_container.cc]
            # unexpected pos ...", the ENOSPC only in its context: name the file and the OS's reason.
            raise OSError(cause.errno, f"checkpoint: could not write {path}: {cause.strerror}") from exc
        raise
    _fsync_dir(directory)  # makes the rename itself durable


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first OSError in ``exc``'s chain of causes and contexts, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(directory: str, what: str = "checkpoint directory", create: bool = True) -> None:
    """Creates ``directory`` if needed (``create``) and writes and removes a probe file in it; raises OSError
    naming ``what`` and the directory if that fails. Called before training: a read-only or missing directory was
    otherwise found at the first save, after K steps or a whole epoch of training."""
    try:
        if create:
            os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {directory} is not writable: {exc.strerror}") from exc


def _step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:09d}")


def _steps(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):  # no checkpoints there (saving there says why it cannot)
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, names) if m)


def latest(directory: str) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, or None."""
    for step in reversed(_steps(directory)):
        if os.path.exists(os.path.join(_step_dir(directory, step), _COMPLETE)):
            return step
    return None


def save(directory: str, step: int, rank: int, state: dict, metadata: dict, group: dist.ProcessGroup | None = None,
         keep: int = 2) -> str:
    """Writes this rank's ``state`` as checkpoint ``step``; every rank of ``group`` must call it.

    Rank 0 marks the checkpoint complete after a barrier (so only once every rank's file is durable) and
    then deletes all but the newest ``keep`` complete checkpoints. Returns the checkpoint's directory.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.save: keep must be >= 1, got {keep}")
    meta = _full_metadata(metadata, step)
    path = _step_dir(directory, step)
    os.makedirs(path, exist_ok=True)
    for stale in os.listdir(path):  # temporary files of an incarnation that died while writing
        if stale.startswith(f".rank{rank}.pt.") and stale.endswith(".tmp"):
            os.unlink(os.path.join(path, stale))
    atomic_write(os.path.join(path, f"rank{rank}.pt"), lambda f: torch.save({"metadata": meta, "state": state}, f))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group)
    if rank == 0:
        atomic_write(os.path.join(path, _COMPLETE), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_dir(directory)
        kept = {s for s in _steps(directory) if os.path.exists(os.path.join(_step_dir(directory, s), _COMPLETE))}
        kept = set(sorted(kept)[-keep:])
        for old in _steps(directory):
            if old < step and old not in kept:  # older checkpoints, and older ones that never completed
                shutil.rmtree(_step_dir(directory, old), ignore_errors=True)
    return path


def _full_metadata(metadata: dict, step: int) -> dict:
    meta = dict(metadata)
    if "world_size" not in meta:
        raise ValueError("checkpoint: metadata must include world_size")
    meta.update(format_version=FORMAT_VERSION, step=step)
    try:  # plain JSON values only: the metadata is compared field by field on resume
        return json.loads(json.dumps(meta))
    except TypeError as exc:
        raise ValueError(f"checkpoint: metadata must hold JSON values only ({exc})") from exc


def check_metadata(found: dict, expected: dict, where: str) -> None:
    """Raises CheckpointMismatch naming every field of ``expected`` that ``found`` lacks or differs in."""
    if found.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{where}: checkpoint format version {found.get('format_version')!r}, this "
                                 f"pyparallel reads version {FORMAT_VERSION}")
    diffs = [f"{key}: checkpoint has {found.get(key, '<missing>')!r}, this run has {value!r}"
             for key, value in expected.items() if found.get(key, "<missing>") != value]
    if diffs:
        raise CheckpointMismatch(f"{where} was written by a different configuration; resume with the same "
                                 "settings or start a new checkpoint directory:\n  " + "\n  ".join(diffs))


def load(directory: str, rank: int, expected: dict, step: int | None = None) -> tuple[int, dict]:
    """(step, state) of this rank from the newest complete checkpoint in ``directory`` (or ``step``).

    ``expected`` holds the fields that must equal the checkpoint's metadata (world size, algorithm, hook,
    ...); any difference raises :class:`CheckpointMismatch`.
    """
    if step is None:
        step = latest(directory)
        if step is None:
            raise FileNotFoundError(f"checkpoint: no complete checkpoint in {directory!r}")
    path = _step_dir(directory, step)
    complete = os.path.join(path, _COMPLETE)
    if not os.path.exists(complete):
        raise FileNotFoundError(f"checkpoint: {path} is not complete (no {_COMPLETE} file)")
    # A damaged file (truncated or overwritten outside this module, whose writes are atomic) used to fail
    # in torch.load with "OSError: [Errno 22] Invalid argument" or a zip error naming no file.
    damaged = (f"checkpoint: {{}} is damaged ({{}}); move {path} aside to resume from the checkpoint before it")
    try:
        with open(complete) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"not a JSON object but {type(meta).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(damaged.format(complete, exc)) from exc
    check_metadata(meta, expected, path)
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(rank_file):
        raise FileNotFoundError(f"checkpoint: {path} has no file for rank {rank} (world size {meta['world_size']})")
    try:
        blob = torch.load(rank_file, weights_only=False)
    except Exception as exc:  # noqa: BLE001  (torch raises OSError, RuntimeError, UnpicklingError, EOFError...)
        if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):
            raise  # unreadable, not damaged (permissions, I/O error): the OS's own message names the file
        raise CheckpointDamaged(damaged.format(rank_file, f"{type(exc).__name__}: {exc}")) from exc
    if not isinstance(blob, dict) or not {"metadata", "state"} <= blob.keys():
        raise CheckpointDamaged(damaged.format(rank_file, "not a pyparallel checkpoint file"))
    if blob["metadata"] != meta:
        raise CheckpointMismatch(f"checkpoint: {rank_file} belongs to another run than {complete} "
                                 f"({blob['metadata']} vs {meta})")
    return step, blob["state"]
