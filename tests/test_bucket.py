"""Bucket assignment and the flat copies in and out, against references."""

import random

import pytest
import torch

from pyparallel import ops
from pyparallel import reference as ref

from conftest import CUDA, DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_params(count, devices=("cpu",)):
    out = []
    for _ in range(count):
        numel = random.choice([0, 1, 3, random.randrange(1, 5000), random.randrange(1, 600_000)])
        out.append(torch.empty(numel, dtype=random.choice(DTYPES), device=random.choice(devices)))
    return out


@pytest.mark.cuda  # with a GPU, the parameters are spread over both devices
def test_assignment_matches_reference():
    devices = ("cpu", "cuda") if CUDA else ("cpu",)
    for _ in range(50):
        tensors = _random_params(random.randrange(0, 60), devices)
        limits = random.choice([(1 << 20, 25 << 20), (1,), (100_000, 300_000, 2_000_000), (4 << 20,)])
        got = ops.bucket_assignment(tensors, limits)
        assert got == ref.bucket_assignment(tensors, limits)
        assert got == ops.bucket_assignment(tensors, limits), "deterministic"
        assert sorted(i for b in got for i in b) == list(range(len(tensors))), "every tensor exactly once"


def test_assignment_properties():
    tensors = _random_params(80)
    limits = (1 << 20, 25 << 20)
    buckets = ops.bucket_assignment(tensors, limits)
    opened = {}
    for b in buckets:
        kinds = {(tensors[i].dtype, tensors[i].device) for i in b}
        assert len(kinds) == 1, "one (dtype, device) per bucket"
        assert b == sorted(b, reverse=True), "reverse registration order inside a bucket"
        key = kinds.pop()
        n = opened.get(key, 0)
        opened[key] = n + 1
        limit = limits[min(n, len(limits) - 1)]
        size = sum(tensors[i].numel() * tensors[i].element_size() for i in b)
        last = tensors[b[-1]].numel() * tensors[b[-1]].element_size()
        assert size - last < limit, "a bucket closes as soon as it reaches its limit"


def test_assignment_defaults_first_bucket_small():
    params = [torch.empty(100_000) for _ in range(100)]  # 400 KB each
    buckets = ops.bucket_assignment(params)
    assert buckets[0] == [99, 98, 97], "first bucket: 1 MiB, from the last parameters"
    assert len(buckets[1]) == 66  # ceil(25 MiB / 400 KB)


def test_assignment_bad_input():
    with pytest.raises(RuntimeError, match="size limits must be positive"):
        ops.bucket_assignment([torch.empty(3)], (0,))
    with pytest.raises(RuntimeError, match="size_limits must not be empty"):
        ops.bucket_assignment([torch.empty(3)], ())


def _bucket_tensors(dtype, device):
    shapes = [(3, 5), (0,), (), (7,), (2, 3, 4), (4097,), (1,), (1000, 3)]
    ts = [torch.randn(s, device=device).to(dtype) for s in shapes]
    ts.append(torch.randn(6, 4, device=device).to(dtype).t())  # non-contiguous
    ts.append(torch.randn(20, device=device).to(dtype)[1::3])  # strided view
    ts.append(torch.randn(31, device=device).to(dtype)[1:])  # unaligned start
    return ts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten_unflatten_roundtrip(device, dtype):
    ts = _bucket_tensors(dtype, device)
    total = sum(t.numel() for t in ts)
    flat = ops.bucket_flatten(ts)
    expect = ref.bucket_flatten(ts, torch.empty(total, dtype=dtype, device=device))
    assert torch.equal(flat, expect)
    # into a slice of a bigger buffer (unaligned offset)
    big = torch.zeros(total + 3, dtype=dtype, device=device)
    ops.bucket_flatten(ts, big[3:])
    assert torch.equal(big[3:], expect) and not bool(big[:3].any())
    new_flat = torch.randn(total, device=device).to(dtype)
    outs = [torch.empty_like(t) for t in ts]
    outs[-3] = torch.empty(4, 6, device=device, dtype=dtype).t()  # write into a non-contiguous target
    ref_outs = [torch.empty_like(t) for t in outs]
    ops.bucket_unflatten(new_flat, outs)
    ref.bucket_unflatten(new_flat, ref_outs)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_flatten_many_mixed_sizes(device):
    ts = [torch.randn(random.choice([1, 5, 64, 1000, 70_000]), device=device) for _ in range(200)]
    flat = ops.bucket_flatten(ts)
    assert torch.equal(flat, torch.cat(ts))
    views = [torch.empty_like(t) for t in ts]
    ops.bucket_unflatten(flat * 2, views)
    for a, b in zip(views, ts):
        assert torch.equal(a, b * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_flatten_bad_input(device):
    ts = [torch.randn(3, device=device), torch.randn(4, device=device)]
    with pytest.raises(RuntimeError, match="the tensors hold 7 elements but the flat bucket has 8"):
        ops.bucket_flatten(ts, torch.empty(8, device=device))
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is Half but the flat bucket is Float"):
        ops.bucket_flatten([ts[0], ts[1].half()], torch.empty(7, device=device))
    with pytest.raises(RuntimeError, match="the tensors hold 7 elements but the flat bucket has 6"):
        ops.bucket_unflatten(torch.empty(6, device=device), ts)
    with pytest.raises(ValueError, match="pass out="):
        ops.bucket_flatten([])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_flatten_device_mismatch():
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is on cpu but the flat bucket is on cuda"):
        ops.bucket_flatten([torch.randn(3)], torch.empty(3, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ts = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    torch.library.opcheck(torch.ops.pyparallel.bucket_flatten.default, (ts, torch.empty(17, device=device)))
    torch.library.opcheck(torch.ops.pyparallel.bucket_unflatten.default, (torch.randn(17, device=device), ts))
