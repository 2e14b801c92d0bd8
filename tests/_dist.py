"""Spawn N real gloo ranks for a test, with a hard timeout so a broken test never hangs.

    results = run_ranks(fn, world_size, *args)

runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes inside an initialized gloo
process group and returns the per-rank return values (anything ``torch.save`` can store).  ``fn``
must be a module-level function of an importable module (the spawned processes import it).
Each rank uses one torch thread and one numba thread: the CI machine has 2 cores for everyone.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, port, folder, collective_timeout_s, args):
    import numba
    import torch.distributed as dist

    # A rank killed by a signal (SIGABRT at exit, SIGSEGV) leaves no traceback of its own; this
    # file gets every thread's Python stack at that moment, and run_ranks reports it.
    fault_file = open(os.path.join(folder, f"rank{rank}.fault"), "w")
    faulthandler.enable(file=fault_file, all_threads=True)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as err:
            err.write(traceback.format_exc())
        raise
    finally:
        # A test's DDP models (their reducers hold the process group) can outlive fn in reference
        # cycles, e.g. through an error's traceback; left to interpreter shutdown, gloo's threads
        # were torn down unjoined now and then ("terminate called without an active exception",
        # SIGABRT after a passing test), as launch/examples/trainer.py found for training runs.
        gc.collect()
        dist.destroy_process_group()
    # Even so, under heavy oversubscription a rank still aborted now and then in the interpreter's
    # own teardown, after its result was saved and its process group destroyed (no Python frame in
    # the fault dump).  What a test checks is done by now: a passing rank leaves without that
    # teardown.  A failing one raised above and exits through torch's spawn wrapper with its error.
    for stream in (sys.stdout, sys.stderr, fault_file):
        stream.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout_s: float = 180, collective_timeout_s: float = 60,
              missing_ok: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``missing_ok``: a rank that exits without a result (a test that kills it) gives None.

    Raises AssertionError with the failing ranks' tracebacks, or TimeoutError after
    ``timeout_s`` seconds (the processes are then terminated).
    """
    with tempfile.TemporaryDirectory(prefix="threelc-ranks-") as folder:
        context = mp.start_processes(_entry, args=(fn, world_size, free_port(), folder, collective_timeout_s, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s} s")
        except ProcessException as error:
            reports = {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
                       if name.endswith((".err", ".fault"))}
            errors = [text for name, text in reports.items() if name.endswith(".err")]
            faults = [f"{name}:\n{text}" for name, text in reports.items() if name.endswith(".fault") and text.strip()]
            raise AssertionError("\n".join([*errors, *faults]) or str(error)) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
        paths = [os.path.join(folder, f"rank{rank}.pt") for rank in range(world_size)]
        return [None if missing_ok and not os.path.exists(path) else torch.load(path, weights_only=False)
                for path in paths]
