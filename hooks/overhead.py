"""Measure the 3LC hook's per-step cost against DDP's allreduce on loopback gloo.

    python3 -m threelc.hooks.overhead --world-size 2 --layers 4 --width 1024 --steps 20

Spawns ``--world-size`` ranks on 127.0.0.1, trains an MLP of ``--layers`` square Linear layers
(``width**2`` weights each) with a tiny batch so that gradient exchange dominates, and prints per
step: the wall time of ``backward()`` (which includes waiting for the hook), its difference to
plain allreduce, and the hook's own compress / decompress / communication seconds and traffic
(medians over the timed steps; bytes are means).
On loopback the network is nearly free, so the difference is the hook's computational overhead;
on a real network the bytes column is what compression saves.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["main"]

VARIANTS = ("allreduce", "allgather", "scatter_reduce")


def _measure(rank: int, world_size: int, args, variant: str) -> dict:
    from threelc.hooks import register

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    ddp = DDP(model)
    state = None
    if variant != "allreduce":
        state = register(ddp, collective=variant, sparsity=args.sparsity, start_iter=2)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    times, compress_s, decompress_s, comm_s = [], [], [], []
    raw = sent = 0
    for step in range(args.warmup + args.steps):
        batch = torch.randn(args.batch, args.width, generator=generator)
        loss = ddp(batch).pow(2).mean()
        optimizer.zero_grad()
        dist.barrier()  # start every rank's backward together
        start = time.perf_counter()
        loss.backward()
        elapsed = time.perf_counter() - start
        optimizer.step()
        if step < args.warmup:
            continue
        times.append(elapsed)
        if state is not None:
            stats = state.stats()["step"]
            raw += stats["raw_bytes"]
            sent += stats["sent_bytes"]
            compress_s.append(stats["compress_s"])
            decompress_s.append(stats["decompress_s"])
            comm_s.append(stats["comm_s"])
    if state is None:
        parameters = sum(p.numel() * p.element_size() for p in model.parameters())
        raw = parameters * args.steps
        sent = 2 * (world_size - 1) * raw // world_size
    # Medians: on a shared machine a few steps stall, and means would follow them.
    median = lambda values: statistics.median(values) if values else 0.0  # noqa: E731
    return {"variant": variant, "backward_s": median(times), "sent_bytes": sent / args.steps,
            "ratio": raw / sent if sent else None, "compress_s": median(compress_s),
            "decompress_s": median(decompress_s), "comm_s": median(comm_s)}


def _rank_main(rank: int, world_size: int, port: int, args, queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        results = [_measure(rank, world_size, args, variant) for variant in VARIANTS]
        if rank == 0:
            queue.put(results)
    finally:
        gc.collect()  # the measured DDP models' reference cycles hold gloo's threads (see launch/examples/trainer.py)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m threelc.hooks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (>= the hook's start_iter)")
    parser.add_argument("--sparsity", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_rank_main, args=(rank, args.world_size, port, args, queue))
                 for port in [_free_port()] for rank in range(args.world_size)]
    for process in processes:
        process.start()
    results = queue.get(timeout=1800)
    for process in processes:
        process.join()
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
        return 0
    params = args.layers * (args.width * args.width + args.width)
    print(f"{args.world_size} ranks, gloo on loopback, {params / 1e6:.2f} M float32 parameters "
          f"({4 * params / 2**20:.1f} MiB), batch {args.batch}, median of {args.steps} steps, "
          f"{os.cpu_count()} CPUs")
    baseline = results[0]["backward_s"]
    print(f"{'variant':<16}{'backward ms':>12}{'vs allreduce':>14}{'compress ms':>13}{'decompress ms':>15}"
          f"{'comm ms':>9}{'sent KiB':>10}{'ratio':>8}")
    for result in results:
        ratio = f"{result['ratio']:.1f}" if result["ratio"] else "-"
        print(f"{result['variant']:<16}{1e3 * result['backward_s']:>12.1f}"
              f"{1e3 * (result['backward_s'] - baseline):>+14.1f}{1e3 * result['compress_s']:>13.1f}"
              f"{1e3 * result['decompress_s']:>15.1f}{1e3 * result['comm_s']:>9.1f}"
              f"{result['sent_bytes'] / 1024:>10.1f}{ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
