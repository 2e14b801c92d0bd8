"""How the hook exchanges compressed buckets: which collective, and whether buckets are coalesced.

``ThreeLCState(collective="auto", coalesce="auto")`` (the defaults) decide both from a cost model
of the measured link and codec, once, at the first compressed bucket of the run:

1. **Probe** (every rank, ~6 round trips once): the latency of a tiny all-to-all (the best of
   two, after one that absorbs the ranks' skew), the time of an all-to-all of
   up to :data:`PROBE_BYTES` to every peer (bandwidth; the faster of two back to back, since the first
   pays TCP's slow start on a far link), and one encode and decode of a copy of the bucket
   (codec seconds per value, payload bytes per value; the faster of two runs, since a process's
   first codec call may load its kernels).
2. **Agree**: the ranks exchange their figures and every rank takes the worst of each (largest
   latency and codec times, smallest bandwidth, largest payload), so every rank feeds the same
   numbers to the same arithmetic and chooses the same plan: no rank can switch alone.
3. **Choose**: the plan with the smallest modelled step time (:func:`step_seconds`).

The model, per step, for ``n`` values in ``B`` buckets, ``N`` ranks, payload ``p`` bytes per value,
latency ``a`` per collective, link bandwidth ``b`` bytes/s per node, codec ``e`` (encode) and ``d``
(decode) seconds per value::

    allgather       2 a B' + (N - 1) p n / b         + e n           + N d n
    scatter_reduce  4 a B' + 2 (N - 1) / N p n / b   + e n (1 + 1/N) + 2 d n

with ``B' = 1`` when buckets are coalesced (one exchange per step after the last bucket) and
``B' = B`` otherwise; coalescing also gives up overlap with backward, charged as the
``(B - 1) / B`` share of the transfer and decoding that per-bucket exchanges could hide.  So a
slow, far link (large ``a``) coalesces and prefers allgather's two collectives; a fast link
with many ranks prefers scatter-reduce's O(n) decoding and fewer bytes.

The plan is kept in the state's ``state_dict``, so a resumed run keeps the plan it started with
(and bitwise the same arithmetic) instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from . import collectives

__all__ = ["Plan", "LinkEstimate", "step_seconds", "choose", "configured", "collective_option", "decide",
           "probe_bytes", "PROBE_BYTES"]

logger = logging.getLogger(__name__)

#: Bytes the bandwidth probe sends to each peer, at most; a small model sends less: each of the
#: two probes moves at most 1/16 of one float32 gradient per rank (:func:`probe_bytes`).
PROBE_BYTES = 64 * 1024

COLLECTIVE_CHOICES = ("allgather", "scatter_reduce")
#: Collectives per exchange of one bucket (or of one coalesced step).
ROUND_TRIPS = {"allgather": 2, "scatter_reduce": 4}


@dataclasses.dataclass(frozen=True)
class LinkEstimate:
    """The agreed measurements the model uses (seconds, bytes)."""

    latency_s: float          # one small all-to-all
    seconds_per_byte: float   # per byte a node sends, its link's inverse bandwidth
    encode_s: float           # codec seconds per value
    decode_s: float
    payload_bytes: float      # payload bytes per value

    # Fixed-point encoding for the int64 exchange (picoseconds, micro-bytes).
    _SCALES = (1e12, 1e12, 1e12, 1e12, 1e6)

    def to_ints(self) -> list:
        values = (self.latency_s, self.seconds_per_byte, self.encode_s, self.decode_s, self.payload_bytes)
        return [int(round(value * scale)) for value, scale in zip(values, self._SCALES)]

    @classmethod
    def from_ints(cls, ints) -> "LinkEstimate":
        return cls(*(float(value) / scale for value, scale in zip(ints, cls._SCALES)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the hook does with compressed buckets from now on; the same on every rank."""

    collective: str
    coalesce: bool
    reason: str  # "configured" or the modelled step times

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_seconds(collective: str, coalesce: bool, link: LinkEstimate, *, world_size: int, values: int,
                 buckets: int) -> float:
    """Modelled exchange-and-codec seconds of one step (see the module docstring)."""
    n, N = float(values), float(world_size)
    send = link.payload_bytes * n * link.seconds_per_byte
    if collective == "allgather":
        transfer, encode, decode = (N - 1) * send, link.encode_s * n, N * link.decode_s * n
    else:
        transfer, encode, decode = 2 * (N - 1) / N * send, link.encode_s * n * (1 + 1 / N), 2 * link.decode_s * n
    exchanges = 1 if coalesce else max(buckets, 1)
    lost_overlap = (buckets - 1) / buckets * (transfer + decode) if coalesce and buckets > 1 else 0.0
    return ROUND_TRIPS[collective] * link.latency_s * exchanges + transfer + encode + decode + lost_overlap


def choose(link: LinkEstimate, *, collective: str, coalesce, world_size: int, values: int, buckets: int) -> Plan:
    """The cheapest plan among those the options allow (``"auto"`` leaves a choice open)."""
    collectives_allowed = COLLECTIVE_CHOICES if collective == "auto" else (collective,)
    coalesce_allowed = (False, True) if coalesce == "auto" else (bool(coalesce),)
    costs = {(c, k): step_seconds(c, k, link, world_size=world_size, values=values, buckets=buckets)
             for c in collectives_allowed for k in coalesce_allowed}
    best = min(costs, key=lambda key: (costs[key], key))  # ties: the same key on every rank
    reason = ", ".join(f"{c}{'+coalesce' if k else ''} {1e3 * t:.2f} ms" for (c, k), t in sorted(costs.items()))
    return Plan(collective=best[0], coalesce=best[1], reason=f"modelled step: {reason}")


def collective_option(collective: str, world_size: int) -> str:
    """The ``collective`` option with what needs no measuring resolved: ``"auto"`` at 2 ranks is
    allgather (the same bytes as scatter-reduce there, one lossy step, half the collectives)."""
    return "allgather" if collective == "auto" and world_size <= 2 else collective


def configured(collective: str, coalesce, world_size: int) -> Plan | None:
    """The plan when the options leave nothing to measure, else None."""
    collective = collective_option(collective, world_size)
    if collective == "auto" or coalesce == "auto":
        return None
    return Plan(collective=collective, coalesce=bool(coalesce), reason="configured")


def decide(state, codec, values, segments, group, world_size: int, device: torch.device, *, buckets: int,
           total_values: int) -> Plan:
    """Probe, agree and choose (see the module docstring); runs on every rank at the same bucket."""
    plan = configured(state.collective, state.coalesce, world_size)
    if plan is not None:
        return plan
    local = _probe(codec, values, segments, group, world_size, device, state._stats,
                   probe_bytes(total_values, world_size))
    gathered = collectives.exchange_header(local.to_ints(), group, device, state._stats)
    link = LinkEstimate.from_ints(gathered.max(axis=0))  # the worst of each: seconds per byte too
    plan = choose(link, collective=collective_option(state.collective, world_size), coalesce=state.coalesce, world_size=world_size,
                  values=max(total_values, 1), buckets=max(buckets, 1))
    logger.info("threelc: exchange plan %s (%s; link %s)", plan.collective + (" + coalesced buckets" if plan.coalesce
                                                                              else ""), plan.reason, link)
    return plan


def probe_bytes(values: int, world_size: int) -> int:
    """Bytes per peer of one bandwidth probe: 1/16 of a float32 gradient of ``values`` values per
    rank, split over the peers, between 256 bytes and :data:`PROBE_BYTES`."""
    return int(min(PROBE_BYTES, max(256, 4 * values // (16 * max(world_size - 1, 1)))))


def _probe(codec, values, segments, group, world_size, device, stats, nbytes: int) -> LinkEstimate:
    """This rank's measurements (the probe's traffic is counted like any other)."""
    latencies = []
    for _ in range(3):  # the first absorbs the ranks' skew
        start = time.perf_counter()
        collectives.exchange_header([0], group, device, stats)
        latencies.append(time.perf_counter() - start)
    latency = min(latencies[1:])
    rank = torch.distributed.get_rank(group)
    block = np.zeros(nbytes, dtype=np.uint8)
    outgoing = [block[:0] if peer == rank else block for peer in range(world_size)]
    sizes = [0 if peer == rank else nbytes for peer in range(world_size)]
    transfers = []
    for _ in range(2):  # the first one pays TCP's slow start on a far link: keep the faster
        start = time.perf_counter()
        collectives.exchange_payloads(outgoing, sizes, group, device, stats)
        transfers.append(max(time.perf_counter() - start - latency, 0.0))
    seconds_per_byte = min(transfers) / (nbytes * (world_size - 1))

    sample = codec.zeros(codec.numel(values))
    codec.add(sample, values)
    count = max(codec.numel(sample), 1)
    encode = decode = float("inf")
    for _ in range(2):  # the first call of a process may load or compile the kernels: keep the second
        start = time.perf_counter()
        payload, _ = codec.compress(sample, segments)  # takes the codec lock itself
        encode = min(encode, (time.perf_counter() - start) / count)
        scratch = codec.zeros(codec.numel(values))
        with codec.lock():
            start = time.perf_counter()
            codec.decompress(payload, scratch)
            decode = min(decode, (time.perf_counter() - start) / count)
    return LinkEstimate(latency_s=latency, seconds_per_byte=seconds_per_byte, encode_s=encode, decode_s=decode,
                        payload_bytes=codec.nbytes(payload) / count)
