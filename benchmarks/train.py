"""Training benchmark: communication hooks side by side, under torch's DDP and pyparallel.DataParallel.

Part ``time``: a large MLP (default 3 hidden layers of 2560 units: 13.3M parameters) on digits batches;
for every (wrapper, hook) the slowest rank's median step time over --steps steps after --warmup, the
bytes each rank sent per step, and the speedup over the fp32 allreduce hook with the same wrapper. The
row ``builtin`` is torch DDP without a hook (its own Gloo all-reduce), the baseline users start from.
Part ``curves``: the small default model trained --epochs epochs per hook (pyparallel.DataParallel);
test accuracy and loss per epoch, written to a PNG (--plot) and to the JSON.
Part ``powersgd``: the small default model trained --epochs epochs under torch's DDP with torch's
``powerSGD_hook`` and with ours (default transport and the ring), at each --powersgd-ranks rank, the three
interleaved and repeated --repeats times: final test accuracy and the median step time. (One bucket:
torch's hook deadlocks on Gloo with several.) The time part's powersgd row compresses from step 0.
Part ``ttt``: time to target on the char-level language model for every data-parallel algorithm
(benchmarks/time_to_target.py): torch DDP fp32 sets the target validation loss, every other row (hooks,
PowerSGD, LocalSGD, DiLoCo, torchft's DiLoCo) reports when it got there and how many bytes it had sent.

    python benchmarks/train.py -n 2                       # loopback
    python benchmarks/train.py -n 2 --link-gbit 1 --parts time --json link.json   # root: 1 Gbit/s links
    python benchmarks/train.py -n 2 --parts powersgd --repeats 3                 # ours against torch's PowerSGD
    python benchmarks/train.py -n 4 --link-gbit 1 --parts ttt --json ttt.json    # time to target, 1 Gbit/s links
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import time_to_target  # noqa: E402
from launch import launch  # noqa: E402

HOOKS = ("allreduce", "fp16", "int8", "topk", "powersgd")


def step_times(args, wrapper: str, hook: str) -> dict:
    from pyparallel import train

    cfg = train.parser().parse_args(["--hook", hook, "--ddp", "torch" if hook == "builtin" else wrapper,
                                     "--hidden", str(args.hidden), "--layers", str(args.layers),
                                     "--ratio", str(args.ratio), "--powersgd-rank", str(args.powersgd_ranks[0]),
                                     "--powersgd-start-iter", "0"])
    model, wrapped, state, optimizer = train.build(cfg, torch.device("cpu"))
    x, y, _, _ = train.load_digits_split(cfg.seed)
    rank = dist.get_rank()
    times, sent0 = [], state.bytes_sent if state else 0
    for step in range(args.warmup + args.steps):
        idx = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(x)
        dist.barrier()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(wrapped(x[idx]), y[idx]).backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if step == args.warmup - 1:
            sent0 = state.bytes_sent if state else 0
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    sent = (state.bytes_sent - sent0) / args.steps if state else None
    return dict(wrapper=wrapper, hook=hook, params=sum(p.numel() for p in model.parameters()),
                ms_per_step=t.item() * 1e3, samples_per_s=args.batch_size * dist.get_world_size() / t.item(),
                bytes_per_step=sent, rank=rank)


def curves(args) -> dict:
    from pyparallel import train

    out = {}
    for hook in HOOKS:
        cfg = train.parser().parse_args(["--hook", hook, "--epochs", str(args.epochs), "--ratio", str(args.ratio),
                                         "--no-progress"])
        result = train.run(cfg)
        out[hook] = result["curve"]
    return out


POWERSGD_VARIANTS = (("torch", "torch-powersgd", "auto"), ("ours", "powersgd", "auto"), ("ours", "powersgd", "ring"))


def powersgd(args) -> list[dict]:
    """Torch's powerSGD_hook against ours under torch's DDP, the same model, data, seed and rank."""
    from pyparallel import train

    rows = []
    for rank in args.powersgd_ranks:
        for repeat in range(args.repeats):
            for impl, hook, transport in POWERSGD_VARIANTS:
                cfg = train.parser().parse_args([
                    "--hook", hook, "--ddp", "torch", "--transport", transport, "--powersgd-rank", str(rank),
                    "--epochs", str(args.epochs), "--threads", str(args.threads), "--no-progress"])
                dist.barrier()
                result = train.run(cfg)
                t = torch.tensor([result["seconds_per_step"]], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
                rows.append(dict(rank=rank, repeat=repeat, impl=impl, transport=transport,
                                 test_accuracy=result["test_accuracy"], ms_per_step=t.item() * 1e3,
                                 bytes_per_step=result["bytes_sent_per_step"], steps=result["steps"]))
    return rows


def print_powersgd(rows: list[dict], args) -> None:
    print(f"# PowerSGD on digits, torch DDP, {args.ranks} ranks, {args.epochs} epochs, start_powerSGD_iter 10, "
          f"median of {args.repeats} interleaved runs")
    print(f"# {'rank':>4} {'hook':<6} {'transport':<9} {'accuracy':>9} {'ms/step':>8} {'vs torch':>8} "
          f"{'bytes/step/rank':>15}")
    for rank in args.powersgd_ranks:
        base = None
        for impl, _, transport in POWERSGD_VARIANTS:
            mine = [r for r in rows if r["rank"] == rank and r["impl"] == impl and r["transport"] == transport]
            ms = statistics.median(r["ms_per_step"] for r in mine)
            accs = sorted({round(100 * r["test_accuracy"], 2) for r in mine})
            base = ms if impl == "torch" else base
            sent = mine[0]["bytes_per_step"]
            print(f"  {rank:>4} {impl:<6} {transport if impl == 'ours' else 'gloo':<9} "
                  f"{'/'.join(f'{a:.2f}' for a in accs):>9} {ms:>8.2f} {base / ms:>7.2f}x "
                  f"{f'{sent:,.0f}' if sent is not None else '-':>15}", flush=True)


def plot(curve_by_hook: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    styles = ["-", "--", "-.", ":"]
    for i, (hook, curve) in enumerate(curve_by_hook.items()):
        epochs = [c["epoch"] + 1 for c in curve]
        style = dict(marker="os^D"[i % 4], ms=3, ls=styles[i % 4], label=hook)
        acc_ax.plot(epochs, [100 * c["test_accuracy"] for c in curve], **style)
        loss_ax.plot(epochs, [c["loss"] for c in curve], **style)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits, test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss (last batch)", yscale="log", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def worker(args) -> int:
    import pyparallel  # noqa: F401

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=900))
    rank = dist.get_rank()
    link = "loopback" if args.link_gbit is None else f"{args.link_gbit} Gbit/s"
    report = dict(ranks=args.ranks, link=link, threads=args.threads, cmd=args.cmd)
    if "time" in args.parts:
        rows = []
        if rank == 0:
            print(f"# step time, {args.ranks} ranks, {link}, batch {args.batch_size}/rank, median of {args.steps} steps")
            print(f"# {'wrapper':<10} {'hook':<9} {'params':>8} {'ms/step':>9} {'samples/s':>9} "
                  f"{'bytes/step/rank':>15} {'vs fp32':>7}", flush=True)
        for wrapper in ("torch", "pyparallel"):
            hooks = (("builtin",) if wrapper == "torch" else ()) + HOOKS
            base = None
            for hook in hooks:
                row = step_times(args, wrapper, hook)
                if hook == "allreduce":
                    base = row["ms_per_step"]
                rows.append(row)
                if rank == 0:
                    vs = f"{base / row['ms_per_step']:.2f}x" if base and hook != "builtin" else "-"
                    sent = f"{row['bytes_per_step']:,.0f}" if row["bytes_per_step"] is not None else "-"
                    print(f"  {wrapper:<10} {hook:<9} {row['params'] / 1e6:>7.1f}M {row['ms_per_step']:>9.1f} "
                          f"{row['samples_per_s']:>9.0f} {sent:>15} {vs:>7}", flush=True)
        report["step_time"] = rows
    if "curves" in args.parts:
        curve_by_hook = curves(args)
        report["curves"] = curve_by_hook
        if rank == 0:
            print(f"# convergence on digits, {args.epochs} epochs, final test accuracy:")
            for hook, curve in curve_by_hook.items():
                print(f"  {hook:<9} {100 * curve[-1]['test_accuracy']:6.2f}%")
            if args.plot:
                plot(curve_by_hook, args.plot, f"pyparallel hooks, {args.ranks} ranks")
                print(f"# wrote {args.plot}")
    if "powersgd" in args.parts:
        rows = powersgd(args)
        report["powersgd"] = rows
        if rank == 0:
            print_powersgd(rows, args)
    if "ttt" in args.parts:
        report["time_to_target"] = time_to_target.run_all(args)
        if rank == 0 and args.ttt_plot:
            link = "loopback" if args.link_gbit is None else f"{args.link_gbit:g} Gbit/s links"
            time_to_target.plot(report["time_to_target"], args.ttt_plot,
                                f"charlm (2.5M parameters), {args.ranks} ranks, {link}")
            print(f"# wrote {args.ttt_plot}")
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--parts", default="time,curves", help="comma list of: time, curves, powersgd, ttt")
    p.add_argument("--hidden", type=int, default=2560, help="step-time model: hidden units")
    p.add_argument("--layers", type=int, default=3, help="step-time model: hidden layers")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20, help="curves: epochs per hook")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k ratio")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--powersgd-ranks", type=lambda v: [int(x) for x in v.split(",")], default=[2, 4],
                   help="powersgd: comma list of matrix approximation ranks (the time part uses the first)")
    p.add_argument("--repeats", type=int, default=3, help="powersgd: runs of each variant")
    time_to_target.add_arguments(p)
    p.add_argument("--ttt-plot", metavar="PNG", default="bench-out/time_to_target.png")
    p.add_argument("--link-gbit", type=float, default=None, help="emulate links of this many Gbit/s (root)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", default="bench-out/train_curves.png")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.cmd = " ".join(["benchmarks/train.py"] + argv[: argv.index("--worker")])
        return worker(args)
    for path in (args.plot, args.ttt_plot):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return launch(__file__, argv, args.ranks, args.link_gbit, timeout_s=3600)


if __name__ == "__main__":
    sys.exit(main())
