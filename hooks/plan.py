"""How the hook exchanges compressed buckets: which collective, whether buckets are coalesced, and
whether the payload sizes travel ahead of the payloads or with them.

``ThreeLCState(collective="auto", coalesce="auto", header="auto")`` (the defaults) decide all three
from a cost model of the measured link and codec, once, at the first compressed bucket of the run:

1. **Probe** (every rank, once): one encode of a copy of the bucket, one decode of its payload and
   one decode added into a sum (codec seconds per value and payload bytes per value; the faster of
   two runs, since a process's first codec call may load its kernels); the latency of a tiny all-to-all (the best of two, after one that
   absorbs the ranks' skew; these three also carry each rank's payload estimate, so the ranks
   agree on the probe's sizes); then all-to-alls of the sizes the exchanges will really send:
   ``P`` bytes to every peer (allgather's message, ``P`` = the step's payload) and ``P / N``
   (scatter-reduce's), each the faster of two (the first pays TCP's slow start on a far link),
   capped at :data:`PROBE_CAP` per peer.  A line through the two times gives a payload
   collective's fixed cost ``t`` and the seconds per byte ``1/b``.  Messages smaller than a far
   link's bandwidth-delay product never reach its bandwidth, so a probe of any other size
   mis-states what the exchange costs; the two measured sizes are the ones the choice is between.
2. **Agree**: the ranks exchange their figures and every rank takes the worst of each (largest
   latency, costs and codec times, largest payload), so every rank feeds the same numbers to the
   same arithmetic and chooses the same plan: no rank can switch alone.
3. **Choose**: the plan with the smallest modelled step time (:func:`step_seconds`).
4. **Try, when the call is close** (``collective="auto"`` or ``header="auto"``): if other plans'
   modelled steps (the other collective, the other header mode, or both, at the chosen
   coalescing) are within :data:`TRIAL_MARGIN` of the chosen one's, the model cannot be trusted
   to rank them (on a busy host its inputs move by more than that between runs), so the next
   compressed steps measure them all (:class:`Trial`): they take the candidates in turn
   (``ABAB..BABA``), :data:`TRIAL_STEPS` timed steps each, every step timed on each rank as the
   period since the previous step's end.  The ranks exchange their medians, take the slowest
   rank's figure for each candidate, and keep the fastest from then on.  The trial runs on step
   counts that every rank shares, so every rank switches at the same step and ends with the same
   plan.  A switch keeps the residuals' debt exact: leaving scatter-reduce folds each rank's
   server residual into its worker residual
   (:meth:`~threelc.hooks.state.ThreeLCState.residual_for`).

The model, per step, for ``n`` values in ``B`` buckets, ``N`` ranks, payload ``p`` bytes per value,
header latency ``a``, payload collective cost ``t + bytes sent / b``, codec ``e`` (encode), ``d``
(decode) and ``d+`` (decode added into a sum, which skips zero runs) seconds per value::

    allgather       (a + t) B'  + (N - 1) p n / b         + e n           + (d + (N - 1) d+) n
    scatter_reduce 2(a + t) B'  + 2 (N - 1) / N p n / b   + e n (1 + 1/N) + (d+ + d) n

(allgather decodes every rank's payload of the whole bucket into one sum; scatter-reduce adds the
N shards it serves, then decodes the N averaged shards into their places).

Each payload collective above is preceded by a header exchange (``a``) that tells the receivers
the payloads' sizes.  With ``header="inline"`` the header travels in the payload's own collective
instead (:func:`threelc.hooks.collectives.exchange_framed`): each message gets a slot of the
largest size of the last :data:`SLOT_HISTORY` exchanges of the same buckets plus a margin that
grows after an overflow (:class:`Slots`; every rank saw those sizes, so every rank makes the same
slots), padded with zeros; a payload that outgrows its slot sends the rest in a second
collective.  The model charges inline headers no ``a`` but :data:`INLINE_PADDING` more payload
bytes, so far links (large ``a``) take them and fast ones keep exact sizes.

with ``B' = 1`` when buckets are coalesced (one exchange per step after the last bucket) and
``B' = B`` otherwise; coalescing also gives up overlap with backward, charged as the
``(B - 1) / B`` share of the transfer and decoding that per-bucket exchanges could hide.  So a
slow, far link (large ``a`` and ``t``) coalesces and prefers allgather's one payload collective;
a fast link with many ranks prefers scatter-reduce's O(n) decoding and fewer bytes.

The plan (and a trial in progress) is kept in the state's ``state_dict``, so a resumed run keeps
the plan it started with (and bitwise the same arithmetic) instead of measuring again.  The steps
that measure (the probe's and the trial's) are flagged ``planning`` in the hook's statistics, so
step-time reports can leave them out.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from . import collectives

__all__ = ["Plan", "Trial", "Slots", "LinkEstimate", "HEADER_CHOICES", "step_seconds", "modelled_steps", "cheapest", "choose", "configured",
           "collective_option", "decide", "probe_sizes", "fit_transfer", "PROBE_CAP", "TRIAL_MARGIN", "TRIAL_STEPS",
           "SLOT_HISTORY", "SLOT_MARGIN", "SLOT_MARGIN_MAX", "SLOT_MARGIN_DECAY", "INLINE_PADDING", "INLINE_TIE"]

logger = logging.getLogger(__name__)

#: The largest message the transfer probe sends to one peer; a larger step payload is costed by
#: extending the line through the two probes.
PROBE_CAP = 1 << 20

#: A measured trial of both collectives runs when the slower one's modelled step is within this
#: factor of the faster one's.
TRIAL_MARGIN = 1.5
#: Timed steps the trial runs with each collective (alternating, after the probe's step).
TRIAL_STEPS = 6

#: Inline headers: a message's slot is the largest of its sizes in the last SLOT_HISTORY exchanges
#: of the same buckets, plus a margin between SLOT_MARGIN and SLOT_MARGIN_MAX of it (:class:`Slots`).
SLOT_HISTORY = 4
SLOT_MARGIN = 0.125
SLOT_MARGIN_MAX = 1.0
SLOT_MARGIN_DECAY = 0.9
#: The padding the cost model charges inline headers, as a share of the payload bytes.
INLINE_PADDING = 0.25
#: A trial keeps inline headers only if their step beats separate headers' by more than this share,
#: and by more than their extra bytes take on the link (their padding cost 30-40% more bytes in the
#: delay sweep, docs/LAUNCH.md, and 80% at 4 ranks without delay: :meth:`Trial.outcome`).
INLINE_TIE = 0.05

COLLECTIVE_CHOICES = ("allgather", "scatter_reduce")
HEADER_CHOICES = ("separate", "inline")
#: Payload collectives per exchange of one bucket (or of one coalesced step); each is preceded
#: by a header exchange.
PAYLOAD_COLLECTIVES = {"allgather": 1, "scatter_reduce": 2}


@dataclasses.dataclass(frozen=True)
class LinkEstimate:
    """The agreed measurements the model uses (seconds, bytes)."""

    latency_s: float          # one small all-to-all (a header)
    transfer_s: float         # the fixed cost of one payload all-to-all
    seconds_per_byte: float   # per byte a node sends in it: its link's inverse bandwidth
    encode_s: float           # codec seconds per value
    decode_s: float           # ... decoding into place
    decode_add_s: float       # ... decoding added into a sum
    payload_bytes: float      # payload bytes per value

    # Fixed-point encoding for the int64 exchange (picoseconds, micro-bytes).
    _SCALES = (1e12, 1e12, 1e12, 1e12, 1e12, 1e12, 1e6)

    def to_ints(self) -> list:
        values = (self.latency_s, self.transfer_s, self.seconds_per_byte, self.encode_s, self.decode_s,
                  self.decode_add_s, self.payload_bytes)
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
    header: str = "separate"  # or "inline" (plans saved before inline headers existed are "separate")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_seconds(collective: str, coalesce: bool, link: LinkEstimate, *, world_size: int, values: int,
                 buckets: int, header: str = "separate") -> float:
    """Modelled exchange-and-codec seconds of one step (see the module docstring)."""
    n, N = float(values), float(world_size)
    padding = 1.0 + INLINE_PADDING if header == "inline" else 1.0
    send = padding * link.payload_bytes * n * link.seconds_per_byte
    if collective == "allgather":
        transfer, encode = (N - 1) * send, link.encode_s * n
        decode = (link.decode_s + (N - 1) * link.decode_add_s) * n
    else:
        transfer, encode = 2 * (N - 1) / N * send, link.encode_s * n * (1 + 1 / N)
        decode = (link.decode_add_s + link.decode_s) * n
    exchanges = 1 if coalesce else max(buckets, 1)
    lost_overlap = (buckets - 1) / buckets * (transfer + decode) if coalesce and buckets > 1 else 0.0
    latency = 0.0 if header == "inline" else link.latency_s
    fixed = PAYLOAD_COLLECTIVES[collective] * (latency + link.transfer_s) * exchanges
    return fixed + transfer + encode + decode + lost_overlap


def modelled_steps(link: LinkEstimate, *, collective: str, coalesce, world_size: int, values: int,
                   buckets: int, header: str = "auto") -> dict:
    """``{(collective, coalesce, header): modelled seconds}`` for every plan the options allow."""
    collectives_allowed = COLLECTIVE_CHOICES if collective == "auto" else (collective,)
    coalesce_allowed = (False, True) if coalesce == "auto" else (bool(coalesce),)
    headers_allowed = HEADER_CHOICES if header == "auto" else (header,)
    return {(c, k, h): step_seconds(c, k, link, world_size=world_size, values=values, buckets=buckets, header=h)
            for c in collectives_allowed for k in coalesce_allowed for h in headers_allowed}


def choose(link: LinkEstimate, *, collective: str, coalesce, world_size: int, values: int, buckets: int,
           header: str = "auto") -> Plan:
    """The cheapest plan among those the options allow (``"auto"`` leaves a choice open)."""
    return cheapest(modelled_steps(link, collective=collective, coalesce=coalesce, world_size=world_size,
                                   values=values, buckets=buckets, header=header))


def cheapest(costs: dict) -> Plan:
    """The plan of the smallest of :func:`modelled_steps`' costs, with all of them as its reason."""
    best = min(costs, key=lambda key: (costs[key], key))  # ties: the same key on every rank
    reason = ", ".join(f"{c}{'+coalesce' if k else ''}{'+inline' if h == 'inline' else ''} {1e3 * t:.2f} ms"
                       for (c, k, h), t in sorted(costs.items()))
    return Plan(collective=best[0], coalesce=best[1], header=best[2], reason=f"modelled step: {reason}")


def _name(collective: str, header: str) -> str:
    return collective + ("+inline" if header == "inline" else "")


@dataclasses.dataclass
class Trial:
    """A measured comparison of the plans whose modelled steps are close (step 4 of the module
    docstring): the collectives, the header modes, or both, at the chosen coalescing.

    The trial's first step (the probe's, not timed) uses the modelled choice; the timed steps
    then take the candidates in turn, in reverse order in their second half (``ABAB..BABA``,
    ``ABCABC..CBACBA``: :meth:`order`), so that a slow drift of the host (another job, a node's
    neighbours) and work the training loop does every other step (an evaluation, a log line)
    weigh on every candidate alike.  A step is timed as the period since the previous step's end:
    its compute plus the exchange it could not hide, including the CPU its codec took from the
    other ranks' compute on a shared host, which a timer around the exchange alone would miss.
    An exchange outside DDP's backward (:func:`threelc.hooks.hook.average`, several per outer
    sync) is timed from its own start.  ``seconds[k]`` holds this rank's timed steps with
    ``candidates[k]``.
    """

    candidates: tuple      # ((collective, header), ...), the modelled choice first
    coalesce: bool
    modelled: str          # the model's reason, kept for the final plan's
    seconds: list | None = None  # per candidate (None: none yet)
    steps_done: int = 0
    steps: int = TRIAL_STEPS  # timed steps per candidate (at least 2: a resume loses one timing)
    sent: list | None = None  # per candidate: bytes this rank sent in each timed step
    seconds_per_byte: float = 0.0  # the agreed probe's: what a byte costs on the link (0: unknown)
    # When the previous step ended, on this process's clock: not saved, so the first step after
    # a resume is not timed.
    last_end: float | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        self.candidates = tuple(tuple(candidate) for candidate in self.candidates)
        if self.seconds is None:
            self.seconds = [[] for _ in self.candidates]
        if self.sent is None:  # also a trial saved before bytes were recorded
            self.sent = [[] for _ in self.candidates]

    @classmethod
    def needed(cls, chosen: Plan, costs: dict, collective_option_: str,
               seconds_per_byte: float = 0.0) -> "Trial | None":
        """The trial to run after the model chose ``chosen`` from ``costs`` (:func:`modelled_steps`,
        which holds only the plans the options allow), or None when the call is clear: every
        plan at the chosen coalescing within :data:`TRIAL_MARGIN` of the chosen one's step.
        ``seconds_per_byte``: the link's, for the outcome's rule on inline headers."""
        mine = costs[(chosen.collective, chosen.coalesce, chosen.header)]
        close = sorted((cost, collective, header) for (collective, coalesce, header), cost in costs.items()
                       if coalesce == chosen.coalesce and cost <= TRIAL_MARGIN * mine
                       and (collective == chosen.collective or collective_option_ == "auto")
                       and (collective, header) != (chosen.collective, chosen.header))
        if not close:
            return None
        return cls(candidates=((chosen.collective, chosen.header), *((c, h) for _, c, h in close)),
                   coalesce=chosen.coalesce, modelled=chosen.reason, seconds_per_byte=float(seconds_per_byte))

    def order(self) -> list:
        """Which candidate each step of the trial uses (indices into ``candidates``)."""
        count = len(self.candidates)
        half = [i % count for i in range(count * self.steps // 2)]
        return [0] + half + [count - 1 - k for k in half]

    def plan(self) -> Plan:
        """The plan of the coming step: the candidate on trial."""
        collective, header = self.candidates[self.order()[self.steps_done]]
        names = " and ".join(_name(*candidate) for candidate in self.candidates)
        return Plan(collective=collective, coalesce=self.coalesce, header=header,
                    reason=f"measured trial of {names} ({self.modelled})")

    def record(self, now: float, started: float | None = None, sent_bytes: int = 0) -> bool:
        """Close the current step at ``now`` (an exchange of its own: begun at ``started``), in
        which this rank sent ``sent_bytes``; True when the trial's steps are done.  The count of
        steps, not of timed ones, decides, so a resumed trial switches at the same steps as an
        uninterrupted one (one fewer timing)."""
        begin = started if started is not None else self.last_end
        if begin is not None:
            self.seconds[self.order()[self.steps_done]].append(float(now - begin))
            self.sent[self.order()[self.steps_done]].append(int(sent_bytes))
        self.last_end = now
        self.steps_done += 1
        return self.steps_done >= len(self.order())

    def medians(self) -> list:
        """This rank's median step seconds per candidate."""
        return [float(np.median(times)) for times in self.seconds]

    def sent_medians(self) -> list:
        """This rank's median bytes sent per step, per candidate (0 where none were recorded)."""
        return [float(np.median(sent)) if sent else 0.0 for sent in self.sent]

    def outcome(self, slowest: list, most_sent: list | None = None) -> Plan:
        """The final plan from every candidate's slowest-rank median step (the same on every rank)
        and the most bytes a rank sent per step with it: the fastest, except that inline headers
        must beat the fastest separate-header candidate by more than :data:`INLINE_TIE` and by
        more than their extra bytes take on the link (``seconds_per_byte``).  Their padding costs
        bytes that a step on a link with time to spare does not show; a trial's few steps differ
        by some percent between runs; and what inline headers save, a round trip per exchange,
        outweighs both on a far link."""
        best = min(range(len(self.candidates)), key=lambda i: (slowest[i], i))
        separate = [i for i, (_, header) in enumerate(self.candidates) if header == "separate"]
        if self.candidates[best][1] == "inline" and separate:
            runner_up = min(separate, key=lambda i: (slowest[i], i))
            extra_bytes = 0.0 if most_sent is None else max(most_sent[best] - most_sent[runner_up], 0.0)
            tie = max(INLINE_TIE * slowest[best], extra_bytes * self.seconds_per_byte)
            if slowest[runner_up] - slowest[best] <= tie:
                best = runner_up
        measured = ", ".join(f"{_name(*candidate)} {1e3 * t:.2f} ms" for candidate, t in zip(self.candidates, slowest))
        sent = "" if most_sent is None else "; bytes sent per step, the most of a rank: " + ", ".join(
            f"{_name(*candidate)} {b / 1e3:.1f} kB" for candidate, b in zip(self.candidates, most_sent))
        collective, header = self.candidates[best]
        return Plan(collective=collective, coalesce=self.coalesce, header=header,
                    reason=f"measured step: {measured} (the slowest rank's median{sent}; {self.modelled})")

    def as_dict(self) -> dict:
        saved = dataclasses.asdict(self)
        del saved["last_end"]
        return saved

    @classmethod
    def from_dict(cls, saved: dict) -> "Trial":
        saved = dict(saved)
        if "collectives" in saved:  # saved before header modes were tried: collectives alone
            saved["candidates"] = [(c, saved.pop("header", "separate")) for c in saved.pop("collectives")]
        return cls(**saved)


def collective_option(collective: str, world_size: int) -> str:
    """The ``collective`` option with what needs no measuring resolved: ``"auto"`` at 2 ranks is
    allgather (the same bytes as scatter-reduce there, one lossy step, half the collectives)."""
    return "allgather" if collective == "auto" and world_size <= 2 else collective


def configured(collective: str, coalesce, world_size: int, header: str = "auto") -> Plan | None:
    """The plan when the options leave nothing to measure, else None.  With the collective and
    coalescing both given, ``header="auto"`` is ``"separate"``: nothing was measured to pay for
    inline headers' padding."""
    collective = collective_option(collective, world_size)
    if collective == "auto" or coalesce == "auto":
        return None
    return Plan(collective=collective, coalesce=bool(coalesce), reason="configured",
                header="separate" if header == "auto" else header)


def decide(state, codec, values, segments, group, world_size: int, device: torch.device, *, buckets: int,
           total_values: int) -> tuple:
    """Probe, agree and choose (see the module docstring); runs on every rank at the same bucket.

    Returns ``(plan, trial)``: the plan of the coming steps, and the :class:`Trial` those steps
    run (None when the model's call is clear or the options leave nothing to choose)."""
    plan = configured(state.collective, state.coalesce, world_size, state.header)
    if plan is not None:
        return plan, None
    state._stats.mark_planning()
    local = _probe(codec, values, segments, group, world_size, device, state._stats, total_values)
    gathered = collectives.exchange_header(local.to_ints(), group, device, state._stats)
    link = LinkEstimate.from_ints(gathered.max(axis=0))  # the worst of each: seconds per byte too
    option = collective_option(state.collective, world_size)
    costs = modelled_steps(link, collective=option, coalesce=state.coalesce, world_size=world_size,
                           values=max(total_values, 1), buckets=max(buckets, 1), header=state.header)
    plan = cheapest(costs)
    trial = Trial.needed(plan, costs, option, link.seconds_per_byte)
    logger.info("threelc: exchange plan %s (%s; link %s)%s", _describe(plan), plan.reason, link,
                "; close call: measuring both collectives" if trial else "")
    return (plan if trial is None else trial.plan()), trial


def end_trial_step(state, group, device, started: float | None = None, sent_bytes: int = 0) -> None:
    """Close one step of the state's trial; switch collective, or agree on the outcome, when due.

    Called on the worker thread at the same step on every rank (the end of a step that
    compressed; ``started``: when an exchange of its own began; ``sent_bytes``: what this rank
    sent in the step), so every rank switches together; the outcome's header exchange is a
    collective.
    """
    trial = state._trial
    state._stats.mark_planning()
    if not trial.record(time.perf_counter(), started, sent_bytes):
        state._plan = trial.plan()
        return
    figures = [int(round(1e6 * t)) for t in trial.medians()] + [int(round(b)) for b in trial.sent_medians()]
    gathered = collectives.exchange_header(figures, group, device, state._stats).max(axis=0)
    count = len(trial.candidates)
    state._plan = trial.outcome([1e-6 * float(t) for t in gathered[:count]], [float(b) for b in gathered[count:]])
    state._trial = None
    logger.info("threelc: exchange plan %s (%s)", _describe(state._plan), state._plan.reason)


def _describe(plan: Plan) -> str:
    return (plan.collective + (" + coalesced buckets" if plan.coalesce else "")
            + (" + inline headers" if plan.header == "inline" else ""))


class Slots:
    """The slot sizes of inline-header exchanges (see the module docstring), per exchange key.

    A slot is the largest size of its message in the last :data:`SLOT_HISTORY` exchanges of the
    key, plus a margin: :data:`SLOT_MARGIN` at first, doubled (up to :data:`SLOT_MARGIN_MAX`) after
    an exchange in which some payload outgrew its slot, and shrunk by :data:`SLOT_MARGIN_DECAY`
    after one in which all fitted.  A young network's payloads grow by 10-30% a step, and each
    overflow costs the round trip that inline headers exist to save; padding costs bytes only.

    Made only from the ``sizes`` matrices that :func:`~threelc.hooks.collectives.exchange_framed`
    returned, which every rank received alike, so every rank makes the same slots.  Not saved
    with the state: a resumed run's first exchange of each key sends its header ahead (no slots),
    which changes the wire, not the arithmetic.
    """

    def __init__(self):
        self._history: dict = {}
        self._margin: dict = {}

    def for_exchange(self, key) -> np.ndarray | None:
        """``slots[i, j]`` for the next exchange of ``key`` (None before its first)."""
        history = self._history.get(key)
        if not history:
            return None
        largest = np.max(np.stack(history), axis=0)
        grown = largest + np.ceil(largest * self._margin[key]).astype(np.int64)
        return (grown + 63) // 64 * 64  # whole cache lines; a pair that sent nothing gets no slot

    def record(self, key, sizes: np.ndarray, slots: np.ndarray | None = None) -> None:
        """Remember the bytes each rank sent each rank in an exchange of ``key`` that had ``slots``."""
        sizes = np.asarray(sizes, np.int64)
        margin = self._margin.get(key, SLOT_MARGIN)
        if slots is not None:
            overflowed = bool((sizes > slots).any())
            margin = min(2 * margin, SLOT_MARGIN_MAX) if overflowed else max(SLOT_MARGIN, margin * SLOT_MARGIN_DECAY)
        self._margin[key] = margin
        history = self._history.setdefault(key, [])
        history.append(sizes)
        del history[:-SLOT_HISTORY]


def probe_sizes(step_payload: int, world_size: int) -> tuple:
    """Bytes per peer of the two transfer probes: scatter-reduce's message and allgather's.

    Allgather sends the step's payload to every peer, scatter-reduce 1/N of it (twice); both are
    capped at :data:`PROBE_CAP`, and kept at least 64 and 16 bytes so the line is defined.
    """
    large = int(min(PROBE_CAP, max(64, step_payload)))
    return max(16, large // max(world_size, 1)), large


def fit_transfer(sizes, seconds, peers: int) -> tuple:
    """The fixed cost and seconds per byte of the line through two (bytes per peer, seconds) probes.

    A node sends ``peers`` messages, so the slope is per byte it sends.  Noise can make the larger
    probe the faster one: the slope is then 0 and the fixed cost the slower time; neither is negative.
    """
    (small, large), (t_small, t_large) = sizes, seconds
    if large <= small or t_large <= t_small:
        return max(t_small, t_large), 0.0
    per_byte = (t_large - t_small) / ((large - small) * max(peers, 1))
    return max(t_small - per_byte * small * peers, 0.0), per_byte


def _probe(codec, values, segments, group, world_size, device, stats, total_values: int) -> LinkEstimate:
    """This rank's measurements (the probe's traffic is counted like any other)."""
    encode, decode, decode_add, payload_bytes = _probe_codec(codec, values, segments)
    step_payload = int(np.ceil(payload_bytes * max(total_values, 1)))
    latencies = []
    for _ in range(3):  # the first absorbs the ranks' skew; each carries this rank's payload size
        start = time.perf_counter()
        gathered = collectives.exchange_header([step_payload], group, device, stats)
        latencies.append(time.perf_counter() - start)
    sizes = probe_sizes(int(gathered.max()), world_size)  # the same on every rank
    seconds = [float("inf"), float("inf")]
    for _ in range(2):  # the first of each pays TCP's slow start on a far link: keep the faster
        for which in (1, 0):
            seconds[which] = min(seconds[which], _time_transfer(sizes[which], group, world_size, device, stats))
    transfer, per_byte = fit_transfer(sizes, seconds, world_size - 1)
    return LinkEstimate(latency_s=min(latencies[1:]), transfer_s=transfer, seconds_per_byte=per_byte,
                        encode_s=encode, decode_s=decode, decode_add_s=decode_add, payload_bytes=payload_bytes)


def _time_transfer(nbytes: int, group, world_size: int, device, stats) -> float:
    """Seconds of one all-to-all of ``nbytes`` to every peer."""
    rank = torch.distributed.get_rank(group)
    block = np.zeros(nbytes, dtype=np.uint8)
    outgoing = [block[:0] if peer == rank else block for peer in range(world_size)]
    sizes = [0 if peer == rank else nbytes for peer in range(world_size)]
    start = time.perf_counter()
    collectives.exchange_payloads(outgoing, sizes, group, device, stats)
    return time.perf_counter() - start


def _probe_codec(codec, values, segments) -> tuple:
    """Seconds per value of an encode, a decode and a decode added into a sum of a copy of the
    bucket, and its payload bytes per value."""
    sample = codec.zeros(codec.numel(values))
    codec.add(sample, values)
    count = max(codec.numel(sample), 1)
    encode = decode = decode_add = float("inf")
    for _ in range(2):  # the first call of a process may load or compile the kernels: keep the second
        start = time.perf_counter()
        payload, _, _ = codec.compress(sample, segments)  # takes the codec lock itself
        encode = min(encode, (time.perf_counter() - start) / count)
        scratch = codec.zeros(codec.numel(values))
        with codec.lock():
            start = time.perf_counter()
            codec.decompress(payload, scratch)
            decode = min(decode, (time.perf_counter() - start) / count)
            start = time.perf_counter()
            codec.decompress_add(payload, scratch)
            decode_add = min(decode_add, (time.perf_counter() - start) / count)
    return encode, decode, decode_add, codec.nbytes(payload) / count
