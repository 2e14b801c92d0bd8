"""Headers that travel with the payloads: ``collectives.exchange_framed`` with and without slots,
the hook's ``header="inline"`` against ``"separate"`` step by step, and the slots and cost model
behind ``header="auto"``."""

import numpy as np
import pytest
import torch

from threelc.hooks import ConfigMismatchError, ThreeLCState, collectives, plan, threelc_hook
from threelc.hooks.stats import HookStats

from _dist import run_ranks
from test_hook_exact import FakeBucket, gradient
from test_hook_plan import FAR, NEAR


# ---------------------------------------------------------------------------- the collective alone
def _message(source, target, size):
    return np.random.default_rng([source, target, size]).integers(0, 256, size, dtype=np.uint8)


def _sizes(world_size, case):
    """Bytes rank i sends rank j: uneven, some zero, none to itself."""
    sizes = np.random.default_rng([world_size, case]).integers(0, 300, (world_size, world_size))
    sizes[np.random.default_rng(case).random((world_size, world_size)) < 0.2] = 0
    np.fill_diagonal(sizes, 0)
    return sizes


SLOT_CASES = {
    "none": lambda sizes: None,                          # the frames alone, then exact sizes
    "roomy": lambda sizes: sizes + 64,                   # everything fits: one collective
    "tight": lambda sizes: sizes,                        # exactly full
    "short": lambda sizes: np.maximum(sizes - 37, 0),    # odd-sized slots, every non-empty payload overflows
    "mixed": lambda sizes: np.where(sizes % 2 == 1, sizes // 3, sizes + 5),
}


def _framed_checks(rank, world_size):
    outcomes = {}
    for case, (name, make_slots) in enumerate(SLOT_CASES.items()):
        for kind in ("numpy", "tensor"):
            sizes = _sizes(world_size, case)
            slots = make_slots(sizes)
            outgoing = [_message(rank, j, int(sizes[rank, j])) for j in range(world_size)]
            if kind == "tensor":
                outgoing = [torch.from_numpy(payload) for payload in outgoing]
            stats = HookStats(None)
            header = [rank, case, -7 * rank]
            headers, sent, received = collectives.exchange_framed(header, outgoing, slots, group=None,
                                                                  device=torch.device("cpu"), stats=stats)
            as_numpy = [payload.numpy() if isinstance(payload, torch.Tensor) else payload for payload in received]
            outcomes[(name, kind)] = {
                "kinds": {type(payload).__name__ for payload in received},
                "received": all(np.array_equal(as_numpy[i], _message(i, rank, int(sizes[i, rank])))
                                for i in range(world_size)),
                "own_empty": len(as_numpy[rank]) == 0,
                "headers": headers.tolist(), "sent": sent.tolist(),
                "collectives": stats.current.collectives, "sent_bytes": stats.current.sent_bytes,
                "received_bytes": stats.current.received_bytes}
    return outcomes


@pytest.mark.parametrize("world_size", [2, 4])
def test_framed_exchange_delivers_every_payload_with_or_without_slots(world_size):
    results = run_ranks(_framed_checks, world_size)
    frame = 8 * (world_size + 3)  # the N message sizes, then the caller's 3 header values
    for case, (name, make_slots) in enumerate(SLOT_CASES.items()):
        sizes = _sizes(world_size, case)
        slots = make_slots(sizes)
        slots = np.zeros_like(sizes) if slots is None else slots
        overflow = np.maximum(sizes - slots, 0)
        for kind in ("numpy", "tensor"):
            for rank, result in enumerate(results):
                outcome = result[(name, kind)]
                assert outcome["received"] and outcome["own_empty"], (name, kind, rank)
                assert outcome["kinds"] == {"ndarray" if kind == "numpy" else "Tensor"}
                assert outcome["headers"] == [[i, case, -7 * i] for i in range(world_size)]
                assert outcome["sent"] == sizes.tolist()
                # A second collective exactly when some payload, anywhere, outgrew its slot.
                assert outcome["collectives"] == (2 if overflow.any() else 1), (name, rank)
                peers = np.arange(world_size) != rank
                assert outcome["sent_bytes"] == frame * (world_size - 1) + slots[rank, peers].sum() \
                    + overflow[rank].sum()
                assert outcome["received_bytes"] == frame * (world_size - 1) + slots[peers, rank].sum() \
                    + overflow[:, rank].sum()


# ---------------------------------------------------------------------------- the hook, step by step
LAYOUTS = [(700, 300), (1500,)]


def _step_gradient(rank, step, layout):
    """Sparse-looking gradients (a few outliers: small payloads), except a dense one at step 3
    (a payload larger than any slot so far) and a NaN in the first bucket on rank 1 at step 5."""
    values = gradient(rank, step, layout)
    if step != 3:
        values = values * 1e-3
        values[::97] = 5.0
    if step == 5 and rank == 1 and layout == LAYOUTS[0]:
        values[3] = float("nan")
    return values


def _run_steps(rank, header, collective, steps=7):
    state = ThreeLCState(collective=collective, coalesce=True, header=header, block_size=256, start_iter=2,
                         min_numel=0)
    state.iteration = 2
    outputs, counts = [], []
    for step in range(steps):
        futures = [threelc_hook(state, FakeBucket(_step_gradient(rank, step, layout), layout, index,
                                                  index == len(LAYOUTS) - 1))
                   for index, layout in enumerate(LAYOUTS)]
        outputs.append(torch.cat([future.wait() for future in futures]))
        counts.append(state.stats()["step"]["collectives"])
    residuals = state.state_dict()["residuals"]
    state.close()
    return outputs, counts, residuals


def _inline_against_separate(rank, world_size):
    return {collective: {header: _run_steps(rank, header, collective) for header in ("separate", "inline")}
            for collective in ("allgather", "scatter_reduce")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_inline_headers_change_round_trips_not_results(world_size):
    results = run_ranks(_inline_against_separate, world_size, timeout_s=240)
    for collective in ("allgather", "scatter_reduce"):
        payload_collectives = 1 if collective == "allgather" else 2
        for rank, result in enumerate(results):
            (separate, separate_counts, separate_residuals) = result[collective]["separate"]
            (inline, inline_counts, inline_residuals) = result[collective]["inline"]
            for step, (a, b) in enumerate(zip(separate, inline)):
                assert torch.equal(a.isnan(), b.isnan()), (collective, rank, step)
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), (collective, rank, step)
            assert torch.equal(inline[-1], results[0][collective]["inline"][0][-1])  # the replicas agree
            # The NaN step: the first bucket is NaN everywhere, the second averaged; then back to normal.
            first = sum(LAYOUTS[0])
            assert bool(inline[5][:first].isnan().all()) and not inline[5][first:].isnan().any()
            assert not inline[6].isnan().any()
            assert repr(separate_residuals) == repr(inline_residuals)
            # Separate headers: a frame collective before each payload collective, every step (the
            # first also checks the configuration).
            assert separate_counts == [2 * payload_collectives + 1] + [2 * payload_collectives] * 6
            # Inline: no slots at the first step; then the header rides with a payload that fits
            # its slot; the dense step outgrows its slots; the next fits again.
            assert inline_counts[0] == 2 * payload_collectives + 1
            assert inline_counts[1] == inline_counts[2] == inline_counts[4] == payload_collectives, inline_counts
            assert inline_counts[3] > payload_collectives, inline_counts


def _mismatch_after_inline_steps(rank, world_size):
    state = ThreeLCState(collective="allgather", coalesce=True, header="inline", block_size=256, start_iter=2,
                         min_numel=0)
    state.iteration = 2
    layout = (1000,)
    for step in range(3):  # slots exist from the second step on
        threelc_hook(state, FakeBucket(_step_gradient(rank, step, layout), layout, 0, True)).wait()
    swapped = (400, 600) if rank == world_size - 1 else (600, 400)  # same size, another layout
    try:
        threelc_hook(state, FakeBucket(_step_gradient(rank, 3, swapped), swapped, 0, True)).wait()
        outcome = None
    except ConfigMismatchError as error:
        outcome = str(error)
    state.close()
    return outcome


def test_a_layout_mismatch_is_still_raised_on_every_rank_with_inline_headers():
    outcomes = run_ranks(_mismatch_after_inline_steps, 4)
    assert all(outcome is not None for outcome in outcomes)
    assert len(set(outcomes)) == 1 and "different layouts" in outcomes[0]


# ---------------------------------------------------------------------------- slots, model, option
def _expected_slots(largest, margin):
    grown = np.asarray(largest) + np.ceil(np.asarray(largest) * margin).astype(np.int64)
    return ((grown + 63) // 64 * 64).tolist()


def test_slots_grow_from_the_largest_of_the_last_exchanges():
    slots = plan.Slots()
    key = ("allgather", 0, 2)
    assert slots.for_exchange(key) is None  # the first exchange sends its header ahead
    slots.record(key, np.array([[0, 1000], [640, 0]]))
    slots.record(key, np.array([[0, 800], [700, 0]]), slots.for_exchange(key))  # fitted
    margin = max(plan.SLOT_MARGIN, plan.SLOT_MARGIN * plan.SLOT_MARGIN_DECAY)
    assert slots.for_exchange(key).tolist() == _expected_slots([[0, 1000], [700, 0]], margin)
    assert slots.for_exchange(("allgather", 1, 2)) is None  # per key
    for _ in range(plan.SLOT_HISTORY):
        slots.record(key, np.array([[0, 64], [0, 0]]), slots.for_exchange(key))
    assert slots.for_exchange(key).tolist() == [[0, 128], [0, 0]]  # only the last exchanges count


def test_slot_margins_double_after_an_overflow_and_shrink_while_payloads_fit():
    slots, key = plan.Slots(), ("scatter", 0, 1)
    sizes = np.array([[0, 10_000], [10_000, 0]])
    slots.record(key, sizes)
    margins = []
    for grow in (1.2, 1.5, 1.5, 1.5):  # a payload that outgrows its slot twice, then fits
        offered = slots.for_exchange(key)
        sizes = (sizes * grow).astype(np.int64)
        slots.record(key, sizes, offered)
        margins.append(slots._margin[key])
    assert margins[:2] == [2 * plan.SLOT_MARGIN, 4 * plan.SLOT_MARGIN]
    assert margins[2] == pytest.approx(4 * plan.SLOT_MARGIN * plan.SLOT_MARGIN_DECAY)
    for _ in range(100):
        slots.record(key, sizes, slots.for_exchange(key))
    assert slots._margin[key] == plan.SLOT_MARGIN  # back to the floor, never below
    for _ in range(10):
        slots.record(key, sizes * 100, np.zeros_like(sizes))
    assert slots._margin[key] == plan.SLOT_MARGIN_MAX  # and never above the cap


def test_the_model_sends_headers_inline_on_far_links_only():
    kwargs = dict(collective="allgather", coalesce=True, world_size=4, values=2_000_000, buckets=2)
    assert plan.choose(FAR, **kwargs).header == "inline"
    assert plan.choose(NEAR, **kwargs).header == "separate"
    assert "allgather+coalesce+inline" in plan.choose(FAR, **kwargs).reason
    # Inline trades the header's latency for the padding's bytes.
    steps = {h: plan.step_seconds("scatter_reduce", True, FAR, world_size=4, values=10**6, buckets=1, header=h)
             for h in plan.HEADER_CHOICES}
    padding = plan.INLINE_PADDING * 2 * 3 / 4 * FAR.payload_bytes * 10**6 * FAR.seconds_per_byte
    assert steps["separate"] - steps["inline"] == pytest.approx(2 * FAR.latency_s - padding)
    # Pinned, the header option is kept; given collective and coalescing, "auto" means separate.
    assert plan.choose(FAR, **kwargs, header="separate").header == "separate"
    assert plan.configured("allgather", True, 4).header == "separate"
    assert plan.configured("allgather", True, 4, "inline").header == "inline"


def test_the_header_option_is_checked_saved_and_old_plans_load():
    with pytest.raises(ValueError, match="header"):
        ThreeLCState(header="ahead")
    assert ThreeLCState(header="inline").config()["header"] == "inline"
    old = {"collective": "allgather", "coalesce": True, "reason": "configured"}  # saved before the option
    assert plan.Plan(**old).header == "separate"  # (an old trial: tests/test_hook_plan.py)
