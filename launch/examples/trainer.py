"""The training loop the examples share: torchrun environment, DDP, hook, logging, progress.

An example supplies a *task* (model, batches, loss, evaluation) and calls :func:`main`; this module
does the rest, identically for every example:

1. join the process group (gloo) from torchrun's environment, or run alone without torchrun;
2. seed every rank identically, build the model, wrap it in DDP, attach the chosen hook;
3. train for ``--steps`` steps; rank 0 logs ``metrics.jsonl`` (loss, wall time, step time, and
   the task's evaluation every ``--eval-every`` steps) and draws a progress bar;
4. under ``threelc emulate`` (``GLOO_SOCKET_IFNAME`` names an interface here), local rank 0 of
   each node logs that interface's byte counters after every step, so wire bytes can be
   measured over the steady-state steps only.

Step numbering: ``metrics.jsonl`` and ``link-node*.jsonl`` count completed steps (1 is the end of
the first step; the link log's 0 is the moment before it), while the hook logs follow the hook's
contract and name a step by its iteration index (0 is the first step).  So hook line ``i`` covers
what happened between link samples ``i`` and ``i + 1`` and belongs to metrics step ``i + 1``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import socket
import statistics
import time
import warnings
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .comm import HOOKS, attach_hook, attach_local_steps
from ..cluster.linkstats import interface_exists, read_counters
from ..runs.progress import ProgressBar
from ..runs import cputime
from ..runs.runlog import RunWriter, append_jsonl, cpu_stats_path, default_run_dir, link_stats_path

__all__ = ["Task", "add_common_arguments", "main", "train"]

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What an example provides to the shared loop."""

    name: str  # e.g. "digits-cnn"
    eval_metric: str  # key of the headline evaluation, e.g. "test_accuracy" or "val_loss"

    def build_model(self) -> torch.nn.Module: ...

    def build_optimizer(self, parameters) -> torch.optim.Optimizer: ...

    def batches(self, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, seeded stream of this rank's (inputs, targets) batches."""

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Held-out metrics, e.g. ``{"test_accuracy": 0.97}``; called on rank 0."""

    def describe(self) -> dict:
        """JSON-able facts for config.json (parameter count, data sizes, ...)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every example takes (hook, steps, logging, seeds)."""
    group = parser.add_argument_group("communication")
    group.add_argument("--hook", choices=HOOKS, default="allreduce", help="gradient communication (default: %(default)s)")
    group.add_argument("--sparsity", type=float, default=None,
                       help="3LC sparsity multiplier s in (0, 2) (default: 1.0 for the per-step hook, "
                            "threelc.local.OUTER_SPARSITY for --local-steps with --outer 3lc)")
    group.add_argument("--collective", choices=("auto", "allgather", "scatter_reduce"), default=None,
                       help="3LC collective (default: auto for the per-step hook; with --local-steps, "
                            "threelc.local.sync_exchange's fixed one)")
    group.add_argument("--header", choices=("auto", "separate", "inline"), default=None,
                       help="3LC payload sizes: ahead of the payloads or inline with them (default: the hook's own, auto)")
    group.add_argument("--scale", choices=("tensor", "bucket", "block"), default=None,
                       help="3LC scale unit (default: the hook's own)")
    group.add_argument("--block-size", type=int, default=None, help="3LC values per scale with --scale block")
    group.add_argument("--min-numel", type=int, default=None,
                       help="3LC: buckets with fewer values are allreduced; above every bucket's size nothing is "
                            "compressed (default: the hook's own)")
    group.add_argument("--powersgd-rank", type=int, default=1, help="PowerSGD matrix rank (default: %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="uncompressed steps before compression starts (default: the hook's own)")
    group.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size (default: %(default)s)")
    group = parser.add_argument_group("local steps (DiLoCo; replaces --hook, see docs/LOCAL.md)")
    group.add_argument("--local-steps", type=int, default=None, metavar="H",
                       help="H optimizer steps without averaging, then an outer Nesterov step on the averaged "
                            "pseudo-gradient; --warmup-steps allreduce steps first (default: off)")
    group.add_argument("--outer", choices=("3lc", "fp32"), default="3lc",
                       help="average pseudo-gradients through 3LC or a float32 allreduce (default: %(default)s)")
    group.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (default: %(default)s)")
    group.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum (default: %(default)s)")
    group.add_argument("--outer-passes", type=int, default=1,
                       help="3LC averages per outer sync: further passes send the residuals (default: %(default)s)")
    group.add_argument("--outer-overlap", action="store_true",
                       help="run each outer sync during the next round, its update applied one round late")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=32, help="per-worker batch size (default: %(default)s)")
    group.add_argument("--lr", type=float, default=None, help="learning rate (default: the example's)")
    group.add_argument("--seed", type=int, default=0, help="seed for model, data order and sampling (default: %(default)s)")
    group.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: %(default)s)")
    group = parser.add_argument_group("logging")
    group.add_argument("--run-dir", default=default_run_dir(None),
                       help="run folder for config.json, metrics.jsonl and per-rank hook stats "
                            "(default: $THREELC_RUN_DIR, else no files)")
    group.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps and at the end (default: %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")


def _init_process_group() -> None:
    """Join torchrun's process group, or form a group of one when started without torchrun."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        with socket.socket() as probe:  # any free port
            probe.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(probe.getsockname()[1]))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))


def _limit_numba_threads(threads: int) -> None:
    """Give numba's parallel kernels (the 3LC codec) ``threads`` threads per process.

    numba sizes its thread pool once, from ``NUMBA_NUM_THREADS`` (default: all cores), when the
    first parallel kernel runs, and ``numba.set_num_threads`` is per thread, so it cannot reach
    the hook's worker thread.  With several workers per machine, every worker's pool would
    claim every core: on 2 cores with 4 workers that made steps ~10x slower.  So, unless the
    user chose a value, set it now, before any kernel ran, as torchrun does for OpenMP.
    """
    if "NUMBA_NUM_THREADS" in os.environ:
        return
    try:
        import numba
        from numba.np.ufunc import parallel
    except ImportError:
        return
    if getattr(parallel, "_is_initialized", True):
        logger.warning("numba's thread pool already started; set NUMBA_NUM_THREADS to limit it")
        return
    count = max(1, min(threads, numba.config.NUMBA_DEFAULT_NUM_THREADS))
    os.environ["NUMBA_NUM_THREADS"] = str(count)  # for child processes, and numba's own checks
    numba.config.reload_config()
    parallel.NUM_THREADS = count  # read once at import; the pool is launched from this value


def _link_logger(run_dir) -> Callable[[int], None] | None:
    """Per-step interface counters on local rank 0 of each node, when an interface is named."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if not run_dir or os.environ.get("LOCAL_RANK", "0") != "0" or not interface_exists(interface):
        return None
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    path = link_stats_path(run_dir, node_rank)
    if path.exists():
        path.unlink()

    def log(step: int) -> None:
        append_jsonl(path, {"step": step, "node_rank": node_rank, "interface": interface,
                            "time": time.time(), **read_counters(interface)})

    return log


def _cpu_logger(run_dir, rank: int) -> Callable[[int], None] | None:
    """Every :data:`~threelc.launch.runs.cputime.EVERY` steps, this rank's CPU seconds per thread
    name (the training thread, the hook's worker, the backend's threads), when the platform has them."""
    if not run_dir or not cputime.sample():
        return None
    path = cpu_stats_path(run_dir, dist.get_rank())
    if path.exists():
        path.unlink()

    def log(step: int, last: bool = False) -> None:
        if step % cputime.EVERY == 0 or last:
            append_jsonl(path, {"step": step, "cpu": cputime.sample()})

    return log


def _config(args, task: Task, world_size: int) -> dict:
    return {
        "task": task.name,
        "eval_metric": task.eval_metric,
        "hook": args.hook if args.local_steps is None else f"local-{args.outer}",
        "sparsity": args.sparsity,
        "collective": args.collective,
        "header": args.header,
        "powersgd_rank": args.powersgd_rank,
        "scale": args.scale,
        "block_size": args.block_size,
        "min_numel": args.min_numel,
        "warmup_steps": args.warmup_steps,
        "bucket_cap_mb": args.bucket_cap_mb,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "world_size": world_size,
        "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        "backend": "gloo",
        "torch": torch.__version__,
        "host": platform.node(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task_config": task.describe(),
        "args": {key: value for key, value in vars(args).items() if not callable(value)},
    }


def train(args, task: Task) -> dict:
    """Run the loop; returns rank 0's final record (empty dict on other ranks)."""
    torch.set_num_threads(args.threads)
    _limit_numba_threads(args.threads)
    # A conv weight with one input channel gets gradient strides DDP's bucket view does not
    # mirror; DDP copies it and warns on every run. Harmless here, and noise for users.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    _init_process_group()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    handle = model = ddp_model = optimizer = batches = None
    try:
        if args.run_dir:  # every node writes its own ranks' stats, so every rank makes the folder
            os.makedirs(args.run_dir, exist_ok=True)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = task.build_model()
        ddp_model = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        optimizer = task.build_optimizer(ddp_model.parameters())  # first: a threelc optimizer pairs with the hook
        if args.local_steps is not None:
            handle = attach_local_steps(ddp_model, optimizer, sync_every=args.local_steps, outer=args.outer,
                                        outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
                                        passes=args.outer_passes, warmup_steps=args.warmup_steps,
                                        overlap=args.outer_overlap, stats_dir=args.run_dir, sparsity=args.sparsity,
                                        collective=args.collective, scale=args.scale, block_size=args.block_size)
            if args.outer == "3lc":  # recorded in the run's config: what LocalSteps chose
                args.sparsity, args.collective = handle.state.sparsity, handle.state.collective
        else:
            handle = attach_hook(ddp_model, args.hook, sparsity=args.sparsity, collective=args.collective,
                                 stats_dir=args.run_dir, powersgd_rank=args.powersgd_rank,
                                 warmup_steps=args.warmup_steps, scale=args.scale, block_size=args.block_size,
                                 min_numel=args.min_numel, optimizer=optimizer, header=args.header)
        writer = RunWriter(args.run_dir, _config(args, task, world_size)) if (rank == 0 and args.run_dir) else None
        log_link = _link_logger(args.run_dir)
        log_cpu = _cpu_logger(args.run_dir, rank)
        batches = task.batches(rank, world_size)
        bar = ProgressBar(args.steps, label=f"{task.name} {args.hook}", enabled=(rank == 0 and not args.no_progress))
        if log_link:
            log_link(0)
        if log_cpu:
            log_cpu(0)
        dist.barrier()  # start the clock together
        start = time.perf_counter()
        step_times, record = [], {}
        for step in range(1, args.steps + 1):
            inputs, targets = next(batches)
            step_start = time.perf_counter()
            loss = task.loss(ddp_model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_s = time.perf_counter() - step_start
            step_times.append(step_s)
            done_start = time.perf_counter()
            synced = handle.step_done(step - 1)  # the hook logs iteration indices: 0 is the first step
            if step == args.steps:  # an overlapped outer update still in flight lands before the last evaluation
                synced = handle.finish() or synced
            sync_s = time.perf_counter() - done_start
            if log_link:
                log_link(step)
            if log_cpu:
                log_cpu(step, last=step == args.steps)
            if rank != 0:
                continue
            record = {"step": step, "loss": float(loss.detach()), "time": time.perf_counter() - start, "step_s": step_s}
            if synced:  # the local-steps outer sync's time on the training thread (the part not overlapped)
                record["sync_s"] = sync_s
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    record.update(task.evaluate(model))
                model.train()
            if writer:
                writer.log(record)
            bar.update(step, loss=record["loss"])
        bar.close()
        final = {}
        if rank == 0:
            final = {**record, "median_step_s": statistics.median(step_times), "wall_s": time.perf_counter() - start,
                     "hook_totals_rank0": handle.totals()}
            if writer:
                writer.write_json("final.json", final)
        dist.barrier()  # let every rank finish its stats lines before anyone tears down
        return final
    finally:
        if handle is not None:
            handle.close()
        # DDP's reducer and the hooks keep the process group (and gloo's worker threads) alive
        # past destroy_process_group(); left to interpreter shutdown, the gloo threads were
        # torn down unjoined now and then ("terminate called without an active exception",
        # SIGABRT after a successful run).  Drop them first, while the interpreter is whole.
        model = ddp_model = optimizer = handle = batches = None
        gc.collect()
        dist.destroy_process_group()


def main(argv, *, description: str, add_task_arguments: Callable, build_task: Callable, defaults: dict | None = None) -> int:
    """Parse ``argv`` (common + task options), build the task, train. Returns an exit code."""
    logging.basicConfig(level=os.environ.get("THREELC_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    add_task_arguments(parser.add_argument_group("model and data"))
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.local_steps is None:  # the per-step hook's defaults (LocalSteps resolves its own), recorded in the config
        args.sparsity = 1.0 if args.sparsity is None else args.sparsity
        args.collective = "auto" if args.collective is None else args.collective
    if args.local_steps is not None and args.hook != "allreduce":
        parser.error("--local-steps replaces the per-step hook (its warm-up uses allreduce): drop --hook, and pick "
                     "the outer sync with --outer")
    final = train(args, build_task(args))
    if final:
        metric = {key: value for key, value in final.items() if key in ("test_accuracy", "val_loss")}
        print(f"done: {args.steps} steps, median step {final['median_step_s'] * 1e3:.1f} ms, {metric}", flush=True)
    return 0
