"""Peak memory of the 3LC hook against plain allreduce: ``python3 -m threelc.launch.bench.memory``.

Each configuration runs in fresh gloo processes on this machine (CPU): an MLP of about
``--params`` parameters trains ``--steps`` steps with DDP's default allreduce, or with the 3LC hook
(allgather or scatter-reduce, compressing from step 2).  Each rank reports its peak resident set
size (``ru_maxrss``) and the bytes of the hook state's tensors (``state.memory_bytes()``); the
table gives, per configuration, the peak RSS above allreduce's, in bytes per parameter, beside
the state's own tensors per parameter.  RSS includes the transient buffers of one bucket
(payloads, a shard mean) and allocator slack, so it is an upper view of what the state counts.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .runfolders import free_port

__all__ = ["measure", "main"]

CONFIGS = ("allreduce", "allgather", "scatter_reduce")


def _mlp(params: int) -> nn.Module:
    """Four square layers of width w: ~4 w^2 parameters."""
    width = max(8, int((params / 4) ** 0.5))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])


def _rank(rank, world_size, port, config, params, steps, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = _mlp(params)
    ddp = DDP(model)
    state = None
    if config != "allreduce":
        from threelc.hooks import register

        state = register(ddp, collective=config, start_iter=2)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    width = model[0].in_features
    for step in range(steps):
        optimizer.zero_grad()
        ddp(torch.randn(16, width, generator=torch.Generator().manual_seed(rank * 1000 + step))).pow(2).mean().backward()
        optimizer.step()
    result = {"rank": rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "params": sum(p.numel() for p in model.parameters()),
              "state_bytes": 0 if state is None else state.memory_bytes()}
    with open(os.path.join(folder, f"{config}-rank{rank}.json"), "w") as out:
        json.dump(result, out)
    if state is not None:
        state.close()
    # As launch/examples/trainer.py does: DDP's reducer keeps gloo's threads alive past
    # destroy_process_group(), and left to interpreter shutdown they were torn down unjoined now
    # and then (SIGABRT, "terminate called without an active exception", after a complete run).
    model = ddp = state = optimizer = None
    gc.collect()
    dist.destroy_process_group()


def measure(params: int, world_size: int, steps: int, folder: str) -> dict:
    """Run every configuration; return ``{config: [per-rank results]}``."""
    results = {}
    for config in CONFIGS:
        mp.start_processes(_rank, args=(world_size, free_port(), config, params, steps, folder), nprocs=world_size,
                           start_method="spawn")
        results[config] = [json.load(open(os.path.join(folder, f"{config}-rank{rank}.json")))
                           for rank in range(world_size)]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=21_000_000, help="parameters of the MLP")
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--folder", default="/tmp/threelc-memory")
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.makedirs(args.folder, exist_ok=True)
    results = measure(args.params, args.world_size, args.steps, args.folder)
    baseline = max(r["peak_rss"] for r in results["allreduce"])
    params = results["allreduce"][0]["params"]
    print(f"{params:,} parameters, {args.world_size} gloo ranks on CPU, {args.steps} steps; "
          f"allreduce peak RSS {baseline / 2**20:.0f} MiB per rank (max over ranks)")
    print("{:>15} {:>22} {:>26}".format("config", "peak RSS - allreduce", "state tensors"))
    for config in CONFIGS[1:]:
        extra = max(r["peak_rss"] for r in results[config]) - baseline
        state = max(r["state_bytes"] for r in results[config])
        print("{:>15} {:>9.0f} MiB {:>5.2f} B/param {:>9.0f} MiB {:>5.2f} B/param".format(
            config, extra / 2**20, extra / params, state / 2**20, state / params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
