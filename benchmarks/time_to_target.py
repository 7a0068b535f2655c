"""Time-to-target (benchmarks/train.py --parts ttt): every way pyparallel trains data-parallel, and the
anchors, on the char-level language model, until they reach the validation loss that DDP fp32 reaches.

Row 1 is torch's DDP with its own Gloo all-reduce, trained ``--ttt-steps`` steps: its final validation
loss is the target and its training time the reference. Every other row trains with the same data, seed,
inner optimizer (AdamW) and per-rank batch until ``--ttt-budget`` times that reference time has passed (at
most ``--ttt-max-steps`` steps) and reports when it first reached the target (evaluations every
``--ttt-eval-every`` steps, not timed), the bytes it had sent by then, and its final quality. LocalSGD and
DiLoCo are evaluated on their consensus model (the last synchronised parameters).

Bytes: with emulated links (``--link-gbit``) every rank is alone in a network namespace and we read what
its link carried (payload and TCP/IP headers, measured the same way for every row, torch's and torchft's
included). On loopback the ranks share ``lo``, so bytes are the algorithms' own counters (our shared-memory
transport counts none: nothing goes through a socket); torch's built-in all-reduce is counted as the ring
it runs (2 (n-1)/n of the gradient per step) and torch's PowerSGD is not counted.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from netns import wire_tx_bytes

H10, H50 = ["--sync-every", "10"], ["--sync-every", "50"]
INT8, OVERLAP = ["--compression", "int8"], ["--overlap"]
ROWS = (  # (name, pyparallel.train options); None: torchft's DiLoCo (benchmarks/torchft_diloco.py)
    ("ddp fp32 (torch)", ["--hook", "builtin"]),
    ("int8 hook", ["--hook", "int8"]),
    ("topk hook", ["--hook", "topk"]),
    ("powerSGD (torch)", ["--hook", "torch-powersgd"]),
    ("powerSGD", ["--hook", "powersgd"]),
    ("localsgd H=10", ["--algo", "localsgd"] + H10),
    ("localsgd H=50", ["--algo", "localsgd"] + H50),
    ("localsgd H=50 int8", ["--algo", "localsgd"] + H50 + INT8),
    ("diloco H=10", ["--algo", "diloco"] + H10),
    ("diloco H=10 int8", ["--algo", "diloco"] + H10 + INT8),
    ("diloco H=10 overlap", ["--algo", "diloco"] + H10 + OVERLAP),
    ("diloco H=10 int8 overlap", ["--algo", "diloco"] + H10 + INT8 + OVERLAP),
    ("diloco H=50", ["--algo", "diloco"] + H50),
    ("diloco H=50 int8", ["--algo", "diloco"] + H50 + INT8),
    ("diloco H=50 overlap", ["--algo", "diloco"] + H50 + OVERLAP),
    ("diloco H=50 int8 overlap", ["--algo", "diloco"] + H50 + INT8 + OVERLAP),
    # The outer step that suits this short run (a dozen outer steps): averaging, no outer momentum.
    ("diloco H=50 int8 overlap lr1 m0", ["--algo", "diloco"] + H50 + INT8 + OVERLAP
     + ["--outer-lr", "1", "--outer-momentum", "0"]),
    # Streaming DiLoCo's tau: the int8 sync lands 2 inner steps after its launch instead of a round later.
    ("diloco H=50 int8 overlap(2)", ["--algo", "diloco"] + H50 + INT8 + OVERLAP + ["--overlap-steps", "2"]),
    ("diloco H=50 int8 overlap(2) lr1 m0", ["--algo", "diloco"] + H50 + INT8 + OVERLAP + ["--overlap-steps", "2"]
     + ["--outer-lr", "1", "--outer-momentum", "0"]),
    ("diloco H=50 (torchft)", None),
)


def add_arguments(p) -> None:
    p.add_argument("--ttt-steps", type=int, default=600, help="ttt: steps of the DDP fp32 row (sets the target)")
    p.add_argument("--ttt-budget", type=float, default=1.0,
                   help="ttt: every other row trains this many times DDP fp32's training time")
    p.add_argument("--ttt-max-steps", type=int, default=3000, help="ttt: and at most this many steps")
    p.add_argument("--ttt-eval-every", type=int, default=25, help="ttt: steps between evaluations")
    p.add_argument("--ttt-batch-size", type=int, default=4, help="ttt: sequences of 64 bytes per rank and step")
    p.add_argument("--ttt-seed", type=int, default=0, help="ttt: seed of the model's initialisation and the data order")
    p.add_argument("--ttt-rows", default=None,
                   help="ttt: comma list of row names to run (the first must be the DDP fp32 row); default all")


def _train_options(args, max_steps: int) -> list[str]:
    every = args.ttt_eval_every
    return ["--task", "charlm", "--ddp", "torch", "--batch-size", str(args.ttt_batch_size),
            "--steps-per-epoch", str(every), "--epochs", str(math.ceil(max_steps / every)),
            "--threads", str(args.threads), "--seed", str(args.ttt_seed), "--no-progress"]


def _points(result: dict, start_wire: int | None, analytic_per_step: float | None) -> list[dict]:
    """(seconds, bytes, val_loss) at every evaluation; bytes from the link when there is one."""
    points = []
    for c in result["curve"]:
        if start_wire is not None:
            sent = c["wire_bytes"] - start_wire
        elif c["bytes_sent"] is not None:
            sent = c["bytes_sent"]
        else:
            sent = c["step"] * analytic_per_step if analytic_per_step is not None else None
        points.append(dict(step=c["step"], seconds=c["seconds"], bytes=sent, val_loss=c["val_loss"]))
    return points


def run_row(args, name: str, options, max_steps: int, max_seconds: float | None) -> dict:
    from pyparallel import train

    world = dist.get_world_size()
    cfg = train.parser().parse_args(_train_options(args, max_steps) + (options or []) + (
        ["--max-seconds", str(max_seconds)] if max_seconds else []) + ["--max-steps", str(max_steps)])
    start_wire = wire_tx_bytes() if args.link_gbit is not None else None  # this host's own eth0 is no link of ours
    dist.barrier()
    if options is None:
        import torchft_diloco

        try:
            result = torchft_diloco.run(cfg, sync_every=50, wire_bytes=wire_tx_bytes if start_wire is not None else None)
        except Exception as exc:  # noqa: BLE001  (reported in the table: why torchft's DiLoCo did not run)
            return dict(name=name, error=f"{type(exc).__name__}: {exc}")
    else:
        result = train.run(cfg, wire_bytes=wire_tx_bytes if start_wire is not None else None)
    analytic = None
    if options == ["--hook", "builtin"]:  # Gloo's ring: 2 (n-1)/n of the fp32 gradient per step
        analytic = 2 * (world - 1) / world * 4 * result["parameters"]
    points = _points(result, start_wire, analytic)
    t = torch.tensor([result["seconds_per_step"] or 0.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(name=name, points=points, steps=result["steps"], ms_per_step=1e3 * t.item(),
                final_val_loss=result["val_loss"], parameters=result["parameters"])


def reached(row: dict, target: float) -> dict | None:
    """The first evaluation at or below the target loss, or None."""
    return next((p for p in row.get("points", []) if p["val_loss"] <= target), None)


def run_all(args) -> dict:
    names = [n for n, _ in ROWS] if not args.ttt_rows else [n.strip() for n in args.ttt_rows.split(",")]
    options = dict(ROWS)
    unknown = [n for n in names if n not in options]
    if unknown or names[0] != ROWS[0][0]:
        raise SystemExit(f"--ttt-rows: unknown {unknown} or first row not {ROWS[0][0]!r}; rows: {list(options)}")
    rows = [run_row(args, names[0], options[names[0]], args.ttt_steps, None)]
    # The target is the same on every rank (the evaluation all-reduces); the time is rank 0's.
    reference = torch.tensor([rows[0]["points"][-1]["seconds"]], dtype=torch.float64)
    dist.broadcast(reference, 0)
    target, reference = rows[0]["points"][-1]["val_loss"], reference.item()
    if dist.get_rank() == 0:
        print_header(args, target, reference)
        print_row(rows[0], rows[0], target)
    for name in names[1:]:
        rows.append(run_row(args, name, options[name], args.ttt_max_steps, args.ttt_budget * reference))
        if dist.get_rank() == 0:
            print_row(rows[-1], rows[0], target)
    return dict(target_val_loss=target, reference_seconds=reference, rows=rows)


def print_header(args, target: float, reference: float) -> None:
    link = "loopback" if args.link_gbit is None else f"{args.link_gbit:g} Gbit/s links"
    print(f"# time to target: charlm, {args.ranks} ranks, {link}, batch {args.ttt_batch_size}x64 bytes per rank, "
          f"target = DDP fp32's validation loss after {args.ttt_steps} steps = {target:.4f} (reached in "
          f"{reference:.1f} s); others train <= {args.ttt_budget:g}x that long; evaluation every "
          f"{args.ttt_eval_every} steps")
    print(f"# {'row':<32} {'ms/step':>8} {'to target':>10} {'vs ddp':>7} {'MB to target':>12} {'fewer bytes':>11} "
          f"{'steps':>6} {'final loss':>10}", flush=True)


def _outcome(row: dict, ddp: dict, target: float, mb_digits: int) -> list[str]:
    """A row's time to target, its ratio to DDP's time, the MB it had sent by then and how many times
    fewer than DDP ("-" where it did not get there or nothing was counted)."""
    hit, ddp_hit = reached(row, target), ddp["points"][-1]
    return [f"{hit['seconds']:.1f} s" if hit else "not reached",
            f"{hit['seconds'] / ddp_hit['seconds']:.2f}" if hit else "-",
            f"{hit['bytes'] / 1e6:.{mb_digits}f}" if hit and hit["bytes"] is not None else "-",
            f"{ddp_hit['bytes'] / hit['bytes']:.0f}x" if hit and hit["bytes"] and ddp_hit["bytes"] else "-"]


def print_row(row: dict, ddp: dict, target: float) -> None:
    if "error" in row:
        print(f"  {row['name']:<32} did not run: {row['error']}", flush=True)
        return
    when, ratio, mb, fewer = _outcome(row, ddp, target, mb_digits=2)
    print(f"  {row['name']:<32} {row['ms_per_step']:>8.1f} {when:>10} {ratio:>7} {mb:>12} {fewer:>11} "
          f"{row['steps']:>6} {row['final_val_loss']:>10.4f}", flush=True)


def plot(report: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, row in enumerate(r for r in report["rows"] if "points" in r):
        style = dict(color=cmap(i % 20), lw=2.2 if "ddp" in row["name"] or "H=50 int8 overlap" in row["name"] else 1.2,
                     ls="-" if i < 10 else "--", label=row["name"])
        pts = row["points"]
        time_ax.plot([p["seconds"] for p in pts], [p["val_loss"] for p in pts], **style)
        with_bytes = [p for p in pts if p["bytes"]]
        if with_bytes:
            bytes_ax.plot([p["bytes"] / 1e6 for p in with_bytes], [p["val_loss"] for p in with_bytes], **style)
    for ax in (time_ax, bytes_ax):
        ax.axhline(report["target_val_loss"], color="k", lw=0.8, ls=":")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_ylim(top=min(3.2, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    time_ax.set(xlabel="training wall-clock time (s)", title="quality against time")
    bytes_ax.set(xlabel="MB sent per rank", xscale="log", title="quality against bytes sent")
    bytes_ax.set_xlim(left=1)
    bytes_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    """The table of a report as Markdown (for the README)."""
    ttt = report["time_to_target"]
    lines = ["| row | ms / step | time to target | vs DDP | MB sent to target | fewer bytes | steps run | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in ttt["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | did not run: {row['error']} | | | | | | |")
            continue
        cells = [row["name"], f"{row['ms_per_step']:.0f}"] + _outcome(row, ttt["rows"][0], ttt["target_val_loss"], 1)
        lines.append("| " + " | ".join(cells + [str(row["steps"]), f"{row['final_val_loss']:.3f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python benchmarks/time_to_target.py REPORT.json [--plot PNG] [--markdown]
    import argparse
    import json

    p = argparse.ArgumentParser(description="redraw the plot or print the table of a benchmarks/train.py --json report")
    p.add_argument("report")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--markdown", action="store_true")
    cli = p.parse_args()
    with open(cli.report) as f:
        saved = json.load(f)
    if cli.plot:
        where = "loopback" if saved["link"] == "loopback" else f"{saved['link']} links"
        plot(saved["time_to_target"], cli.plot, f"charlm (2.5M parameters), {saved['ranks']} ranks, {where}")
    if cli.markdown:
        print(markdown(saved))
