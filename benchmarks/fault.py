"""Fault-tolerance benchmark: torchft replicas training digits while one of them is SIGKILLed.

For every hook (default int8 and top-k), two runs of ``python -m pyparallel.train --fault-tolerant``:
an uninterrupted one and one in which replica ``--kill-replica`` SIGKILLs itself in step ``--kill-at-step``
(after its forward pass, while its peers wait in the step's collectives). The launcher restarts it; it
rejoins the next quorum and heals from a live peer (model, optimizer, hook state). Reported per run:

* longest stall: the longest wall-clock gap between two consecutive committed steps of a surviving
  replica (goal: below the group timeout + 5 s);
* the steps with every replica and the step at which the restarted replica rejoined;
* final test accuracy and its difference to the uninterrupted run (goal: within 1 point);
* whether every replica that finished holds bitwise-equal parameters (the run fails otherwise).

Replicas reduce with ``--transport ring`` by default: on this one machine ``auto`` would pick shared
memory, which is exact (compression applies across hosts only), while replicas stand for hosts.

With ``--ranks-per-replica L`` (L > 1) every replica is L processes whose gradients are summed exactly
through shared memory, and the hook's compression applies across replicas (transport ``auto``); the
killed replica's processes die and restart together, and "parameters equal" covers every rank of every
replica that finished.

    python benchmarks/fault.py                                   # int8 and top-k, 3 replicas
    python benchmarks/fault.py --hooks int8 --json fault.json --plot docs/fault_tolerance.png
    python benchmarks/fault.py --ranks-per-replica 2             # 3 replicas x 2 ranks (shared memory inside)
    python benchmarks/fault.py --algo diloco --sync-every 20 --compressions int8   # rounds instead of steps

With ``--algo localsgd | diloco`` (Note [Rounds under torchft], managed_local_sgd.py) a torchft step is a
round of ``--sync-every`` inner steps: "steps", "all in", "rejoin" and the stall count rounds (the stall
then includes one round's training; "median s" is the usual gap between two committed rounds), the
killed replica dies in inner step ``--kill-at-step``, and the rows are the ``--compressions`` of the
synchronisation instead of ``--hooks``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def run_once(args, item: str, kill: bool) -> dict:
    """One run; ``item`` is the hook (--algo ddp) or the synchronisation's compression (localsgd, diloco)."""
    from pyparallel import train, train_fault_tolerant

    what = ["--hook", item] if args.algo == "ddp" else ["--algo", args.algo, "--sync-every", str(args.sync_every),
                                                        "--compression", item]
    argv = ["--fault-tolerant", "--replicas", str(args.replicas), "--ranks-per-replica", str(args.ranks_per_replica),
            "--min-replicas", str(args.min_replicas), *what,
            "--ratio", str(args.ratio), "--epochs", str(args.epochs), "--hidden", str(args.hidden),
            "--transport", args.transport, "--timeout", str(args.timeout), "--threads", "1", "--no-progress",
            "--max-restarts", "3"]
    if kill:
        argv += ["--kill-at-step", str(args.kill_at_step), "--kill-replica", str(args.kill_replica),
                 "--kill-local-rank", str(args.kill_local_rank)]
    cfg = train.resolve_defaults(train.parser().parse_args(argv))  # the task's epochs, batch size, lr
    t0 = time.time()
    summary = train_fault_tolerant.launch(cfg)
    summary["wall_s"] = time.time() - t0
    summary["killed"] = kill
    summary["median_gap_s"] = median_gap(summary["steps_log"])
    return summary


def median_gap(log: list[dict]) -> float:
    """The median wall-clock gap between two consecutive committed steps of one replica incarnation."""
    by_life: dict = {}
    for e in log:
        if e["committed"]:
            by_life.setdefault((e["replica"], e["incarnation"]), []).append(e["end"])
    gaps = sorted(t1 - t0 for ends in by_life.values() for t0, t1 in zip(sorted(ends), sorted(ends)[1:]))
    return gaps[len(gaps) // 2] if gaps else 0.0


def plot(runs: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    killed = [r for r in runs if r["killed"]]
    fig, axes = plt.subplots(2, len(killed), figsize=(6 * len(killed), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for col, run in enumerate(killed):
        steps_ax, part_ax = axes[0][col], axes[1][col]
        log = run["steps_log"]
        t0 = min(e["start"] for e in log)
        for replica in range(run["replicas"]):
            for incarnation in sorted({e["incarnation"] for e in log if e["replica"] == replica}):
                pts = [(e["end"] - t0, e["step"]) for e in log
                       if e["replica"] == replica and e["incarnation"] == incarnation and e["committed"]]
                if pts:  # the replicas' curves coincide (they commit the same steps): widths tell them apart
                    label = f"replica {replica}" + (f" (restart {incarnation})" if incarnation else "")
                    steps_ax.plot(*zip(*pts), ls="-" if incarnation == 0 else "--", color=colors[replica % 5],
                                  label=label, lw=5 - 1.5 * replica if incarnation == 0 else 2)
        marks = []
        kill_t = [e["end"] - t0 for e in log if e["replica"] == args.kill_replica and e["incarnation"] == 0]
        if kill_t:
            marks.append((max(kill_t), f"replica {args.kill_replica} SIGKILLed"))
        back = [e["end"] - t0 for e in log if e["incarnation"] > 0 and e["committed"]]
        if back:
            marks.append((min(back), "restarted replica healed, back in the quorum"))
        for t, text in marks:
            steps_ax.axvline(t, color="k", ls=":", lw=1)
            steps_ax.annotate(text, (t, 0), rotation=90, va="bottom", ha="right", fontsize=8)
        unit = "step" if run.get("algo", "ddp") == "ddp" else "round"
        steps_ax.set(xlabel="seconds since the first step", ylabel=f"committed {unit}",
                     title=f"{run['hook']}{' hook' if unit == 'step' else ''}: longest stall "
                           f"{run['longest_stall_s']:.2f} s, accuracy {100 * run['test_accuracy']:.1f}%")
        steps_ax.grid(alpha=0.3)
        steps_ax.legend(fontsize=8)
        part = run["participants_per_step"]
        part_ax.step(range(len(part)), part, where="post")
        part_ax.set(xlabel=unit, ylabel="replicas", ylim=(0, run["replicas"] + 0.5))
        part_ax.grid(alpha=0.3)
    per = f" of {args.ranks_per_replica} ranks" if args.ranks_per_replica > 1 else ""
    inner = "" if args.algo == "ddp" else "inner "
    fig.suptitle(f"{args.replicas} torchft replicas{per} on digits, one SIGKILLed in {inner}step {args.kill_at_step} "
                 f"(group timeout {args.timeout:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", default="int8,topk", help="comma list of hooks (--algo ddp)")
    p.add_argument("--algo", choices=["ddp", "localsgd", "diloco"], default="ddp",
                   help="ddp: a hook per step; localsgd / diloco: rounds of --sync-every inner steps")
    p.add_argument("--sync-every", type=int, default=20, help="localsgd / diloco: inner steps per round")
    p.add_argument("--compressions", default="int8",
                   help="localsgd / diloco: comma list of the synchronisation's compressions (none, int8, topk)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--ranks-per-replica", type=int, default=1,
                   help="processes per replica (shared memory inside, the hook's compression across replicas)")
    p.add_argument("--min-replicas", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.01, help="top-k ratio")
    p.add_argument("--kill-at-step", type=int, default=100)
    p.add_argument("--kill-replica", type=int, default=1)
    p.add_argument("--kill-local-rank", type=int, default=0, help="which process of the killed replica dies")
    p.add_argument("--timeout", type=float, default=5.0, help="process-group and manager timeout (s)")
    p.add_argument("--transport", default=None,
                   help="default: ring with one rank per replica (replicas stand for hosts), else auto")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="default: docs/fault_tolerance.png (L ranks per replica: docs/fault_tolerance_<L>ranks.png)")
    args = p.parse_args(argv)
    if args.transport is None:
        args.transport = "ring" if args.ranks_per_replica == 1 else "auto"
    if args.algo != "ddp" and args.ranks_per_replica != 1:
        p.error("--algo localsgd / diloco runs one rank per replica")
    if args.plot is None:
        args.plot = ("docs/fault_tolerance.png" if args.ranks_per_replica == 1 else
                     f"docs/fault_tolerance_{args.ranks_per_replica}ranks.png")
        if args.algo != "ddp":
            args.plot = f"docs/fault_tolerance_{args.algo}.png"

    runs = []
    each = "one rank each" if args.ranks_per_replica == 1 else f"{args.ranks_per_replica} ranks each"
    print(f"# {args.replicas} replicas (torchft, {each}, Gloo, --transport {args.transport}), digits, "
          f"{args.epochs} epochs, group timeout {args.timeout:g} s; replica {args.kill_replica}"
          + (f" (local rank {args.kill_local_rank})" if args.ranks_per_replica > 1 else "")
          + (" SIGKILLed in step " if args.algo == "ddp" else " SIGKILLed in inner step ")
          + f"{args.kill_at_step}, restarted by the launcher"
          + ("" if args.algo == "ddp" else f"; {args.algo}, rounds of {args.sync_every} inner steps (steps below are "
                                           "rounds)"), flush=True)
    width = 8 if args.algo == "ddp" else 20
    print(f"# {'hook' if args.algo == 'ddp' else 'algorithm':<{width}} {'run':<13} {'steps':>5} {'all in':>6} "
          f"{'rejoin':>6} {'stall s':>7} {'goal':>4} {'median s':>8} {'acc %':>6} {'d acc':>6} {'goal':>4} "
          f"{'equal':>5} {'wall s':>6}", flush=True)
    failures = []
    for hook in (args.hooks if args.algo == "ddp" else args.compressions).split(","):
        base = None
        for kill in (False, True):
            run = run_once(args, hook, kill)
            runs.append(run)
            if not kill:
                base = run["test_accuracy"]
            full = sum(1 for n in run["participants_per_step"] if n == run["replicas"])
            rejoin = ",".join(str(s) for steps in run["rejoined_at_step"].values() for s in steps) or "-"
            stall_ok = run["longest_stall_s"] < args.timeout + 5
            delta = 100 * (run["test_accuracy"] - base)
            acc_ok = abs(delta) <= 1.0
            finished = len(run["parameter_digests"]) == args.replicas * args.ranks_per_replica
            print(f"  {run['hook']:<{width}} {'killed+heal' if kill else 'uninterrupted':<13} {run['steps']:>5} "
                  f"{full:>6} {rejoin:>6} {run['longest_stall_s']:>7.2f} {'ok' if stall_ok else 'MISS':>4} "
                  f"{run['median_gap_s']:>8.2f} "
                  f"{100 * run['test_accuracy']:>6.2f} {delta:>+6.2f} {'ok' if acc_ok else 'MISS':>4} "
                  f"{'yes' if run['parameters_equal'] else 'NO':>5} {run['wall_s']:>6.1f}", flush=True)
            if not run["parameters_equal"]:
                failures.append(f"{hook}: ranks finished with different parameters")
            if kill and not finished:
                failures.append(f"{hook}: only ranks {sorted(run['parameter_digests'], key=str)} finished "
                                "(replica.local rank)")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(runs, args.plot, args)
        print(f"# wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    for failure in failures:
        print(f"# FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
