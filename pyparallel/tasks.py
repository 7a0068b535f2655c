"""Training tasks for :mod:`pyparallel.train` and ``benchmarks/train.py``: data, model, inner optimizer,
batches and evaluation. Both use data that ships inside an installed package; nothing is downloaded.

* ``digits``: scikit-learn's bundled handwritten digits (1797 8x8 images), an MLP; test accuracy and loss.
* ``charlm``: a byte-level transformer language model (about 3.3M parameters by default) on the Python
  standard library's own top-level ``.py`` files (``sysconfig.get_paths()["stdlib"]``, sorted by name;
  every tenth file is held out for validation, so no text is in both splits). Heavy enough per step
  that communication matters. The corpus is that of the running interpreter (4.7 MB for CPython 3.11).

Batches are a function of (seed, epoch or step, rank) only, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import sysconfig

import torch
import torch.distributed as dist
from torch import nn

TASKS = ("digits", "charlm")


# ---- digits ----

def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): features scaled to [0, 1], a fixed shuffled split."""
    import gzip
    import importlib.util

    import numpy as np

    # scikit-learn's load_digits() reads this file; reading it directly skips importing scikit-learn (and
    # SciPy), seconds that every process, and every restarted one, would pay.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pyparallel.train needs scikit-learn, whose package ships the digits data set")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path) as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :-1].copy()) / 16.0
    y = torch.from_numpy(data[:, -1].astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(hidden: int, layers: int, seed: int) -> nn.Module:
    """The digits MLP: 64 inputs, ``layers`` hidden layers of ``hidden`` units (ReLU), 10 classes."""
    torch.manual_seed(seed)
    dims = [64] + [hidden] * layers
    body = []
    for a, b in zip(dims[:-1], dims[1:]):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(dims[-1], 10))


class Digits:
    name = "digits"
    defaults = {"epochs": 20, "batch_size": 32, "lr": 0.05}

    def __init__(self, args):
        self.args = args
        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_split(args.seed)

    def model(self) -> nn.Module:
        return make_model(self.args.hidden, self.args.layers, self.args.seed)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.args.lr, momentum=0.9)

    def steps_per_epoch(self, world: int) -> int:
        return len(self.x_train) // (self.args.batch_size * world)

    def epoch_batches(self, epoch: int, rank: int, world: int):
        # The same permutation on every rank, a disjoint shard per rank.
        perm = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(self.args.seed * 1000 + epoch))
        shard = perm[rank::world]
        bs = self.args.batch_size
        for s in range(self.steps_per_epoch(world)):
            idx = shard[s * bs:(s + 1) * bs]
            yield self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, group=None) -> dict:
        """Every rank evaluates the whole (small) test split."""
        model.eval()
        logits = model(self.x_test.to(device)).cpu()
        model.train()
        return {"loss": nn.functional.cross_entropy(logits, self.y_test).item(),
                "accuracy": (logits.argmax(dim=1) == self.y_test).float().mean().item()}


# ---- charlm ----

@functools.lru_cache(maxsize=2)
def stdlib_corpus() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train bytes, validation bytes, file names) from the standard library's top-level .py files."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if len(files) < 10:
        raise RuntimeError(f"charlm: expected the standard library's .py files under {root}, found {len(files)}")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (val if i % 10 == 9 else train).extend(f.read())
    return (torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long(),
            [os.path.basename(f) for f in files])


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A byte-level GPT: 256 symbols, learned positions, pre-LayerNorm blocks, causal attention."""

    def __init__(self, context: int, d_model: int, layers: int, heads: int, seed: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"charlm: d_model ({d_model}) must be a multiple of heads ({heads})")
        torch.manual_seed(seed)
        self.embed, self.pos = nn.Embedding(256, d_model), nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.Sequential(*[_Block(d_model, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, 256)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1))

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.embed(idx) + self.pos[: idx.shape[1]])))


class CharLM:
    name = "charlm"
    defaults = {"epochs": 4, "batch_size": 16, "lr": 1e-3}

    def __init__(self, args):
        self.args = args
        self.train, self.val, self.files = stdlib_corpus()
        n = args.val_windows
        span = len(self.val) - args.context - 1
        self.val_offsets = torch.arange(n) * (span // max(n, 1))  # evenly spread over the held-out files

    def model(self) -> nn.Module:
        a = self.args
        return CharTransformer(a.context, a.d_model, a.n_layers, a.n_heads, a.seed)

    def optimizer(self, params) -> torch.optim.Optimizer:
        # fused: one kernel over every parameter. On one CPU thread, this model's AdamW step took 7.3 ms
        # with torch's default (a loop over the tensors), 12.3 ms with foreach=True and 2.9 ms fused, next to
        # a 20 ms forward + backward at batch 1 (2026-12-02, the 2-core VM).
        return torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.01, fused=True)

    def steps_per_epoch(self, world: int) -> int:
        return self.args.steps_per_epoch

    def _windows(self, data: torch.Tensor, offsets: torch.Tensor):
        idx = offsets[:, None] + torch.arange(self.args.context + 1)
        w = data[idx]
        return w[:, :-1], w[:, 1:]

    def epoch_batches(self, epoch: int, rank: int, world: int):
        a = self.args
        for s in range(a.steps_per_epoch):
            step = epoch * a.steps_per_epoch + s
            g = torch.Generator().manual_seed((a.seed * 1_000_003 + step) * 1009 + rank)
            offsets = torch.randint(0, len(self.train) - a.context - 1, (a.batch_size,), generator=g)
            yield self._windows(self.train, offsets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, group=None) -> dict:
        """Mean next-byte loss and accuracy over the fixed validation windows, each rank a shard of them
        (the model must be the same on every rank), summed with one small all-reduce."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for chunk in self.val_offsets[rank::world].split(self.args.batch_size):
            x, y = self._windows(self.val, chunk)
            logits = model(x.to(device)).cpu().flatten(0, 1)
            y = y.flatten()
            sums += torch.tensor([nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                                  (logits.argmax(dim=1) == y).sum().item(), y.numel()], dtype=torch.float64)
        model.train()
        dist.all_reduce(sums, group=group)
        return {"loss": (sums[0] / sums[2]).item(), "accuracy": (sums[1] / sums[2]).item()}


def get(name: str):
    return {"digits": Digits, "charlm": CharLM}[name]


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (classes, or the 256 next bytes of every position)."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())
