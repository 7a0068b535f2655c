"""pyparallel: collective communication for PyTorch training.

Compiled ops live under ``torch.ops.pyparallel.*`` with typed wrappers in :mod:`pyparallel.ops`.
"""

import torch  # noqa: F401  (loads libtorch before our extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.pyparallel.*)
except ImportError as exc:  # a missing or broken build must be loud, with the fix
    raise ImportError(
        "pyparallel's compiled extension pyparallel._C is missing or failed to load "
        f"({exc}). Build it with `make build` (or `pip install --no-build-isolation -e .`)."
    ) from exc

from . import hooks, ops  # noqa: E402
from . import pipeline  # noqa: E402
from .comm import Int8, Topk, all_reduce, release, resolve_transport, shm_empty  # noqa: E402
from .local_sgd import DiLoCo, LocalSGD  # noqa: E402
from .data_parallel import DataParallel  # noqa: E402

__all__ = ["ops", "hooks", "all_reduce", "resolve_transport", "shm_empty", "release", "Int8", "Topk", "DataParallel", "LocalSGD", "DiLoCo", "pipeline"]
__version__ = "0.1.0"
