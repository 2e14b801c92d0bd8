"""One FIFO worker thread per hook state: runs bucket jobs off the autograd thread, in order.

Why one thread, first in first out:

* DDP calls the hook for buckets in bucket-index order on every rank.  If a single thread issues
  every collective of the hook in submission order, the collectives are issued in the same order
  on every rank.  Issuing them from future callbacks or a thread pool does not guarantee that,
  and gloo then aborts ("collective mismatch") or hangs.
* The codec kernels are numba ``nogil`` and ``parallel``; numba's default "workqueue" threading
  layer must not run parallel kernels from two threads at once.  One worker per state, plus
  :data:`CODEC_LOCK` for the rare process with two states, keeps codec calls one at a time.
* The autograd thread only enqueues and returns a future, so backward computation of the next
  buckets overlaps compression and communication of the earlier ones.

The thread holds no reference to the state, so a state that is garbage-collected stops its
worker (``weakref.finalize``).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import queue
import sys
import threading
import weakref

import numba
import torch

__all__ = ["BucketWorker", "CODEC_LOCK"]

logger = logging.getLogger(__name__)

#: Held around every codec call of the hook (see the module docstring).
CODEC_LOCK = threading.Lock()

_STOP = object()

# Workers still running at interpreter exit.  A daemon thread that ran numba's parallel kernels
# and is torn down without being joined can abort the process at exit ("terminate called without
# an active exception"), so they are stopped and joined first.
_LIVE_WORKERS: "weakref.WeakSet[BucketWorker]" = weakref.WeakSet()


@atexit.register
def _close_live_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.close(timeout=10.0)  # a worker stuck in a collective must not hang the exit


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the operating system too (``top -H``, ``ps -L``,
    ``/proc``; Linux keeps 15 bytes), so that CPU accounting per thread
    (:mod:`threelc.launch.runs.cputime`) tells the hook's worker from the training thread.
    Python 3.11 names its threads for Python only.  Best effort: nothing happens elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _serve(jobs: "queue.Queue", codec_threads: int | None) -> None:
    _name_os_thread(threading.current_thread().name)
    if codec_threads is not None:
        # numba's thread count is per calling thread: this caps the codec kernels this worker runs.
        numba.set_num_threads(min(codec_threads, numba.config.NUMBA_NUM_THREADS))
    while True:
        item = jobs.get()
        try:
            if item is _STOP:
                return
            job, future = item
            try:
                result = job()
            except BaseException as error:  # noqa: BLE001 - every failure must reach the future
                logger.debug("threelc: bucket job failed", exc_info=True)
                future.set_exception(error)
            else:
                future.set_result(result)
        finally:
            jobs.task_done()


class BucketWorker:
    """A daemon thread that runs submitted callables one at a time, in submission order."""

    def __init__(self, name: str = "threelc-hook", codec_threads: int | None = None):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs, codec_threads), name=name, daemon=True)
        self._thread.start()
        weakref.finalize(self, self._jobs.put, _STOP)
        _LIVE_WORKERS.add(self)

    def submit(self, job, devices=None) -> torch.futures.Future:
        """Queue ``job()``; the returned future resolves to its result or raises its exception."""
        future = torch.futures.Future(devices=devices) if devices else torch.futures.Future()
        self._jobs.put((job, future))
        return future

    def drain(self) -> None:
        """Block until every submitted job has finished."""
        self._jobs.join()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread (waiting at most ``timeout`` seconds)."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
