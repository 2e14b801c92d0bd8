"""The spawned-rank harness (tests/_dist.py) itself: a rank killed by a signal is reported with its stack."""

from __future__ import annotations

import os

import pytest
from _dist import run_ranks


def _rank_one_aborts(rank, world_size):
    if rank == 1:
        os.abort()  # what a C++ "terminate called without an active exception" does
    return rank


def test_a_rank_killed_by_sigabrt_is_reported_with_its_python_stack():
    with pytest.raises(AssertionError) as failure:
        run_ranks(_rank_one_aborts, 2, timeout_s=120)
    message = str(failure.value)
    assert "rank1.fault" in message and "Fatal Python error: Aborted" in message
    assert "_rank_one_aborts" in message  # the frame that was running when the signal came
    assert "rank0.fault" not in message  # a rank that finished cleanly adds nothing


def _ranks_return(rank, world_size):
    return rank * 10


def test_ranks_that_finish_return_their_results_in_rank_order():
    assert run_ranks(_ranks_return, 2) == [0, 10]


def _rank_aborts_in_teardown(rank, world_size):
    import atexit

    atexit.register(os.abort)  # stands in for gloo's occasional abort in interpreter teardown
    return rank


def test_a_passing_rank_leaves_without_the_interpreter_teardown():
    """A rank whose test passed (result saved, process group destroyed) exits before interpreter
    teardown, where gloo's threads aborted now and then under heavy oversubscription."""
    assert run_ranks(_rank_aborts_in_teardown, 2) == [0, 1]


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1's check failed")
    return rank


def test_a_rank_that_raises_is_reported_with_its_traceback():
    with pytest.raises(AssertionError, match="rank 1's check failed"):
        run_ranks(_rank_one_raises, 2, timeout_s=120)
