"""CPU seconds per thread name (launch/runs/cputime.py) and their arithmetic per step."""

from __future__ import annotations

import sys
import time

import pytest

from threelc.hooks.worker import BucketWorker
from threelc.launch.runs import cputime

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@linux
def test_sample_names_the_main_thread_and_the_hook_worker():
    worker = BucketWorker()  # named threelc-hook in the OS too, so its CPU is told apart
    try:
        before = cputime.sample()
        worker.submit(lambda: _spin(0.2)).wait()
        _spin(0.1)
        after = cputime.sample()
    finally:
        worker.close()
    assert after["threelc-hook"] - before.get("threelc-hook", 0.0) > 0.1
    assert after[cputime.MAIN] - before[cputime.MAIN] > 0.05


def test_per_step_takes_the_samples_inside_the_window():
    records = [{"step": 0, "cpu": {"main": 1.0}},
               {"step": 10, "cpu": {"main": 2.0, "threelc-hook": 0.5}},
               {"step": 20, "cpu": {"main": 4.0, "threelc-hook": 1.5, "gloo_tcp_loop": 0.2}},
               {"step": 30, "cpu": {"main": 7.0, "threelc-hook": 2.0}},
               {"step": 33, "cpu": {"main": 9.0, "threelc-hook": 3.0}}]
    # Steps 11..33: the samples after steps 10 and 33.
    seconds, steps = cputime.per_step(records, 11, 33)
    assert steps == 23 and seconds == {"main": pytest.approx(7.0 / 23), "threelc-hook": pytest.approx(2.5 / 23)}
    # Steps 12..31: the first sample at or after step 11 is step 20's, the last at or before 31 is step 30's.
    seconds, steps = cputime.per_step(records, 12, 31)
    assert steps == 10 and seconds == {"main": pytest.approx(0.3), "threelc-hook": pytest.approx(0.05)}
    # A thread that started between the samples counts from zero; one that ended is left out.
    seconds, _ = cputime.per_step(records, 11, 20)
    assert seconds == {"main": pytest.approx(0.2), "threelc-hook": pytest.approx(0.1), "gloo_tcp_loop": pytest.approx(0.02)}
    assert cputime.per_step(records, 21, 29) is None  # one sample inside: no span
    assert cputime.per_step([], 1, 100) is None
