"""Shared fixtures: devices to run on, and a fresh random seed per run that is printed for replay."""

import os
import random

import pytest
import torch

import pyparallel  # noqa: F401  (loads the extension; a missing build fails every test loudly)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]

_SEED = int(os.environ.get("PYPARALLEL_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"pyparallel test seed: {_SEED} (replay with PYPARALLEL_TEST_SEED={_SEED})"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs CUDA code when a GPU is present (`pytest -m cuda`: make gpu-check)")


def _uses_cuda(item) -> bool:
    if "cuda" in item.nodeid.lower() or item.get_closest_marker("cuda") is not None:
        return True
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    # Every test that runs CUDA code carries the `cuda` mark: by its name or parameters ("cuda"), by a
    # "needs a CUDA device" skip, or marked by hand where neither shows it.
    for item in items:
        if _uses_cuda(item):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    # Fresh inputs on every run, reproducible from the printed seed plus the test's name.
    seed = (_SEED + sum(map(ord, request.node.nodeid))) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


_POOLS: dict = {}


@pytest.fixture(scope="session")
def dist_pool():
    """Factory: dist_pool(world_size) -> a running WorkerPool, shared by every test of the session.

    A pool that was killed (a timeout, a dead rank) is replaced on the next request.
    """
    from dist_harness import WorkerPool

    def get(world_size: int) -> WorkerPool:
        pool = _POOLS.get(world_size)
        if pool is None or not pool.alive:
            pool = _POOLS[world_size] = WorkerPool(world_size)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
