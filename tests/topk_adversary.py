"""Inputs that defeat the CPU top-k's sampler (white-box: they know where csrc/cpu/topk.cpp looks), so
the bracket it derives misses the threshold and the exact fallbacks must take over."""

import torch


def cpu_sample_positions(n, target=1 << 16):
    """The positions csrc/cpu/topk.cpp samples (one per window of n // target, xorshift64 offsets)."""
    stride, state, mask = max(1, n // target), 0x9E3779B97F4A7C15, (1 << 64) - 1
    positions = []
    for w in range(0, n - stride + 1, stride):
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        positions.append(w + state % stride)
    return torch.tensor(positions)


def evading(n, generator=None):
    """Large values everywhere except where the sampler looks: far more than k keys land above the
    bracket (the threshold is above it)."""
    x = torch.randn(n, generator=generator) * 10
    pos = cpu_sample_positions(n)
    x[pos] = torch.randn(len(pos), generator=generator) * 1e-3
    return x


def sample_only(n, generator=None):
    """Large values only where the sampler looks: fewer than k keys reach the bracket (the threshold is
    below it) whenever k is more than a few times n / 65536."""
    x = torch.randn(n, generator=generator) * 1e-3
    pos = cpu_sample_positions(n)
    x[pos] = torch.randn(len(pos), generator=generator) * 10
    return x
