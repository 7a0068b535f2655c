"""Soak test: many training steps of every communication hook through pyparallel.DataParallel, watching
each rank's resident memory, open file descriptors and threads (psutil) for leaks.

For each hook (allreduce, fp16, bf16, int8, topk, and powersgd when pyparallel.hooks has it) every rank
trains a small digits MLP for --steps steps with a fresh DataParallel and hook state. The process is
sampled after --warmup steps (start: the buffers, worker thread and transport resources exist by then),
at the midpoint and at the end. A hook is flat when the descriptors and threads at the end equal those at
the start and RSS grew by at most --rss-slack-mib over the second half of the run (allocator noise;
a leak of 100 bytes per step over 5000 steps would already show). Printed as a table, rank by rank maxima;
--json writes every sample. Exit status 1 when a hook is not flat.

    python benchmarks/soak.py                      # 10000 steps per hook, 2 ranks, the ring transport
    python benchmarks/soak.py --steps 2000 --transport auto --json soak.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import launch  # noqa: E402

MIB = 1 << 20


def hook_table(transport: str) -> dict:
    """name -> (hook, state factory) for every hook this build of pyparallel has."""
    from pyparallel import hooks

    table = {
        "allreduce": (hooks.allreduce_hook, lambda: hooks.HookState(transport=transport)),
        "fp16": (hooks.fp16_hook, lambda: hooks.HookState(transport=transport)),
        "bf16": (hooks.bf16_hook, lambda: hooks.HookState(transport=transport)),
        "int8": (hooks.int8_hook, lambda: hooks.Int8State(transport=transport)),
        "topk": (hooks.topk_hook, lambda: hooks.TopkState(ratio=0.01, transport=transport)),
    }
    if hasattr(hooks, "powersgd_hook") and hasattr(hooks, "PowerSGDState"):
        table["powersgd"] = (hooks.powersgd_hook, lambda: hooks.PowerSGDState(transport=transport))
    return table


def sample(proc) -> dict:
    return {"rss": proc.memory_info().rss, "fds": proc.num_fds(), "threads": proc.num_threads()}


def soak_one(args, name: str, hook, make_state, proc) -> dict:
    from pyparallel import DataParallel
    from pyparallel.train import load_digits_split, make_model

    x, y, _, _ = load_digits_split(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(args.hidden, 1, seed=0)
    dp = DataParallel(model, comm_hook=hook, hook_state=make_state())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    marks = {args.warmup: "start", args.warmup + args.steps // 2: "mid", args.warmup + args.steps: "end"}
    samples, t0 = {}, None
    for step in range(args.warmup + args.steps + 1):
        if step in marks:
            samples[marks[step]] = sample(proc)
            if marks[step] == "start":
                t0 = time.perf_counter()
        if step == args.warmup + args.steps:
            break
        lo = (step * world + rank) * args.batch_size % (len(x) - args.batch_size)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(dp(x[lo:lo + args.batch_size]), y[lo:lo + args.batch_size]).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    return {"hook": name, "rank": rank, "steps": args.steps, "ms_per_step": 1e3 * seconds / args.steps, **samples}


def flat(row: dict, slack: int) -> bool:
    s, m, e = row["start"], row["mid"], row["end"]
    return e["fds"] == s["fds"] and e["threads"] == s["threads"] and e["rss"] - m["rss"] <= slack


def worker(args) -> int:
    import psutil

    import pyparallel  # noqa: F401

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=300))
    proc = psutil.Process()
    rank = dist.get_rank()
    slack = int(args.rss_slack_mib * MIB)
    table = hook_table(args.transport)
    names = [h for h in args.hooks.split(",") if h] if args.hooks else list(table)
    if rank == 0:
        print(f"# soak: {args.ranks} ranks, transport {args.transport}, {args.steps} steps per hook after "
              f"{args.warmup} warm-up steps, MLP 64-{args.hidden}-10, batch {args.batch_size}/rank; maxima over ranks")
        print(f"# {'hook':<9} {'ms/step':>7} {'RSS start':>10} {'RSS end':>10} {'2nd half':>9} "
              f"{'fds':>9} {'threads':>9}  flat", flush=True)
    rows, ok = [], True
    for name in names:
        if name not in table:
            if rank == 0:
                print(f"  {name:<9} (not in this build of pyparallel.hooks: skipped)", flush=True)
            continue
        mine = soak_one(args, name, *table[name], proc)
        everyone: list = [None] * args.ranks
        dist.all_gather_object(everyone, mine)
        rows += everyone
        is_flat = all(flat(r, slack) for r in everyone)
        ok &= is_flat
        if rank == 0:
            worst = max(everyone, key=lambda r: r["end"]["rss"] - r["mid"]["rss"])
            s, e = worst["start"], worst["end"]
            fds = f"{max(r['start']['fds'] for r in everyone)}->{max(r['end']['fds'] for r in everyone)}"
            threads = f"{max(r['start']['threads'] for r in everyone)}->{max(r['end']['threads'] for r in everyone)}"
            print(f"  {name:<9} {max(r['ms_per_step'] for r in everyone):>7.2f} {s['rss'] / MIB:>8.1f}Mi "
                  f"{e['rss'] / MIB:>8.1f}Mi {(e['rss'] - worst['mid']['rss']) / 1024:>+7.0f}Ki {fds:>9} "
                  f"{threads:>9}  {'yes' if is_flat else 'NO'}", flush=True)
    if rank == 0:
        print(f"# {'flat' if ok else 'NOT flat'}: descriptors and threads unchanged, RSS grew <= "
              f"{args.rss_slack_mib} MiB over each hook's second half" if ok else
              "# NOT flat: see the rows marked NO", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cmd": args.cmd, "ranks": args.ranks, "transport": args.transport, "steps": args.steps,
                           "warmup": args.warmup, "rss_slack_mib": args.rss_slack_mib, "flat": ok, "rows": rows}, f,
                          indent=2)
    dist.destroy_process_group()
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10000, help="measured steps per hook")
    p.add_argument("--warmup", type=int, default=100, help="steps before the start sample")
    p.add_argument("--hooks", default="", help="comma list (default: every hook pyparallel.hooks has)")
    p.add_argument("--transport", default="ring", choices=["auto", "ring", "shm", "hierarchical"],
                   help="ring (default) runs the hooks' compression; auto/shm reduce exactly through shared memory")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--rss-slack-mib", type=float, default=1.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or args.warmup < 0:
        p.error("--steps must be >= 2 and --warmup >= 0")
    if args.worker:
        args.cmd = " ".join(["benchmarks/soak.py"] + argv[: argv.index("--worker")])
        return worker(args)
    return launch(__file__, argv, args.ranks, None, timeout_s=24 * 3600)


if __name__ == "__main__":
    sys.exit(main())
