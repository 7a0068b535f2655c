"""Checkpoint and resume under torch's DDP (issue 14, point 3; Note [Hook state keyed by parameter]).

A new DDP object lays its buckets out differently from the one that wrote the checkpoint (registration
order in its first iteration, gradient-ready order after the rebuild), so the hooks must (a) reduce in
an order that does not depend on the layout and (b) keep their state per parameter. Checked with Gloo
ranks (3 for the bitwise tests: with 2 the ring's sums are single commutative adds, which any layout
gets right, so only 3 ranks tell a layout-independent reduction from a lucky one): train k steps, checkpoint (model, optimizer, hook state through torch.save), build a fresh model,
optimizer, DDP and hook state, load, continue k steps, and compare with an uninterrupted 2k-step run.
"""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pyparallel import hooks

HOOKS = {
    "allreduce": (hooks.allreduce_hook, lambda: hooks.HookState(transport="ring")),
    "fp16": (hooks.fp16_hook, lambda: hooks.HookState(transport="ring")),
    "bf16": (hooks.bf16_hook, lambda: hooks.HookState(transport="ring")),
    "int8": (hooks.int8_hook, lambda: hooks.Int8State(block_size=64, transport="ring")),
    "topk": (hooks.topk_hook, lambda: hooks.TopkState(ratio=0.05, transport="ring")),
}


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 5))


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)


class _Run:
    """Model, optimizer, DDP and hook state; ``fresh_seed`` differs from the trained model's on purpose, so
    that only what the checkpoint carries can make a resumed run equal."""

    def __init__(self, hook_name, seed, bucket_cap_mb=25.0, register=True, hook=None):
        self.model = _model(seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        default_hook, make_state = HOOKS[hook_name]
        self.state = make_state()
        if register:
            self.state.register_model(self.model)
        self.hook = hook or default_hook
        self.bucket_cap_mb = bucket_cap_mb
        self.ddp = None

    def wrap(self):
        self.ddp = nn.parallel.DistributedDataParallel(self.model, bucket_cap_mb=self.bucket_cap_mb)
        self.ddp.register_comm_hook(self.state, self.hook)
        return self

    def train(self, steps):
        rank = dist.get_rank()
        for step in steps:
            x, y = _batch(step, rank)
            self.opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.ddp(x), y).backward()
            self.opt.step()

    def save(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "hook": self.state.state_dict()}, buf)
        return buf.getvalue()

    def load(self, blob: bytes):
        ckpt = torch.load(io.BytesIO(blob), weights_only=True)  # a plain checkpoint: tensors, numbers, names
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.state.load_state_dict(ckpt["hook"])
        return self

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]


def _resume_bitwise(hook_name, k, register):
    straight = _Run(hook_name, 0, register=register).wrap()
    straight.train(range(2 * k))
    first = _Run(hook_name, 0, register=register).wrap()
    first.train(range(k))
    blob = first.save()
    resumed = _Run(hook_name, 123, register=register).load(blob).wrap()
    resumed.train(range(k, 2 * k))
    same = [torch.equal(a, b) for a, b in zip(straight.params(), resumed.params())]
    diff = max((a - b).abs().max().item() for a, b in zip(straight.params(), resumed.params()))
    return {"same": all(same), "max_diff": diff, "residuals": len(getattr(resumed.state, "residuals", {}))}


def _residuals_carried(k):
    """Several buckets: the checkpoint's layout (rebuilt, one parameter per bucket) differs from the new
    DDP's first iteration (one bucket) and from its rebuilt one; every parameter's residual must arrive
    exactly, each time the layout changes."""
    seen = []

    def recording_hook(state: hooks.TopkState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        flat = state.residual_for(bucket)  # assembled here from the per-parameter residuals
        layout = state.layout(bucket)
        seen.append((len(bucket.parameters()), {n: r.clone() for n, r in zip(layout.names, layout.split(flat))}))
        return hooks.topk_hook(state, bucket)

    first = _Run("topk", 0, bucket_cap_mb=0.001).wrap()
    first.train(range(k))
    saved = first.state.state_dict()["residuals"]
    resumed = _Run("topk", 5, bucket_cap_mb=0.001, hook=recording_hook).load(first.save()).wrap()
    resumed.train([k])
    first_layout = list(seen)
    after_step = {n: r.clone() for n, r in resumed.state.residuals.items()}
    seen.clear()
    resumed.train([k + 1])
    out = {"params": len(list(first.model.parameters())), "saved": len(saved),
           "buckets_at_load": [n for n, _ in first_layout], "buckets_after": [n for n, _ in seen]}
    out["carried_at_load"] = all(torch.equal(r, saved[name]) for _, rs in first_layout for name, r in rs.items())
    out["names_at_load"] = sorted(name for _, rs in first_layout for name in rs) == sorted(saved)
    out["carried_after_rebuild"] = all(torch.equal(r, after_step[name]) for _, rs in seen for name, r in rs.items())
    out["nonzero"] = all(bool(r.any()) for name, r in saved.items() if name.endswith("weight"))
    return out


@pytest.mark.parametrize("hook_name", sorted(HOOKS))
def test_torch_ddp_resume_is_bitwise(dist_pool, hook_name):
    for out in dist_pool(3).run(_resume_bitwise, hook_name, 4, True, timeout=120):
        assert out["same"], f"{hook_name}: resumed run differs by up to {out['max_diff']:.3g}"
    if hook_name == "topk":
        assert out["residuals"] == 6, "a residual per parameter"


def test_torch_ddp_resume_is_bitwise_without_register_model(dist_pool):
    # Parameters are then numbered as the hook first sees them, the same in every new DDP object.
    for out in dist_pool(2).run(_resume_bitwise, "topk", 4, False, timeout=120):
        assert out["same"], f"resumed run differs by up to {out['max_diff']:.3g}"


def test_torch_ddp_resume_carries_every_residual_across_bucket_layouts(dist_pool):
    for out in dist_pool(2).run(_residuals_carried, 3, timeout=120):
        assert out["saved"] == out["params"] == 6 and out["nonzero"], out
        assert out["buckets_at_load"] == [6], "the new DDP's first iteration has one bucket"
        assert len(out["buckets_after"]) > 1, "then DDP rebuilds into several"
        assert out["names_at_load"] and out["carried_at_load"], out
        assert out["carried_after_rebuild"], out
