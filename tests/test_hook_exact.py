"""The hook's arithmetic, exactly: real gloo ranks, hand-made buckets, independently computed means.

Each rank calls :func:`threelc_hook` on buckets whose gradients every rank can regenerate, so each
rank computes what the result must be with nothing but the codec, and compares bit for bit.  One
spawn per world size runs every check; the tests then assert on its parts.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import threelc
from threelc import format as payload_format
from threelc.hooks import ThreeLCState, threelc_hook
from threelc.hooks.collectives import segments_in_range, shard_bounds

from _dist import run_ranks


class FakeBucket:
    """The parts of ``dist.GradBucket`` the hook reads."""

    def __init__(self, buffer, layout, index=0, is_last=True):
        self._buffer, self._layout, self._index, self._is_last = buffer, layout, index, is_last

    def buffer(self):
        return self._buffer

    def parameters(self):
        return [torch.empty(size) for size in self._layout]

    def index(self):
        return self._index

    def is_last(self):
        return self._is_last


def gradient(rank, step, layout, dtype=torch.float32):
    """Rank ``rank``'s gradient at ``step``: a per-tensor magnitude, a small constant drift, noise."""
    rng = np.random.default_rng([rank, step, len(layout)])
    pieces = [rng.standard_normal(size) * 10.0 ** (k % 3 - 1) + 0.05 for k, size in enumerate(layout)]
    values = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return torch.from_numpy(values).to(dtype)


def encode(values, segments, scale, sparsity, block_size):
    """The hook's encoder: 3LC, or the raw values when those are smaller."""
    payload = threelc.compress(values, sparsity=sparsity, segments=None if scale == "bucket" else segments,
                               block=block_size if scale == "block" else None)
    if payload.size > payload_format.HEADER_SIZE + 4 * values.size:
        payload = threelc.compress_raw(values)
    return payload


def expected_mean(gradients, layout, collective, scale, sparsity, block_size):
    """The mean every rank must apply (no error feedback), from the codec alone."""
    world_size = len(gradients)
    count = gradients[0].numel()
    grads = [g.float().numpy() for g in gradients]
    if collective == "allgather":
        total = np.zeros(count, np.float32)
        for values in grads:
            threelc.decompress_add(encode(values, layout, scale, sparsity, block_size), total)
        return total / np.float32(world_size)
    bounds = shard_bounds(count, world_size)
    result = np.empty(count, np.float32)
    for j in range(world_size):
        shard = slice(bounds[j], bounds[j + 1])
        segments = segments_in_range(layout, bounds[j], bounds[j + 1])
        shard_mean = np.zeros(bounds[j + 1] - bounds[j], np.float32)
        for values in grads:
            threelc.decompress_add(encode(values[shard], segments, scale, sparsity, block_size), shard_mean)
        shard_mean /= np.float32(world_size)
        threelc.decompress(encode(shard_mean, segments, scale, sparsity, block_size), out=result[shard])
    return result


def run_hook(state, buffer, layout, index=0, is_last=True):
    return threelc_hook(state, FakeBucket(buffer, layout, index, is_last)).wait()


MEAN_LAYOUTS = [(300, 5, 1200, 40), (2048,), (1, 3), (7,), (0, 2), ()]


MEAN_CASES = [(collective, scale, dtype) for collective in ("allgather", "scatter_reduce")
              for scale in ("tensor", "bucket", "block") for dtype in (torch.float32, torch.float16, torch.bfloat16)]
# Eight ranks on two shared cores are slow: a subset that still covers both collectives.
MEAN_CASES_8 = [("allgather", "tensor", torch.float32), ("scatter_reduce", "tensor", torch.bfloat16),
                ("scatter_reduce", "block", torch.float32)]


def _mean_checks(rank, world_size, cases, coalesce=False):
    """Hook result == mean of the decoded payloads, bitwise, for every collective/scale/dtype.

    With ``coalesce`` the step's buckets are exchanged together after the last one, so all
    buckets are handed over before any future is waited on (as DDP does); without it each
    bucket's future resolves on its own.
    """
    outcomes = {}
    for collective, scale, dtype in cases:
        state = ThreeLCState(collective=collective, coalesce=coalesce, scale=scale, block_size=64, sparsity=1.25,
                             start_iter=2, min_numel=0, error_feedback=False)
        state.iteration = 2
        gradients = {layout: [gradient(r, index, layout, dtype) for r in range(world_size)]
                     for index, layout in enumerate(MEAN_LAYOUTS)}
        futures = []
        for index, layout in enumerate(MEAN_LAYOUTS):
            bucket = FakeBucket(gradients[layout][rank].clone(), layout, index, index == len(MEAN_LAYOUTS) - 1)
            future = threelc_hook(state, bucket)
            futures.append(future if coalesce else future.wait())
        for layout, result in zip(MEAN_LAYOUTS, futures):
            result = result.wait() if coalesce else result
            expected = torch.from_numpy(expected_mean(gradients[layout], layout, collective, scale, 1.25, 64))
            key = (collective, scale, str(dtype), layout)
            outcomes[key] = (result.dtype == dtype and result.shape == gradients[layout][rank].shape
                             and torch.equal(result, expected.to(dtype)))
        state.close()
    return outcomes


def _small_bucket_check(rank, world_size):
    """Buckets below min_numel are averaged by allreduce: exact float32 mean (power-of-two N)."""
    state = ThreeLCState(start_iter=2, min_numel=1000)
    state.iteration = 5
    gradients = [gradient(r, 99, (10, 20)) for r in range(world_size)]
    result = run_hook(state, gradients[rank].clone(), (10, 20))
    state.close()
    return torch.allclose(result, torch.stack(gradients).mean(0), rtol=1e-6, atol=1e-7), state.stats()["step"]


def _feedback_drift(rank, world_size, collective, error_feedback, steps=60):
    """Accumulated true minus applied mean gradient after ``steps`` steps: its largest value, and
    its largest deviation from what the residuals say is still owed.

    Error feedback makes the gap exact bookkeeping: allgather owes the mean of the worker
    residuals; scatter-reduce owes that plus the owners' server residuals.
    """
    layout = (500, 300)
    state = ThreeLCState(collective=collective, start_iter=2, min_numel=0, error_feedback=error_feedback)
    state.iteration = 2
    applied = np.zeros(sum(layout), np.float64)
    true = np.zeros(sum(layout), np.float64)
    for step in range(steps):
        gradients = [gradient(r, 1000 + step, layout) for r in range(world_size)]
        applied += run_hook(state, gradients[rank].clone(), layout).numpy()
        true += torch.stack(gradients).mean(0).numpy()
    state.close()
    gap = true - applied
    if not error_feedback:
        return float(np.abs(gap).max()), None
    entry = state._residuals[0]
    residuals = [None] * world_size
    dist.all_gather_object(residuals, (entry.worker.numpy(), None if entry.server is None else entry.server.numpy()))
    owed = np.mean([worker.astype(np.float64) for worker, _ in residuals], axis=0)
    if collective == "scatter_reduce":
        owed += np.concatenate([server for _, server in residuals])
    return float(np.abs(gap).max()), float(np.abs(gap - owed).max())


def _mismatch_checks(rank, world_size):
    """Different options or bucket layouts on different ranks: the same clear error everywhere."""
    messages = {}
    for name, options in [("sparsity", {"sparsity": 1.0 if rank else 1.5}),
                          ("collective", {"collective": "allgather" if rank else "scatter_reduce"}),
                          ("header", {"header": "inline" if rank else "separate"}),
                          ("start_iter", {"start_iter": 2 if rank else 3})]:
        state = ThreeLCState(min_numel=0, **options)
        state.iteration = 3
        try:
            run_hook(state, gradient(rank, 0, (50,)), (50,))
            messages[name] = None
        except Exception as error:  # the hook call of the last bucket raises the worker's exception
            messages[name] = (str(error), type(error).__name__)
        state.close()
    state = ThreeLCState(min_numel=0, start_iter=2)
    state.iteration = 2
    layout = (20, 30) if rank else (30, 20)
    try:
        run_hook(state, gradient(rank, 0, layout), layout)
        messages["layout"] = None
    except Exception as error:
        messages["layout"] = (str(error), type(error).__name__)
    # A state that failed refuses further collectives instead of desynchronizing the ranks: the
    # next hook call raises the same failure again, before it issues anything.
    try:
        run_hook(state, gradient(rank, 0, layout), layout)
        messages["after_failure"] = None
    except Exception as error:
        messages["after_failure"] = (str(error), type(error).__name__)
    state.close()
    return messages


def exact_checks(rank, world_size, full):
    results = {"mean": _mean_checks(rank, world_size, MEAN_CASES if full else MEAN_CASES_8)}
    results["coalesced"] = _mean_checks(rank, world_size, MEAN_CASES_8, coalesce=True)
    if full:
        results["small"] = _small_bucket_check(rank, world_size)
        results["drift"] = {(collective, feedback): _feedback_drift(rank, world_size, collective, feedback)
                            for collective in ("allgather", "scatter_reduce") for feedback in (True, False)}
        results["one_gradient"] = float(torch.stack([gradient(r, 1000, (500, 300)) for r in range(world_size)])
                                        .mean(0).abs().max())
        results["mismatch"] = _mismatch_checks(rank, world_size)
    return results


@pytest.fixture(scope="module", params=[2, 4, 8])
def exact(request):
    world_size = request.param
    return world_size, run_ranks(exact_checks, world_size, world_size <= 4, timeout_s=420)


def test_result_is_the_mean_of_the_decoded_payloads_bitwise(exact):
    world_size, results = exact
    for rank, result in enumerate(results):
        failed = [key for key, ok in result["mean"].items() if not ok]
        assert not failed, f"world {world_size}, rank {rank}: hook result differs from the decoded mean for {failed}"
        assert len(result["mean"]) == len(MEAN_CASES if world_size <= 4 else MEAN_CASES_8) * len(MEAN_LAYOUTS)


def test_coalesced_buckets_get_the_same_bitwise_mean(exact):
    world_size, results = exact
    for rank, result in enumerate(results):
        failed = [key for key, ok in result["coalesced"].items() if not ok]
        assert not failed, f"world {world_size}, rank {rank}: coalesced hook result differs for {failed}"
        assert len(result["coalesced"]) == len(MEAN_CASES_8) * len(MEAN_LAYOUTS)


def test_small_buckets_use_allreduce(exact):
    world_size, results = exact
    if world_size == 8:
        pytest.skip("the 8-rank spawn runs the mean checks only")
    for ok, step in (result["small"] for result in results):
        assert ok
        assert step["compressed"] is False
        # One ring allreduce of 30 float32 values: 2 (N - 1) / N * 120 bytes each way, plus the
        # 8-byte configuration fingerprint to each peer.
        moved = 2 * (world_size - 1) * 120 // world_size + 8 * (world_size - 1)
        assert step["sent_bytes"] == step["received_bytes"] == moved


def test_error_feedback_keeps_the_applied_gradient_on_track(exact):
    world_size, results = exact
    if world_size == 8:
        pytest.skip("the 8-rank spawn runs the mean checks only")
    for result in results:
        drift, one = result["drift"], result["one_gradient"]
        for collective in ("allgather", "scatter_reduce"):
            (with_feedback, bookkeeping), (without, _) = drift[(collective, True)], drift[(collective, False)]
            # Everything not yet applied is in the residuals (up to float32 rounding)...
            assert bookkeeping < 1e-4 * max(with_feedback, 1.0), (collective, bookkeeping)
            # ...which stay bounded (a few steps' gradients), while without error feedback the
            # small constant term is never sent and the gap grows with every step.
            assert with_feedback < 4.0 * one, (collective, with_feedback, one)
            assert with_feedback < 0.5 * without, (collective, with_feedback, without)


def test_mismatched_configuration_raises_the_same_clear_error_on_every_rank(exact):
    world_size, results = exact
    if world_size == 8:
        pytest.skip("the 8-rank spawn runs the mean checks only")
    for name in ("sparsity", "collective", "header", "start_iter", "layout", "after_failure"):
        outcomes = [result["mismatch"][name] for result in results]
        assert all(outcome is not None for outcome in outcomes), f"{name}: some rank did not raise"
        messages = set(outcomes)
        assert len(messages) == 1, f"{name}: ranks raised different errors: {messages}"
        message, type_name = messages.pop()
        assert type_name == "ConfigMismatchError"
        if name == "after_failure":
            assert message == results[0]["mismatch"]["layout"][0]
        elif name == "layout":
            assert "different layouts" in message
        else:
            assert "different configurations" in message and f"{name}=" in message
