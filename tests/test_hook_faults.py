"""Faults through real DDP backward passes on real gloo ranks: what a user's ``except`` sees.

* Typed errors: a configuration mismatch and a corrupt payload reach ``loss.backward()``'s caller
  with their own type and message (not DDP's "Unable to cast ... to Tensor"), on every rank.
* Corruption: a rank whose payloads are damaged after encoding (truncated, random bytes, a finite
  scale times 1e6, flipped body bytes, huge declared lengths) makes every rank raise the same
  :class:`~threelc.hooks.CorruptPayloadError` naming it, in the same step, for both collectives.
* Memory: the hook's tensors are the residuals only: 4 bytes per value, plus 4 / N for
  scatter-reduce's server residual (counted from the state's tensors, not from RSS).
* A killed rank ends the others with the collective's error (bounded by the test's timeout).

One spawn per world size runs every case: after a fault every rank has issued the same
collectives, so the process group stays usable for the next case.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import threelc
from threelc import format as payload_format
from threelc.hooks import ConfigMismatchError, CorruptPayloadError, register
from threelc.hooks import codecs
from threelc.hooks import hook as hook_module
from threelc.hooks.collectives import shard_bounds

from _dist import run_ranks

START_ITER = 2
FAULT_STEP = 3  # the first compressed step is START_ITER; one clean compressed step before the fault
BAD_RANK = 1
KINDS = ("truncation", "random_bytes", "scale_x1e6", "flipped_body", "huge_lengths")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _batch(rank, step):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * rank + step))


def corrupt(payload, kind: str):
    """The payload damaged after encoding, as memory, a wire or a faulty peer could damage it."""
    if isinstance(payload, torch.Tensor):  # the torch codec's payloads
        return torch.from_numpy(corrupt(payload.cpu().numpy(), kind)).to(payload.device)
    payload = payload.copy()
    if kind == "truncation":
        return payload[: payload.size // 2]
    if kind == "random_bytes":
        return np.random.default_rng(payload.size).integers(0, 256, payload.size).astype(np.uint8)
    if kind == "scale_x1e6":
        header = payload_format.parse(payload).header
        offset = payload_format.HEADER_SIZE + 8 * header.segment_count  # the first scale
        scale = np.frombuffer(payload[offset:offset + 4].tobytes(), "<f4")[0]
        payload[offset:offset + 4] = np.frombuffer(np.float32(scale * 1e6 or 1e6).tobytes(), np.uint8)
        return payload
    if kind == "flipped_body":
        payload[-3:] ^= 0xFF
        return payload
    if kind == "huge_lengths":
        payload[8:16] = np.frombuffer(np.uint64(1 << 39).tobytes(), np.uint8)  # count
        payload[32:40] = np.frombuffer(np.uint64(1 << 50).tobytes(), np.uint8)  # body_length
        return payload
    raise ValueError(kind)


class _Corrupter:
    """Wraps the codec's compress on the bad rank: from the fault step on, damage what it sends.

    ``target`` "all" damages every payload; "mean" only scatter-reduce's compressed shard means
    (the compress calls made inside the hook's ``_shard_mean``), so the fault reaches every rank alike.
    """

    def __init__(self, kind, target, world_size):
        self.kind, self.target, self.world_size = kind, target, world_size
        self.active = False
        self.in_mean = False
        self.original = codecs._Codec.compress
        self.original_mean = hook_module._shard_mean

    def __enter__(self):
        corrupter = self

        def compress(codec, values, segments, residual=None):
            payload, nonfinite, kept = corrupter.original(codec, values, segments, residual)
            if corrupter.active and (corrupter.target == "all" or corrupter.in_mean):
                return corrupt(payload, corrupter.kind), nonfinite, kept
            return payload, nonfinite, kept

        def shard_mean(*args, **kwargs):
            corrupter.in_mean = True
            try:
                return corrupter.original_mean(*args, **kwargs)
            finally:
                corrupter.in_mean = False

        codecs._Codec.compress = compress
        hook_module._shard_mean = shard_mean
        return self

    def __exit__(self, *exc):
        codecs._Codec.compress = self.original
        hook_module._shard_mean = self.original_mean


def _train_until_fault(rank, world_size, collective, kind, target="all", options=None):
    """Train until a step raises; return what the rank's ``except`` saw and the hook's memory."""
    ddp = DDP(_net(), bucket_cap_mb=0.01)
    state = register(ddp, collective=collective, start_iter=START_ITER, min_numel=0, block_size=100,
                     **(options or {}))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    outcome = {"caught": None, "step": None, "memory": None, "buckets": None}
    with _Corrupter(kind, target, world_size) as corrupter:
        for step in range(FAULT_STEP + 2):
            corrupter.active = kind is not None and rank == BAD_RANK and step >= FAULT_STEP
            optimizer.zero_grad()
            loss = ddp(_batch(rank, step)).pow(2).mean()
            try:
                loss.backward()
            except threelc.FormatError as error:  # what a user writes: the codec's public error type
                outcome.update(caught=type(error).__name__, message=str(error), step=step,
                               sender=getattr(error, "sender", None), receiver=getattr(error, "receiver", None))
                break
            except ConfigMismatchError as error:
                outcome.update(caught=type(error).__name__, message=str(error), step=step)
                break
            optimizer.step()
            if step == START_ITER:
                outcome["memory"] = state.memory_bytes()
                outcome["buckets"] = [sum(entry.layout) for entry in state._residuals.values()]
    state.close()
    outcome["parameters"] = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    return outcome


def fault_cases(rank, world_size):
    results = {}
    for collective in ("allgather", "scatter_reduce"):
        results[("clean", collective)] = _train_until_fault(rank, world_size, collective, None)
        for kind in KINDS:
            results[(kind, collective)] = _train_until_fault(rank, world_size, collective, kind)
    results[("scale_x1e6", "scatter_reduce", "mean")] = _train_until_fault(
        rank, world_size, "scatter_reduce", "scale_x1e6", target="mean")
    for collective in ("allgather", "scatter_reduce"):
        results[("flipped_body", collective, "torch")] = _train_until_fault(
            rank, world_size, collective, "flipped_body", options={"codec": "torch"})
    results["mismatch"] = _train_until_fault(rank, world_size, "allgather", None,
                                             options={"sparsity": 1.5 if rank == BAD_RANK else 1.0})
    return results


@pytest.fixture(scope="module", params=[2, 3])
def faults(request):
    return request.param, run_ranks(fault_cases, request.param, timeout_s=400)


@pytest.mark.parametrize("collective", ["allgather", "scatter_reduce"])
@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_payload_raises_the_same_typed_error_on_every_rank(faults, kind, collective):
    world_size, results = faults
    outcomes = [result[(kind, collective)] for result in results]
    assert [o["caught"] for o in outcomes] == ["CorruptPayloadError"] * world_size
    assert {o["step"] for o in outcomes} == {FAULT_STEP}, "every rank stops in the step of the fault"
    assert len({o["message"] for o in outcomes}) == 1, "every rank raises the same message"
    assert {o["sender"] for o in outcomes} == {BAD_RANK}
    message = outcomes[0]["message"]
    assert f"rank {BAD_RANK} sent" in message
    expected = "bad magic" if kind == "random_bytes" else "checksum mismatch"
    assert expected in message
    # No step was applied with it: every replica holds the parameters of the last clean step.
    assert all(torch.equal(o["parameters"], outcomes[0]["parameters"]) for o in outcomes)
    if collective == "scatter_reduce":
        # Every owner got a corrupt shard; the lowest owner's report is the one every rank raises.
        assert {o["receiver"] for o in outcomes} == {0}
        assert "to rank 0" in message


@pytest.mark.parametrize("collective", ["allgather", "scatter_reduce"])
def test_corrupt_payload_from_the_torch_codec_raises_the_same_error(faults, collective):
    world_size, results = faults
    outcomes = [result[("flipped_body", collective, "torch")] for result in results]
    numba_outcomes = [result[("flipped_body", collective)] for result in results]
    assert [o["caught"] for o in outcomes] == ["CorruptPayloadError"] * world_size
    assert len({o["message"] for o in outcomes}) == 1 and {o["sender"] for o in outcomes} == {BAD_RANK}
    # The device codec verifies the same checksum: the same message as with the numba codec.
    assert outcomes[0]["message"] == numba_outcomes[0]["message"]


def test_corrupt_shard_means_raise_the_same_error_on_every_rank(faults):
    world_size, results = faults
    outcomes = [result[("scale_x1e6", "scatter_reduce", "mean")] for result in results]
    assert [o["caught"] for o in outcomes] == ["CorruptPayloadError"] * world_size
    assert len({o["message"] for o in outcomes}) == 1 and {o["step"] for o in outcomes} == {FAULT_STEP}
    assert {o["sender"] for o in outcomes} == {BAD_RANK} and {o["receiver"] for o in outcomes} == {None}
    assert "checksum mismatch" in outcomes[0]["message"]


def test_config_mismatch_is_caught_by_type_through_ddp_backward(faults):
    world_size, results = faults
    outcomes = [result["mismatch"] for result in results]
    assert [o["caught"] for o in outcomes] == ["ConfigMismatchError"] * world_size
    assert len({o["message"] for o in outcomes}) == 1
    assert "different configurations" in outcomes[0]["message"] and "sparsity=np.float32(1.5)" in outcomes[0]["message"]
    assert "Unable to cast" not in outcomes[0]["message"]


@pytest.mark.parametrize("collective", ["allgather", "scatter_reduce"])
def test_hook_memory_is_the_residuals_only(faults, collective):
    """4 bytes per compressed value (worker residual) + 4 / N (server residual): no backups."""
    world_size, results = faults
    for rank, result in enumerate(results):
        outcome = result[("clean", collective)]
        assert outcome["caught"] is None
        buckets = outcome["buckets"]
        parameters = outcome["parameters"].numel()
        assert sum(buckets) == parameters  # every bucket compressed (min_numel=0), no padding
        expected = 4 * parameters
        if collective == "scatter_reduce":
            expected += 4 * sum(int(np.diff(shard_bounds(count, world_size))[rank]) for count in buckets)
        assert outcome["memory"] == expected
        assert outcome["memory"] <= 4 * (1 + 1 / world_size) * parameters + 4 * len(buckets)


def _killed_rank(rank, world_size):
    """Rank 2 dies in the middle of a compressed step; the others must end with an error."""
    ddp = DDP(_net(), bucket_cap_mb=0.01)
    state = register(ddp, start_iter=START_ITER, min_numel=0)
    try:
        for step in range(FAULT_STEP + 2):
            loss = ddp(_batch(rank, step)).pow(2).mean()
            if rank == 2 and step == FAULT_STEP:
                os._exit(0)  # no goodbye: its sockets just close
            loss.backward()
    except Exception as error:  # noqa: BLE001 - the collective's own type is what the user gets
        return {"caught": type(error).__name__, "message": str(error), "step": step}
    finally:
        state.close()
    return {"caught": None}


def test_a_killed_rank_ends_the_others_with_an_error():
    results = run_ranks(_killed_rank, 3, timeout_s=240, collective_timeout_s=60, missing_ok=True)
    assert results[2] is None  # it died without a result
    for outcome in results[:2]:
        assert outcome["caught"] is not None, "a survivor finished its steps without its peer"
        assert outcome["step"] == FAULT_STEP
        assert "Unable to cast" not in outcome["message"]
