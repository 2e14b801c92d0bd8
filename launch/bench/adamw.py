"""AdamW under 3LC: validation loss against whole-run bytes, for threelc.optim.AdamW's variants
beside allreduce, the fp16 hook, PowerSGD and 3LC with torch's own AdamW.

::

    python -m threelc.launch.bench.adamw --out runs/bench_adamw --steps 1000 --seeds 0 1 2 \
        --doc docs/benchmarks.md

Each run is ``torchrun --nproc-per-node 4 -m threelc.launch.examples.train_{text,gpt2}`` into
``{out}/{task}-{variant}-seed{seed}``; a folder that already holds ``final.json`` is reused, so
an interrupted benchmark resumes where it stopped.  The variants in :data:`MAIN` run with every
seed, the others (:data:`FRONTIER`) with the first seed only.  Per run:

* ``val_loss``: the final validation loss (nats per byte);
* whole-run bytes: what each rank sent over all steps, warm-up and refresh allreduces included
  (the hook's own count; PyTorch's hooks under the ring-allreduce model, see
  :mod:`threelc.launch.examples.comm`), mean over ranks;
* steady-state bytes: the mean per compressed step.

Runs of 2,000 steps or more add a table of the validation loss every 1,000 steps, of each run's
mean over its last 500 steps' evaluations and of its best evaluation, against allreduce
(:func:`.runfolders.curve_markdown`).  Ratios are allreduce's bytes (same task, same seed set)
divided by the variant's.  Writes
``{out}/adamw.json``, ``{out}/adamw.md`` (the table) and ``{out}/adamw_frontier.png``; with
``--doc`` the table replaces the text between the ``<!-- bench_adamw -->`` markers of that file
and the plot goes to ``docs/bench/adamw_frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .runfolders import (CORPUS_CHARS, curve_markdown, finished, measure, run_folder, table_length, torchrun,
                         update_section)

__all__ = ["VARIANTS", "MAIN", "FRONTIER", "main"]

ADAMW = ("--optimizer", "adamw")
#: The 3LC hook with the collective and header mode every 3LC row of the table used: the hook's
#: "auto" plan measures the link, and may choose allgather (about twice the bytes) or inline headers
#: (slot padding: on 4 ranks over loopback a trial kept them, and GPT-2's default row sent 147 MB
#: per rank instead of 119), so both are pinned; neither changes the arithmetic.
THREELC = ("--hook", "threelc", "--collective", "scatter_reduce", "--header", "separate")


def _ours(freeze: int, refresh: str = "doubling", compress: str = "gradient", embedding: str = "block",
          conv1d: bool = False) -> tuple:
    return (*THREELC, "--optimizer", "threelc-adamw", "--freeze-step", str(freeze), "--refresh", refresh,
            "--adam-compress", compress, "--embedding-scale", embedding,
            "--transpose-conv1d" if conv1d else "--no-transpose-conv1d")


#: variant name -> the training script's options.
VARIANTS = {
    "allreduce": ("--hook", "allreduce", *ADAMW),
    "3lc+torch-adamw": (*THREELC, *ADAMW),
    "ours-f20-doubling": _ours(20),
    # threelc.optim.AdamW's defaults, nothing given: freeze_step=20, refresh="doubling",
    # compress="momentum", and the hook's block size left to the optimizer (512): the same
    # arguments as ours-f20-momentum-b512.
    "ours-default": (*THREELC, "--optimizer", "threelc-adamw"),
    "ours-f20-none": _ours(20, "none"),
    # The 8192-value blocks the hook used for every variant before momentum got its own default (512).
    "ours-f20-momentum": (*_ours(20, "doubling", "momentum"), "--block-size", "8192"),
    "ours-f20-precond": _ours(20, "doubling", "preconditioned"),
    # Ablation: the same schedule on exact gradients (every bucket allreduced), so the frozen v's
    # share of the gap is told apart from the compression's.
    "ours-f20-doubling-exact": (*_ours(20), "--min-numel", str(2**62)),
    # Finer 3LC scales (the hook's default is one per 8192 values of a tensor).
    "ours-f20-doubling-b1024": (*_ours(20), "--block-size", "1024"),
    "ours-f20-doubling-b256": (*_ours(20), "--block-size", "256"),
    # Momentum compression (smooth, so sparse payloads) with the finer scales that cut gradient
    # compression's lag: whether the bytes momentum saves pay for the finer blocks.
    "ours-f20-momentum-b1024": (*_ours(20, "doubling", "momentum"), "--block-size", "1024"),
    "ours-f20-momentum-b512": (*_ours(20, "doubling", "momentum"), "--block-size", "512"),
    "ours-f20-momentum-b256": (*_ours(20, "doubling", "momentum"), "--block-size", "256"),
    # The same with the sparsity multiplier s = 1.3: a value is sent once it reaches 0.65 of its
    # block's largest instead of 0.5, so fewer values are sent per step.
    "ours-f20-momentum-b256-s1.3": (*_ours(20, "doubling", "momentum"), "--block-size", "256", "--sparsity", "1.3"),
    # The same at 512 with GPT-2's Conv1D weights compressed transposed, so that no block of the
    # fused query/key/value weight mixes the three (each 512-value block holds 4 output columns).
    "ours-f20-momentum-b512-conv1d": (*_ours(20, "doubling", "momentum", conv1d=True), "--block-size", "512"),
    # Momentum divided by the frozen sqrt(v_hat) (compress="update": each rank's AdamW update
    # direction), so a block's scale is set by step sizes, not by gradient sizes.
    "ours-f20-update-b512": (*_ours(20, "doubling", "update"), "--block-size", "512"),
    "ours-f20-update-b256": (*_ours(20, "doubling", "update"), "--block-size", "256"),
    "ours-f20-doubling-rows": _ours(20, embedding="row"),
    "ours-f20-doubling-rows-conv1d": _ours(20, embedding="row", conv1d=True),
    # v raised on compressed steps to at least m_hat**2 (no coordinate steps more than lr).
    "ours-f20-doubling-floor": (*_ours(20), "--floor-variance"),
    "ours-f20-doubling-floor-exact": (*_ours(20), "--floor-variance", "--min-numel", str(2**62)),
    # The same bound on each compressed step's size, v untouched (floor_variance="transient").
    "ours-f20-doubling-tfloor": (*_ours(20), "--floor-variance", "transient"),
    "ours-f20-doubling-tfloor-rows-conv1d": (*_ours(20, embedding="row", conv1d=True), "--floor-variance", "transient"),
    # The same cap, the part of a step above it carried to the next compressed steps (floor_variance="carry").
    "ours-f20-doubling-carry": (*_ours(20), "--floor-variance", "carry"),
    # Finer scales only where a one-off look at the gradients found the longest lag: one per 256
    # values (two rows) of GPT-2's tied embedding, one per 128 of the fused query/key/value bias,
    # Conv1D weights compressed transposed.
    "ours-f20-doubling-floor-fine": (*_ours(20, conv1d=True), "--floor-variance",
                                     "--block-sizes", "*.wte.weight=256", "*.c_attn.bias=128"),
    "ours-f10-doubling": _ours(10),
    "ours-f50-doubling": _ours(50),
    "ours-f100-doubling": _ours(100),
    "ours-f100-none": _ours(100, "none"),
    "ours-f200-none": _ours(200, "none"),
    "fp16": ("--hook", "fp16", *ADAMW),
    "powersgd-r1": ("--hook", "powersgd", "--powersgd-rank", "1", *ADAMW),
    "powersgd-r4": ("--hook", "powersgd", "--powersgd-rank", "4", *ADAMW),
}
#: Run with every seed, in this order (the targets); then FRONTIER with the first seed.
MAIN = ("allreduce", "ours-f20-momentum-b512", "3lc+torch-adamw")
FRONTIER = tuple(name for name in VARIANTS if name not in MAIN)
TASKS = {"text": "threelc.launch.examples.train_text", "gpt2": "threelc.launch.examples.train_gpt2"}
MARKER_BEGIN, MARKER_END = "<!-- bench_adamw:begin -->", "<!-- bench_adamw:end -->"


def train(out: Path, task: str, variant: str, seed: int, steps: int, nproc: int, port: int,
          corpus_chars: int = CORPUS_CHARS) -> Path:
    """One training run (skipped when its folder already holds a finished run of ``steps`` steps on
    the same corpus)."""
    folder = run_folder(out, task, variant, seed)
    if finished(folder, steps=steps, corpus_chars=corpus_chars):
        return folder
    command = ["-m", TASKS[task], *VARIANTS[variant], "--steps", str(steps), "--seed", str(seed), "--eval-every",
               "100", "--corpus-chars", str(corpus_chars), "--no-progress"]
    print(" ".join(command), "--run-dir", folder, flush=True)
    torchrun(command, folder, nproc, port)
    return folder


def summarize(out: Path, tasks, seeds) -> dict:
    """Per task and variant: mean (and per-seed) loss and bytes, ratios against allreduce."""
    table = {}
    for task in tasks:
        rows = {}
        for variant in VARIANTS:
            runs = {seed: measure(run_folder(out, task, variant, seed)) for seed in seeds
                    if (run_folder(out, task, variant, seed) / "final.json").exists()}
            if runs:
                rows[variant] = {"seeds": sorted(runs), "runs": runs,
                                 **{key: statistics.mean(run[key] for run in runs.values())
                                    for key in ("val_loss", "whole_bytes", "steady_bytes", "full_precision_steps")}}
        table_length(rows)  # one length per table
        base = rows.get("allreduce")
        for row in rows.values():
            if base:
                common = [seed for seed in row["seeds"] if seed in base["seeds"]]
                base_loss = statistics.mean(base["runs"][seed]["val_loss"] for seed in common) if common else None
                row["loss_vs_allreduce"] = (row["val_loss"] / base_loss - 1) if base_loss else None
                row["per_seed_vs_allreduce"] = {seed: row["runs"][seed]["val_loss"] / base["runs"][seed]["val_loss"] - 1
                                                for seed in common}
                row["whole_ratio"] = base["whole_bytes"] / row["whole_bytes"]
                row["steady_ratio"] = base["steady_bytes"] / row["steady_bytes"]
        table[task] = rows
    return table


def markdown(table: dict) -> str:
    lines = []
    for task, rows in table.items():
        lines += [f"**{task}** (4 ranks; loss: mean over the seeds listed; bytes per rank, whole run)", "",
                  "| variant | seeds | val loss | vs allreduce | full-precision steps | whole-run MB | whole-run x | "
                  "steady x | vs allreduce, per seed |", "|---|---|---|---|---|---|---|---|---|"]
        for variant, row in rows.items():
            relative = row.get("loss_vs_allreduce")
            lines.append(f"| {variant} | {','.join(map(str, row['seeds']))} | {row['val_loss']:.4f} | "
                         f"{'' if relative is None else f'{relative * 100:+.2f}%'} | "
                         f"{row['full_precision_steps']:.0f} | {row['whole_bytes'] / 1e6:.1f} | "
                         f"{row.get('whole_ratio', 0):.1f} | {row.get('steady_ratio', 0):.1f} | "
                         f"{' '.join(f'{value * 100:+.2f}%' for value in row.get('per_seed_vs_allreduce', {}).values())} |")
        lines.append("")
        curve = curve_markdown(rows)
        if curve:  # runs of 2,000 steps or more: how the gap moved along the run
            lines += [f"**{task}**, validation loss along the run (mean over seeds; gaps: mean of per-seed ratios)", "",
                      curve]
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.5), squeeze=False)
    for axis, (task, rows) in zip(axes[0], table.items()):
        for variant, row in rows.items():
            axis.scatter(row["whole_bytes"] / 1e6, row["val_loss"], marker="*" if variant.startswith("ours") else "o")
            axis.annotate(variant, (row["whole_bytes"] / 1e6, row["val_loss"]), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("MB sent per rank, whole run (log)")
        axis.set_ylabel("validation loss (nats/byte)")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def update_doc(doc: Path, text: str) -> None:
    """Replace this benchmark's section (between :data:`MARKER_BEGIN` and :data:`MARKER_END`)."""
    update_section(doc, "bench_adamw", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_adamw", help="run folders and results (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the MAIN variants")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=None,
                        help="run only these (all seeds); default: MAIN with every seed, then FRONTIER with the first")
    parser.add_argument("--corpus-chars", type=int, default=CORPUS_CHARS,
                        help="the examples' corpus size in bytes (default: %(default)s; the standard library holds "
                             "~4.7 MB): a larger one is fewer passes over the training text in a long run")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="torchrun master port (default: a free one per run)")
    parser.add_argument("--report-only", action="store_true", help="only summarize the folders that exist")
    parser.add_argument("--doc", default=None, help="markdown file whose bench_adamw section gets the table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        plan = ([(variant, seed) for variant in args.variants for seed in args.seeds] if args.variants else
                [(variant, seed) for variant in MAIN for seed in args.seeds] +
                [(variant, args.seeds[0]) for variant in FRONTIER])
        for task in args.tasks:
            for variant, seed in plan:
                train(out, task, variant, seed, args.steps, args.nproc, args.port, args.corpus_chars)
    table = summarize(out, args.tasks, args.seeds)
    (out / "adamw.json").write_text(json.dumps(table, indent=1, default=str))
    text = markdown(table)
    (out / "adamw.md").write_text(text)
    plot(table, out / "adamw_frontier.png")
    if args.doc:
        update_doc(Path(args.doc), text)
        plot(table, Path(args.doc).parent / "bench" / "adamw_frontier.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
