"""Pipeline step time, efficiency and activation memory: ours against torch.distributed.pipelining.

Spawns its own ranks (Gloo on CPU, ``--threads`` intra-op threads each), one stage per rank, and times
both implementations on the same model, batch and ranks. Measurements are interleaved step by step: each
round measures t_stage once and runs one step of every implementation, and every number is a median over
rounds, so a change of the machine's speed (other jobs, clocks) moves all columns of a row alike.

    python benchmarks/pipeline.py                       # p=2, m=1..16, GPipe and 1F1B, ours and torch's
    python benchmarks/pipeline.py --json out.json
    python benchmarks/pipeline.py --quick               # a smoke run

Definitions (p stages, m micro-batches of --microbatch-size samples each):
- t_stage: forward + backward of one micro-batch on one stage, measured alone (no communication) on every
  rank at the same time, so the cores are as busy as in the pipeline; the largest over the stages. It is
  the pipeline's clock.
- step time: from a barrier to the end of ``step`` (for ours: handshake, schedule, last sends), the
  largest over the ranks; median over --steps rounds after --warmup rounds.
- ideal(m) = m * t_stage, the step time with no bubble and free communication.
- efficiency = ideal(m) / step time. A balanced GPipe or 1F1B step with free communication takes
  (m + p - 1) * t_stage, so efficiency cannot exceed the bound m / (m + p - 1) printed beside it.
- peak activations: the peak bytes that autograd keeps saved for backward on each stage during one step
  (pyparallel.pipeline.SavedActivationMeter: saved_tensors_hooks, each storage counted once while saved;
  parameters and the caller's input and target batch excluded), at m = --memory-m.
Results are checked: ours against the unsplit model (loss and gradients, fp32, relative error <= 1e-4 of
the largest gradient); any mismatch exits non-zero. The targets are printed as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from pyparallel.pipeline import DistributedPipeline, SavedActivationMeter, split_stages

SCHEDULES = ("gpipe", "1f1b")
IMPLS = ("ours_gpipe", "ours_1f1b", "torch_gpipe", "torch_1f1b")  # the table's columns
REL_TOL = 1e-4  # fp32, sums regrouped by micro-batch: ~1e-6 expected


def parse_range(text: str) -> list[int]:
    """"1-16" or "1,2,4,8" -> list of ints."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def build_model(args) -> nn.Sequential:
    """p * layers_per_stage blocks of Linear(width, width) + ReLU; the same seed on every rank."""
    torch.manual_seed(0)
    layers = []
    for _ in range(args.stages * args.layers_per_stage):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    return nn.Sequential(*layers)


def batch(args, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m)
    n = m * args.microbatch_size
    return torch.randn(n, args.width, generator=gen), torch.randint(0, args.width, (n,), generator=gen)


def max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


class StageAlone:
    """Forward + backward of one micro-batch on this rank's stage, without communication."""

    def __init__(self, args, rank: int):
        self.module = split_stages(build_model(args), n_stages=args.stages)[rank]
        self.first, self.last = rank == 0, rank == args.stages - 1
        self.x = torch.randn(args.microbatch_size, args.width, requires_grad=not self.first)
        self.target = torch.randint(0, args.width, (args.microbatch_size,))
        self.grad_out = torch.randn(args.microbatch_size, args.width)

    def seconds(self, reps: int = 3) -> float:
        """Median of ``reps`` runs on this rank, then the largest over the ranks (all measure at once)."""
        times = []
        dist.barrier()
        for _ in range(reps):
            self.module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            y = self.module(self.x)
            if self.last:
                F.cross_entropy(y, self.target).backward()
            else:
                y.backward(self.grad_out)
            times.append(time.perf_counter() - t0)
        return max_over_ranks(statistics.median(times))


def step_seconds(impl) -> float:
    """One step from a barrier, the largest over the ranks."""
    impl.module.zero_grad(set_to_none=True)
    dist.barrier()
    t0 = time.perf_counter()
    impl.step()
    return max_over_ranks(time.perf_counter() - t0)


def measure_row(args, m: int, rank: int, alone: StageAlone) -> dict:
    """Medians over rounds; each round measures t_stage once and steps every implementation once, so a drift
    of the machine's speed during the row hits every column alike."""
    impls = {f"{name}_{schedule}": cls(build_model(args), args, schedule, m, rank)
             for schedule in SCHEDULES for name, cls in (("ours", Ours), ("torch", Torch))
             if not (name == "torch" and schedule == "1f1b" and m < args.stages)}  # torch's 1F1B needs m >= p
    samples = {key: [] for key in ["t_stage", *impls]}
    for round_ in range(args.warmup + args.steps):
        t_stage = alone.seconds()
        times = {key: step_seconds(impl) for key, impl in impls.items()}
        if round_ >= args.warmup:
            samples["t_stage"].append(t_stage)
            for key, t in times.items():
                samples[key].append(t)
    row = dict(m=m, torch_1f1b=None)
    row.update({key: statistics.median(values) for key, values in samples.items()})
    return row


class Ours:
    """pyparallel.pipeline.DistributedPipeline on this rank, with its batch."""

    def __init__(self, model, args, schedule, m, rank):
        self.pipe = DistributedPipeline(model, F.cross_entropy, n_stages=args.stages, n_microbatches=m,
                                        schedule=schedule)
        self.module = self.pipe.module
        self.x, self.y = batch(args, m)

    def step(self):
        return self.pipe.step(self.x, self.y)


class Torch:
    """torch.distributed.pipelining's PipelineStage and schedule on this rank, same split, same batch."""

    def __init__(self, model, args, schedule, m, rank):
        self.module = split_stages(model, n_stages=args.stages)[rank]
        stage = PipelineStage(self.module, rank, args.stages, torch.device("cpu"))
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = cls(stage, n_microbatches=m, loss_fn=F.cross_entropy)
        self.first, self.last = rank == 0, rank == args.stages - 1
        self.x, self.y = batch(args, m)

    def step(self):
        if self.first:
            return self.schedule.step(self.x)
        return self.schedule.step(target=self.y) if self.last else self.schedule.step()


def peak_activation_bytes(impl) -> int:
    impl.module.zero_grad(set_to_none=True)
    with SavedActivationMeter([*impl.module.parameters(), impl.x, impl.y]) as meter:
        impl.step()
    return meter.peak_bytes


def check_against_unsplit(args, rank: int) -> dict:
    """Ours (1F1B, m = --memory-m) against the unsplit model on the same batch: loss and this stage's grads."""
    model = build_model(args)
    impl = Ours(model, args, "1f1b", args.memory_m, rank)
    loss = impl.step()
    reference = build_model(args)
    loss_ref = F.cross_entropy(reference(impl.x), impl.y)
    loss_ref.backward()
    grads_ref = {name: p.grad for name, p in reference.named_parameters()}
    mine = {id(p) for p in impl.module.parameters()}
    pairs = [(p.grad, grads_ref[name]) for name, p in model.named_parameters() if id(p) in mine]
    scale = max(float(ref.abs().max()) for _, ref in pairs)
    grad_err = max(float((got - ref).abs().max()) for got, ref in pairs) / scale
    loss_err = None if loss is None else abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    return dict(grad_rel_err=grad_err, loss_rel_err=loss_err,
                ok=grad_err <= REL_TOL and (loss_err is None or loss_err <= REL_TOL))


def rank_main(rank: int, args, store: str, results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.stages,
                            timeout=datetime.timedelta(seconds=120))
    out = dict(rank=rank, check=check_against_unsplit(args, rank))
    alone = StageAlone(args, rank)
    out["rows"] = [measure_row(args, m, rank, alone) for m in args.microbatches]
    out["memory"] = {f"{name}_{schedule}": peak_activation_bytes(cls(build_model(args), args, schedule,
                                                                      args.memory_m, rank))
                     for schedule in SCHEDULES for name, cls in (("ours", Ours), ("torch", Torch))}
    results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def fmt_ms(t: float | None) -> str:
    return f"{t * 1e3:8.1f}" if t is not None else f"{'n/a':>8}"


def fmt_eff(eff: float | None) -> str:
    return f"{eff:5.2f}" if eff is not None else f"{'':>5}"


def fmt_ratio(ratio: float | None, width: int) -> str:
    return f"{ratio:>{width}.2f}x" if ratio is not None else f"{'n/a':>{width + 1}}"


def derive(row: dict, p: int) -> None:
    """Adds the bound, the efficiencies and the ours / torch ratios to a row of medians."""
    ideal = row["m"] * row["t_stage"]
    row["bound"] = row["m"] / (row["m"] + p - 1)
    row.update({f"eff_{k}": ideal / row[k] for k in IMPLS if row[k] is not None})
    row.update({f"ratio_{s}": row[f"ours_{s}"] / row[f"torch_{s}"] if row[f"torch_{s}"] is not None else None
                for s in SCHEDULES})


def report(args, ranks: list[dict], load: tuple[str, str]) -> dict:
    p = args.stages
    rows = ranks[0]["rows"]
    print(f"# pipeline benchmark: p={p} ranks, Gloo on CPU ({os.cpu_count()} cores), {args.threads} thread(s) "
          f"each; torch {torch.__version__}; load average before/after: {load[0]} / {load[1]}")
    print(f"# model: {p * args.layers_per_stage} x (Linear({args.width}, {args.width}) + ReLU), fp32, "
          f"{args.layers_per_stage} per stage; micro-batch {args.microbatch_size} samples; "
          f"medians of {args.steps} rounds after {args.warmup} warm-up rounds")
    for r in ranks:
        c = r["check"]
        loss = "" if c["loss_rel_err"] is None else f", loss rel err {c['loss_rel_err']:.1e}"
        print(f"# check stage {r['rank']} vs unsplit model (1f1b, m={args.memory_m}): grad rel err "
              f"{c['grad_rel_err']:.1e}{loss} -> {'ok' if c['ok'] else 'WRONG'}")
    print("# times in ms; t_stage = slowest stage's fwd+bwd of one micro-batch alone; eff = m * t_stage / step time;")
    print("# bound = m / (m + p - 1); x torch = our step time / torch.distributed.pipelining's")
    print(f"{'m':>3} {'t_stage':>7} {'bound':>6} | {'ours gpipe':>8} {'eff':>5} | {'ours 1f1b':>8} {'eff':>5} | "
          f"{'torch gpipe':>8} {'eff':>5} | {'torch 1f1b':>8} {'eff':>5} | {'x torch gpipe':>13} {'1f1b':>6}")
    for row in rows:
        derive(row, p)
        print(f"{row['m']:>3} {row['t_stage'] * 1e3:7.2f} {row['bound']:6.3f} | "
              + " | ".join(f"{fmt_ms(row[k])} {fmt_eff(row.get(f'eff_{k}'))}" for k in IMPLS) + " | "
              + " ".join(fmt_ratio(row[f"ratio_{s}"], 12) for s in SCHEDULES))
    print(f"# peak saved activations per stage at m={args.memory_m} (KiB)")
    print(f"{'stage':>5} | {'ours gpipe':>10} {'ours 1f1b':>10} | {'torch gpipe':>11} {'torch 1f1b':>11}")
    for r in ranks:
        mem = r["memory"]
        print(f"{r['rank']:>5} | {mem['ours_gpipe'] / 1024:10.0f} {mem['ours_1f1b'] / 1024:10.0f} | "
              f"{mem['torch_gpipe'] / 1024:11.0f} {mem['torch_1f1b'] / 1024:11.0f}")
    targets = acceptance(args, rows, ranks)
    for line in targets["lines"]:
        print(line)
    return dict(load_average=load, rows=rows,
                memory={r["rank"]: r["memory"] for r in ranks}, checks={r["rank"]: r["check"] for r in ranks},
                targets=targets)


def acceptance(args, rows: list[dict], ranks: list[dict]) -> dict:
    """The DESIGN.md targets at m = --memory-m: efficiency within 15% of the bound, <= 1.1x torch, 1F1B memory."""
    m, lines, passed = args.memory_m, [], {}
    row = next((r for r in rows if r["m"] == m), None)
    if row is not None:
        for s in SCHEDULES:
            eff = row[f"eff_ours_{s}"]
            passed[f"efficiency_{s}"] = eff >= 0.85 * row["bound"]
            lines.append(f"# target p={args.stages} m={m} {s}: efficiency {eff:.3f} >= 0.85 x {row['bound']:.3f} = "
                         f"{0.85 * row['bound']:.3f}: {'PASS' if passed[f'efficiency_{s}'] else 'FAIL'}")
            ratio = row[f"ratio_{s}"]
            passed[f"vs_torch_{s}"] = ratio is not None and ratio <= 1.1
            lines.append(f"# target p={args.stages} m={m} {s}: step time {fmt_ratio(ratio, 0)} torch's <= 1.1x: "
                         f"{'PASS' if passed[f'vs_torch_{s}'] else 'FAIL'}")
    lower = all(r["memory"]["ours_1f1b"] < r["memory"]["ours_gpipe"] for r in ranks)
    passed["memory_1f1b_below_gpipe"] = lower
    lines.append(f"# target m={m}: 1F1B peak activations below GPipe's on every stage: {'PASS' if lower else 'FAIL'}")
    return dict(passed=passed, lines=lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=2, help="pipeline stages = ranks (p)")
    p.add_argument("--microbatches", type=parse_range, default=parse_range("1-16"),
                   help='m values, e.g. "1-16" or "2,8"')
    p.add_argument("--microbatch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers-per-stage", type=int, default=4, help="Linear+ReLU blocks per stage")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-m", type=int, default=8, help="m for the memory table, the check and the targets")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="m in {1, 8}, width 256, 2 steps (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.microbatches, args.width, args.steps, args.warmup = [1, 8], 256, 2, 1
    load_before = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="pyparallel-bench-") as tmp:
        procs = [ctx.Process(target=rank_main, args=(rank, args, os.path.join(tmp, "store"), results))
                 for rank in range(args.stages)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            print(f"# a rank failed: exit codes {[proc.exitcode for proc in procs]}", file=sys.stderr)
            return 2
    ranks = sorted((results.get() for _ in range(args.stages)), key=lambda r: r["rank"])
    load_after = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    summary = report(args, ranks, (load_before, load_after))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "json"}, torch=torch.__version__,
                           cmd=" ".join(sys.argv), **summary), f, indent=2)
    wrong = [rank for rank, check in summary["checks"].items() if not check["ok"]]
    if wrong:
        print(f"# stages {wrong} differ from the unsplit model", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
