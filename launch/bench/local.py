"""Local steps (DiLoCo) with fp32 or 3LC outer syncs: validation loss against whole-run bytes,
beside per-step allreduce and per-step 3LC with ``threelc.optim.AdamW``.

::

    python -m threelc.launch.bench.local --out runs/bench_local --steps 1000

Each run is ``torchrun --nproc-per-node 4 -m threelc.launch.examples.train_text --optimizer adamw
--local-steps H --outer {fp32,3lc}`` (AdamW inner, lr 1e-3, batch 32 per rank, as
:mod:`threelc.launch.bench.adamw` trains; outer Nesterov SGD lr 0.7, momentum 0.9) into
``{out}/text-{variant}-seed{seed}``, the folder naming of the AdamW benchmark, so its per-step
folders (:data:`PER_STEP`: ``text-allreduce-seed*``, ``text-ours-f20-doubling-seed*``,
``text-powersgd-r1-seed*``, ``text-powersgd-r4-seed*``) can be copied in and are read as they
are; missing baselines are trained.  A folder that holds ``final.json`` is reused.
Loss and bytes are measured exactly as the AdamW benchmark measures them
(:func:`threelc.launch.bench.runfolders.measure`: every rank's ``hook-rank*.jsonl`` summed over the
run, warm-up allreduces and outer syncs included, mean over ranks).

The ``link s`` columns are the whole-run bytes of one rank divided by a link rate: the time the
bytes alone occupy a 100 Mbit/s or 10 Mbit/s link, not a wall time.  Wall time on slow links
needs a quiet machine: ``--emulate 100mbit`` (root) runs the same plan on 4 emulated nodes
(:mod:`threelc.launch.cluster.emulate`) into ``{out}/emulated-100mbit/`` (``emulated-100mbit-{N}steps``
with ``--steps N`` other than 1,000) and adds each run's measured times to the table: the wall
time (``final.json``'s ``wall_s``), rank 0's median inner step (``step_s``: forward, backward,
optimizer step) and its mean time per outer sync on the training thread (``sync_s``: the whole
sync when it blocks, the wait for the previous round's and the launch with ``--outer-overlap``)::

    sudo python -m threelc.launch.bench.local --emulate 100mbit --steps 150 --seeds 0 \
        --variants h50-fp32 h50-fp32-overlap h50-3lc-p2 h50-3lc-p2-overlap

Writes ``{out}/local.json``, ``{out}/local.md`` and ``{out}/local_frontier.png``; with ``--docs``
the table replaces the ``<!-- bench_local -->`` section of docs/LOCAL.md, the same rows ordered by
bytes the ``<!-- bench_local_frontier -->`` section of docs/benchmarks.md, and the plot goes to
``docs/bench/local_frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .adamw import VARIANTS as ADAMW_VARIANTS, TASKS
from .runfolders import (CORPUS_CHARS, curve_markdown, finished, measure, run_folder, table_length, torchrun,
                         update_section)

__all__ = ["VARIANTS", "PLAN", "main"]

SYNC_EVERY = (1, 10, 50, 100)
OUTERS = ("3lc", "fp32")


def _local(sync_every: int, outer: str, sparsity: str | None = "1.0", collective: str | None = "scatter_reduce") -> tuple:
    """The options of H = ``sync_every`` local steps; 3LC outer syncs at ``sparsity`` through
    ``collective``, pinned: the variants made before LocalSteps' defaults (s =
    :data:`threelc.local.OUTER_SPARSITY`, :func:`threelc.local.sync_exchange`) ran at s = 1.0 with
    scatter-reduce on 4 ranks.  None leaves that option to LocalSteps (``h{H}-3lc-default``)."""
    pinned = (("--sparsity", sparsity), ("--collective", collective)) if outer == "3lc" else ()
    return ("--optimizer", "adamw", "--local-steps", str(sync_every), "--outer", outer,
            *(part for option, value in pinned if value is not None for part in (option, value)))


#: The AdamW benchmark's per-step runs this one compares against (same names, same options).
PER_STEP = ("allreduce", "ours-f20-doubling", "powersgd-r1", "powersgd-r4")
#: variant name -> the training script's options.
VARIANTS = {**{variant: ADAMW_VARIANTS[variant] for variant in PER_STEP},
            **{f"h{sync_every}-{outer}": _local(sync_every, outer) for sync_every in SYNC_EVERY for outer in OUTERS},
            # Error feedback delivers a round's pseudo-gradient with less delay with finer scales, and
            # with allgather's one lossy stage instead of scatter-reduce's two (at twice the bytes).
            "h50-3lc-b1024": (*_local(50, "3lc"), "--block-size", "1024"),
            "h50-3lc-allgather": _local(50, "3lc", collective="allgather"),
            # SparseLoCo's outer settings for compressed syncs: no outer momentum, outer lr 1 (the
            # error-feedback residual carries what a round does not send, as a momentum would).
            **{f"h50-{outer}-lr1-m0": (*_local(50, outer), "--outer-lr", "1.0", "--outer-momentum", "0.0")
               for outer in OUTERS},
            # Further 3LC passes per sync send what the residuals hold at finer scales (~k times the bytes).
            **{f"h{sync_every}-3lc-p{passes}": (*_local(sync_every, "3lc"), "--outer-passes", str(passes))
               for sync_every in (50, 100) for passes in (2, 3)},
            # s < 1: the scale under each block's peak, a denser payload that error feedback delays
            # less (what a sync leaves in the residual waits a whole round, not a step).
            **{f"h{sync_every}-3lc-s{sparsity}": _local(sync_every, "3lc", sparsity)
               for sync_every in (50, 100) for sparsity in ("0.5", "0.75")},
            # ... and through allgather's one lossy stage (no server re-quantization), at twice the bytes.
            **{f"h{sync_every}-3lc-s0.5-allgather": _local(sync_every, "3lc", "0.5", "allgather")
               for sync_every in (50, 100)},
            # LocalSteps' own defaults (on 4 ranks: s = 0.5 through allgather, as the row above).
            "h50-3lc-default": _local(50, "3lc", sparsity=None, collective=None),
            # Overlap: each sync runs during the next round, its mean applied one round late.
            "h50-fp32-overlap": (*_local(50, "fp32"), "--outer-overlap"),
            "h50-3lc-p2-overlap": (*_local(50, "3lc"), "--outer-passes", "2", "--outer-overlap"),
            # A stale mean under DiLoCo's outer momentum diverged: overlap with plain averaging.
            "h50-fp32-overlap-lr1-m0": (*_local(50, "fp32"), "--outer-lr", "1.0", "--outer-momentum", "0.0",
                                        "--outer-overlap")}
#: (variant, seed index) in the order they run: the target first, then the frontier.
PLAN = (("allreduce", 0), ("h50-3lc", 0), ("h50-fp32", 0), ("h100-3lc", 0), ("h10-3lc", 0), ("h50-3lc-b1024", 0),
        ("h50-3lc-allgather", 0), ("h50-3lc", 1),
        ("h50-3lc", 2), ("allreduce", 1), ("allreduce", 2), ("h100-fp32", 0), ("h10-fp32", 0), ("h1-3lc", 0),
        ("h1-fp32", 0), ("ours-f20-doubling", 0),
        # A second session: the outer settings and passes that shorten error feedback's delay.
        ("h50-3lc-lr1-m0", 0), ("h50-3lc-p2", 0), ("h50-3lc-p3", 0), ("h100-3lc-p2", 0), ("h50-fp32-lr1-m0", 0),
        # A third: what overlapping the sync with the next round costs in loss.
        ("h50-fp32-overlap", 0), ("h50-fp32-overlap-lr1-m0", 0), ("h50-fp32-lr1-m0", 0),
        ("h50-3lc-p2-overlap", 0))
TASK = "text"
#: Link rates for the "link s" columns, bits per second.
LINK_RATES = {"100mbit": 100e6, "10mbit": 10e6}


def _command(variant: str, seed: int, steps: int, corpus_chars: int = CORPUS_CHARS) -> list:
    return ["-m", TASKS[TASK], *VARIANTS[variant], "--steps", str(steps), "--seed", str(seed), "--eval-every", "100",
            "--corpus-chars", str(corpus_chars), "--no-progress"]


def train(out: Path, variant: str, seed: int, steps: int, nproc: int, emulate_rate: str | None = None,
          corpus_chars: int = CORPUS_CHARS) -> Path:
    """One training run (skipped when its folder already holds a finished run of ``steps`` steps on
    the same corpus); under ``emulate_rate`` on ``nproc`` emulated nodes linked at that rate."""
    folder = run_folder(out, TASK, variant, seed)
    if finished(folder, steps=steps, corpus_chars=corpus_chars):
        return folder
    command = _command(variant, seed, steps, corpus_chars)
    print(variant, "seed", seed, " ".join(command), flush=True)
    if emulate_rate is not None:
        from ..cluster.emulate import emulate

        record = emulate(command, nodes=nproc, rate=emulate_rate, delay=None, nproc_per_node=1, out=folder,
                         timeout=24 * 3600, port=29500, quiet=True)
        if any(code != 0 for code in record["exit_codes"]):
            raise SystemExit(f"{folder}: exit codes {record['exit_codes']} (see its node*.log)")
        return folder
    torchrun(command, folder, nproc)
    return folder


def summarize(out: Path) -> dict:
    """Per variant: mean (and per-seed) loss and bytes, ratios against allreduce on common seeds."""
    rows = {}
    for variant in VARIANTS:
        folders = sorted(out.glob(f"{TASK}-{variant}-seed*"))
        runs = {int(folder.name.rsplit("seed", 1)[1]): measure(folder)
                for folder in folders if (folder / "final.json").exists()}
        if runs:
            rows[variant] = {"seeds": sorted(runs), "runs": runs,
                             **{key: statistics.mean(run[key] for run in runs.values())
                                for key in ("val_loss", "whole_bytes", "steady_bytes")}}
    table_length(rows)  # one length per table
    base = rows.get("allreduce")
    for row in rows.values():
        row["link_s"] = {name: row["whole_bytes"] * 8 / rate for name, rate in LINK_RATES.items()}
        for key in ("wall_s", "inner_step_s", "sync_s"):
            values = [run[key] for run in row["runs"].values() if run[key] is not None]
            row[key] = statistics.mean(values) if values else None
        if base:
            common = [seed for seed in row["seeds"] if seed in base["seeds"]]
            row["per_seed_vs_allreduce"] = {seed: row["runs"][seed]["val_loss"] / base["runs"][seed]["val_loss"] - 1
                                            for seed in common}
            row["loss_vs_allreduce"] = (statistics.mean(row["per_seed_vs_allreduce"].values()) if common else None)
            row["whole_ratio"] = base["whole_bytes"] / row["whole_bytes"]
    return rows


def by_bytes(rows: dict) -> dict:
    """The rows from the most to the fewest whole-run bytes: the frontier's order."""
    return dict(sorted(rows.items(), key=lambda item: -item[1]["whole_bytes"]))


def markdown(rows: dict, emulated: str | None) -> str:
    wall = f" wall s @ {emulated} | inner step s | s per sync |" if emulated else ""
    lines = ["| variant | seeds | val loss | vs allreduce (mean of per-seed) | per seed | whole-run MB / rank | "
             f"fewer bytes than allreduce | link s @ 100 Mbit/s | link s @ 10 Mbit/s |{wall}",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if emulated else "")]
    for variant, row in rows.items():
        relative = row.get("loss_vs_allreduce")
        per_seed = " ".join(f"{value * 100:+.2f}%" for value in row.get("per_seed_vs_allreduce", {}).values())
        wall_cell = ("".join(_seconds(row[key], digits) for key, digits in (("wall_s", 0), ("inner_step_s", 3),
                                                                               ("sync_s", 3))) if emulated else "")
        lines.append(f"| {variant} | {','.join(map(str, row['seeds']))} | {row['val_loss']:.4f} | "
                     f"{'' if relative is None else f'{relative * 100:+.2f}%'} | {per_seed} | "
                     f"{row['whole_bytes'] / 1e6:.3f} | {_ratio(row.get('whole_ratio'))} | "
                     f"{row['link_s']['100mbit']:.1f} | {row['link_s']['10mbit']:.1f} |{wall_cell}")
    return "\n".join(lines) + "\n"


def _seconds(value, digits: int) -> str:
    return " |" if value is None else f" {value:.{digits}f} |"


def _ratio(value) -> str:
    return "" if value is None else f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def _sync_every(variant: str):
    """H of a local-steps variant named ``h{H}-{outer}...``, else None (a per-step run)."""
    head = variant.split("-", 1)[0]
    return int(head[1:]) if head[:1] == "h" and head[1:].isdigit() else None


def plot(rows: dict, path: Path) -> None:
    """Validation loss against whole-run bytes: per-step runs, the H series of fp32 and 3LC outer
    syncs (lines through the default settings), the other 3LC settings, and the target region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = min(max(row["val_loss"] for row in rows.values()), 2.5) + 0.05  # a diverged run would flatten the rest
    figure, axis = plt.subplots(figsize=(8, 5.6))
    axis.set_xscale("log")
    for outer, color in (("fp32", "tab:blue"), ("3lc", "tab:red")):
        series = sorted((_sync_every(variant), row) for variant, row in rows.items()
                        if variant == f"h{_sync_every(variant)}-{outer}")
        if series:
            label = f"local steps, {outer} outer sync (H = {', '.join(str(h) for h, _ in series)})"
            axis.plot([row["whole_bytes"] / 1e6 for _, row in series], [row["val_loss"] for _, row in series],
                      "-o", color=color, label=label)
    for variant, row in rows.items():
        local = _sync_every(variant) is not None
        if local and variant == f"h{_sync_every(variant)}-{variant.split('-')[1]}":
            marker, color = None, None  # drawn in its series
        elif local:
            marker, color = "^", "tab:red" if "-3lc" in variant else "tab:blue"
        else:
            marker, color = "s", "black"
        if marker:
            axis.scatter(row["whole_bytes"] / 1e6, row["val_loss"], marker=marker, s=45, color=color,
                         facecolors="none" if local else color)
        clipped = row["val_loss"] > top
        axis.annotate(f"{variant} ({row['val_loss']:.2f}, off the chart)" if clipped else variant,
                      (row["whole_bytes"] / 1e6, min(row["val_loss"], top - 0.03)), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    base = rows.get("allreduce")
    if base:  # the target: within 2% of allreduce's loss at >= 1,000x fewer bytes
        axis.fill_between([axis.get_xlim()[0], base["whole_bytes"] / 1e9], 0, base["val_loss"] * 1.02,
                          color="tab:green", alpha=0.12, label="target: <= +2% loss at >= 1,000x fewer bytes")
    axis.set_ylim(min(row["val_loss"] for row in rows.values()) - 0.05, top)
    axis.set_xlabel("MB sent per rank, whole run (log)")
    steps = table_length(rows)
    axis.set_ylabel(f"validation loss after {steps:,} steps (nats/byte)" if steps else "validation loss (nats/byte)")
    axis.set_title("char transformer, AdamW, 4 ranks: local steps against per-step compression", fontsize=10)
    axis.grid(alpha=0.3)
    # Below the axes: inside, it hid the labels of the runs drawn at the top edge.
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_local", help="run folders and results (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000, help="inner steps per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds PLAN's indices name")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=None,
                        help="run only these, with every seed (default: PLAN, in its order)")
    parser.add_argument("--corpus-chars", type=int, default=CORPUS_CHARS,
                        help="the text example's corpus size in bytes (default: %(default)s; the standard library "
                             "holds ~4.7 MB): a larger one is fewer passes over the training text in a long run")
    parser.add_argument("--nproc", type=int, default=4, help="ranks, or emulated nodes (default: %(default)s)")
    parser.add_argument("--emulate", default=None, metavar="RATE",
                        help="run on emulated nodes linked at RATE (tc syntax, e.g. 100mbit; root), into "
                             "{out}/emulated-RATE, and report measured wall times")
    parser.add_argument("--report-only", action="store_true", help="only summarize the folders that exist")
    parser.add_argument("--docs", default=None, metavar="DIR",
                        help="also write the tables into DIR/LOCAL.md and DIR/benchmarks.md and the plot into DIR/bench")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.emulate:  # a shorter timing run must not reuse (or be reused as) a 1,000-step run's folder
        out = out / (f"emulated-{args.emulate}" + ("" if args.steps == 1000 else f"-{args.steps}steps"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        plan = ([(variant, seed) for variant in args.variants for seed in args.seeds] if args.variants else
                [(variant, args.seeds[index]) for variant, index in PLAN if index < len(args.seeds)])
        for variant, seed in plan:
            train(out, variant, seed, args.steps, args.nproc, args.emulate, args.corpus_chars)
    rows = summarize(out)
    (out / "local.json").write_text(json.dumps(rows, indent=1, default=str))
    text = markdown(rows, args.emulate)
    curve = curve_markdown(rows)
    (out / "local.md").write_text(text + (f"\nValidation loss along the run:\n\n{curve}" if curve else ""))
    plot(rows, out / "local_frontier.png")
    if args.docs:
        docs = Path(args.docs)
        update_section(docs / "LOCAL.md", "bench_local", text)
        update_section(docs / "benchmarks.md", "bench_local_frontier", markdown(by_bytes(rows), args.emulate))
        plot(rows, docs / "bench" / "local_frontier.png")
    print(text + (f"\n{curve}" if curve else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
