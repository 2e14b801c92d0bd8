"""The exchange plan: collective="auto" and coalesce="auto" from a measured cost model, agreed by
every rank; coalesced buckets inside real DDP; the plan across checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from threelc.hooks import ThreeLCState, codecs, plan, register, threelc_hook

from _dist import run_ranks
from test_hook_exact import FakeBucket, gradient

# A far link (40 ms per collective, 100 Mbit/s) and a near one (50 us, 10 Gbit/s); the codec
# at ~1 ns per value, ~0.06 payload bytes per value (3LC at s = 1.0 on gradients).
FAR = plan.LinkEstimate(latency_s=0.04, transfer_s=0.04, seconds_per_byte=8e-8, encode_s=3e-9, decode_s=1e-9,
                        decode_add_s=1e-9, payload_bytes=0.06)
NEAR = plan.LinkEstimate(latency_s=5e-5, transfer_s=5e-5, seconds_per_byte=8e-10, encode_s=3e-9, decode_s=1e-9,
                         decode_add_s=1e-9, payload_bytes=0.06)


def test_far_links_coalesce_and_prefer_fewer_round_trips():
    chosen = plan.choose(FAR, collective="auto", coalesce="auto", world_size=4, values=2_000_000, buckets=2)
    assert (chosen.collective, chosen.coalesce) == ("allgather", True)
    assert "allgather+coalesce" in chosen.reason and "scatter_reduce" in chosen.reason


def test_near_links_with_many_ranks_prefer_scatter_reduce_per_bucket():
    chosen = plan.choose(NEAR, collective="auto", coalesce="auto", world_size=8, values=50_000_000, buckets=4)
    assert (chosen.collective, chosen.coalesce) == ("scatter_reduce", False)


def test_the_model_charges_round_trips_bytes_and_decoding():
    kwargs = dict(world_size=4, values=1_000_000, buckets=3)
    slow = plan.LinkEstimate(**{**FAR.__dict__, "latency_s": 2 * FAR.latency_s, "transfer_s": 2 * FAR.transfer_s})
    # Per bucket, each allgather exchange is a header and a payload collective: doubling both
    # fixed costs adds (a + t) B.
    added = plan.step_seconds("allgather", False, slow, **kwargs) - plan.step_seconds("allgather", False, FAR, **kwargs)
    assert added == pytest.approx(2 * FAR.latency_s * 3)
    # Coalesced: one exchange per step, so 2 (a + t) for scatter-reduce whatever the bucket count.
    added = (plan.step_seconds("scatter_reduce", True, slow, **kwargs)
             - plan.step_seconds("scatter_reduce", True, FAR, **kwargs))
    assert added == pytest.approx(4 * FAR.latency_s)
    # Allgather decodes one payload and adds N - 1 more of the whole bucket; scatter-reduce adds the
    # shards it serves (n values in all) and decodes the means into place (n).
    free_link = plan.LinkEstimate(latency_s=0, transfer_s=0, seconds_per_byte=0, encode_s=0, decode_s=1e-9,
                                  decode_add_s=1e-10, payload_bytes=0.06)
    assert plan.step_seconds("allgather", False, free_link, **kwargs) == pytest.approx(1e-3 + 3e-4)
    assert plan.step_seconds("scatter_reduce", False, free_link, **kwargs) == pytest.approx(1e-3 + 1e-4)


def test_configured_options_are_kept_and_two_ranks_use_allgather():
    assert plan.configured("scatter_reduce", False, 4) == plan.Plan("scatter_reduce", False, "configured")
    assert plan.configured("auto", True, 2) == plan.Plan("allgather", True, "configured")
    assert plan.configured("auto", False, 3) is None and plan.configured("allgather", "auto", 4) is None
    chosen = plan.choose(FAR, collective="scatter_reduce", coalesce="auto", world_size=4, values=10**6, buckets=2)
    assert chosen.collective == "scatter_reduce"


def test_the_probe_sends_the_sizes_the_exchanges_will_send():
    # allgather sends the step's payload to every peer, scatter-reduce 1/N of it
    assert plan.probe_sizes(85_000, 4) == (21_250, 85_000)
    assert plan.probe_sizes(10**9, 4) == (plan.PROBE_CAP // 4, plan.PROBE_CAP)  # capped
    assert plan.probe_sizes(10, 8) == (16, 64)


def test_the_transfer_line_through_two_probes():
    fixed, per_byte, peers = 0.03, 8e-8, 3
    seconds = [fixed + per_byte * peers * size for size in (1000, 4000)]
    assert plan.fit_transfer((1000, 4000), seconds, peers) == (pytest.approx(fixed), pytest.approx(per_byte))
    # Noise made the larger probe faster: no negative slope, and the slower time as the fixed cost.
    assert plan.fit_transfer((1000, 4000), (0.05, 0.04), peers) == (0.05, 0.0)
    # A steep line through the origin: the fixed cost is clamped at zero, never negative.
    assert plan.fit_transfer((1000, 4000), (1e-6, 1e-3), peers)[0] == 0.0


def test_estimates_survive_the_integer_exchange():
    assert plan.LinkEstimate.from_ints(FAR.to_ints()) == FAR


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_coalesce_option_is_refused(bad):
    with pytest.raises(ValueError, match="coalesce"):
        ThreeLCState(coalesce=bad)


def test_a_trial_runs_only_when_the_call_is_close():
    chosen = plan.Plan("scatter_reduce", False, "modelled")
    close = {("scatter_reduce", False, "separate"): 1.0, ("allgather", False, "separate"): plan.TRIAL_MARGIN * 0.99}
    clear = {("scatter_reduce", False, "separate"): 1.0, ("allgather", False, "separate"): plan.TRIAL_MARGIN * 1.01}
    trial = plan.Trial.needed(chosen, close, "auto")
    assert trial.candidates == (("scatter_reduce", "separate"), ("allgather", "separate")) and trial.coalesce is False
    assert plan.Trial.needed(chosen, clear, "auto") is None
    assert plan.Trial.needed(chosen, close, "scatter_reduce") is None  # configured: nothing to choose
    only_one = {("scatter_reduce", False, "separate"): 1.0, ("allgather", True, "separate"): 1.0}  # the other, not with this coalescing
    assert plan.Trial.needed(chosen, only_one, "auto") is None
    inline = plan.Plan("scatter_reduce", False, "modelled", header="inline")  # compared with the same headers
    both = {("scatter_reduce", False, "separate"): 1.0, ("allgather", False, "separate"): 1.2,
            ("scatter_reduce", False, "inline"): 0.95, ("allgather", False, "inline"): 1.3,
            ("allgather", True, "inline"): 0.5}  # (another coalescing: not part of this trial)
    trial = plan.Trial.needed(inline, both, "auto")  # every close plan, the chosen first, then by cost
    assert trial.candidates == (("scatter_reduce", "inline"), ("scatter_reduce", "separate"),
                                ("allgather", "separate"), ("allgather", "inline"))
    assert trial.plan() == plan.Plan("scatter_reduce", False, trial.plan().reason, header="inline")
    # A pinned collective still tries the header modes.
    pinned = plan.Trial.needed(inline, both, "scatter_reduce")
    assert pinned.candidates == (("scatter_reduce", "inline"), ("scatter_reduce", "separate"))


def test_a_trial_of_more_candidates_takes_them_in_turn_and_back():
    trial = plan.Trial(candidates=(("allgather", "inline"), ("allgather", "separate"), ("scatter_reduce", "inline")),
                       coalesce=True, modelled="m", steps=4)
    order = trial.order()
    assert order == [0] + [0, 1, 2, 0, 1, 2] + [2, 1, 0, 2, 1, 0]
    assert [order[1:].count(k) for k in range(3)] == [4, 4, 4]  # every candidate is timed `steps` times
    for now in range(len(order)):
        trial.record(float(now) * (1 + order[trial.steps_done]))
    outcome = trial.outcome([0.3, 0.2, 0.25])
    assert (outcome.collective, outcome.header) == ("allgather", "separate")
    assert "allgather+inline 300.00 ms, allgather 200.00 ms, scatter_reduce+inline 250.00 ms" in outcome.reason
    # Inline headers cost bytes: they are kept only when they beat separate ones by more than INLINE_TIE.
    assert trial.outcome([0.195, 0.2, 0.25]).header == "separate"  # 2.5% faster: a tie
    clear_win = trial.outcome([0.18, 0.2, 0.25])  # 10% faster
    assert (clear_win.collective, clear_win.header) == ("allgather", "inline")
    only_inline = plan.Trial(candidates=(("allgather", "inline"), ("scatter_reduce", "inline")), coalesce=True,
                             modelled="m")
    assert only_inline.outcome([0.2, 0.199]).collective == "scatter_reduce"  # nothing separate to prefer
    # A trial saved before header modes existed loads as a trial of collectives with separate headers.
    old = {"collectives": ["scatter_reduce", "allgather"], "coalesce": True, "modelled": "m", "seconds": [[1.0], []],
           "steps_done": 2, "steps": 6}
    loaded = plan.Trial.from_dict(old)
    assert loaded.candidates == (("scatter_reduce", "separate"), ("allgather", "separate"))
    assert loaded.seconds == [[1.0], []] and loaded.steps_done == 2
    assert loaded.sent == [[], []] and loaded.seconds_per_byte == 0.0  # saved before bytes were recorded


def test_a_trial_alternates_times_step_periods_and_keeps_the_faster():
    trial = plan.Trial(candidates=(("scatter_reduce", "separate"), ("allgather", "separate")), coalesce=True,
                       modelled="m", steps=3)
    seen, done = [], []
    ends = [10.0, 11.0, 11.5, 12.6, 12.85, 13.05, 14.25]  # step ends: periods 1 .5 1.1 .25 .2 1.2
    for now in ends:
        seen.append(trial.plan().collective)
        done.append(trial.record(now))
    # The probe's step (not timed: no period before it), then A B A, then reversed: B A B.
    SR, AG = "scatter_reduce", "allgather"
    assert seen == [SR] + [SR, AG, SR] + [AG, SR, AG]
    assert done == [False] * 6 + [True]
    assert trial.seconds == [pytest.approx([1.0, 1.1, 0.2]), pytest.approx([0.5, 0.25, 1.2])]
    assert trial.medians() == pytest.approx([1.0, 0.5])
    # An exchange of its own (an outer sync) is timed from its start, not from the previous end.
    sync = plan.Trial(candidates=(("allgather", "separate"), ("scatter_reduce", "separate")), coalesce=False,
                      modelled="m", steps=1)
    sync.record(5.0, started=4.0)
    assert sync.seconds == [[1.0], []]
    # Saved and loaded, a trial goes on where it was, except that its next step is not timed;
    # the step count still decides when it ends, as in the uninterrupted trial.
    halfway = plan.Trial(candidates=(("scatter_reduce", "separate"), ("allgather", "separate")), coalesce=True,
                         modelled="m", steps=3)
    for now in ends[:3]:
        halfway.record(now)
    loaded = plan.Trial.from_dict(halfway.as_dict())
    assert loaded == halfway and loaded.last_end is None and "last_end" not in halfway.as_dict()
    assert [loaded.record(now) for now in ends[3:]] == [False] * 3 + [True]
    assert loaded.seconds == [pytest.approx([1.0, 0.2]), pytest.approx([0.5, 0.25, 1.2])]
    outcome = trial.outcome([1.1, 0.3])
    assert (outcome.collective, outcome.coalesce) == ("allgather", True) and "measured step" in outcome.reason
    assert trial.outcome([2.0, 2.0]).collective == "scatter_reduce"  # a tie keeps the model's choice


# ----------------------------------------------------------------------------- on real ranks
def _agreement(rank, world_size):
    """Each rank measures a different link; every rank must still choose the same plan."""
    local = plan.LinkEstimate(latency_s=0.001 * (rank + 1) ** 3, transfer_s=0.002 * (world_size - rank) ** 2,
                              seconds_per_byte=1e-8 * (world_size - rank),
                              encode_s=2e-9, decode_s=1e-9 * (rank + 1), decode_add_s=3e-10 * (world_size - rank),
                              payload_bytes=0.05 + 0.01 * rank)
    plan._probe = lambda *args, **kwargs: local  # this rank's "measurement"
    state = ThreeLCState(min_numel=0, start_iter=2)
    state.iteration = 2
    layout = (3000, 1000)
    futures = [threelc_hook(state, FakeBucket(gradient(rank, 0, layout), layout, index, index == 1))
               for index in range(2)]
    results = [future.wait() for future in futures]
    chosen = state.plan()
    saved = state.state_dict()
    state.close()

    # A state loaded from the checkpoint keeps the plan and measures nothing.
    def refuse(*args, **kwargs):
        raise AssertionError("a loaded plan must not be measured again")

    plan._probe = refuse
    restored = ThreeLCState(min_numel=0, start_iter=2)
    restored.load_state_dict(saved)
    futures = [threelc_hook(restored, FakeBucket(gradient(rank, 1, layout), layout, index, index == 1))
               for index in range(2)]
    [future.wait() for future in futures]
    restored_plan = restored.plan()
    restored.close()
    return {"plan": chosen, "restored": restored_plan, "local": local, "results": results,
            "trial": saved["trial"]}


def test_every_rank_chooses_the_plan_from_the_worst_measurements():
    results = run_ranks(_agreement, 4, timeout_s=300)
    plans = [result["plan"] for result in results]
    assert all(chosen == plans[0] for chosen in plans) and plans[0]["reason"] != "configured"
    locals_ = [result["local"] for result in results]
    worst = plan.LinkEstimate(latency_s=max(e.latency_s for e in locals_), transfer_s=max(e.transfer_s for e in locals_),
                              seconds_per_byte=max(e.seconds_per_byte for e in locals_),
                              encode_s=max(e.encode_s for e in locals_), decode_s=max(e.decode_s for e in locals_),
                              decode_add_s=max(e.decode_add_s for e in locals_),
                              payload_bytes=max(e.payload_bytes for e in locals_))
    # The first compressed step knows no earlier step's shape: the model sees its first bucket.
    expected = plan.choose(worst, collective="auto", coalesce="auto", world_size=4, values=4000, buckets=1)
    costs = plan.modelled_steps(worst, collective="auto", coalesce="auto", world_size=4, values=4000, buckets=1)
    trial = plan.Trial.needed(expected, costs, "auto")
    if trial is not None:  # a close call: the coming steps try the model's choice first
        expected = trial.plan()
        assert all(plan.Trial.from_dict(result["trial"]).candidates == trial.candidates for result in results)
    assert plans[0] == expected.as_dict()
    # A loaded plan (and trial) goes on where it stopped; one more step stays on the first collective.
    assert all(result["restored"] == plans[0] for result in results)
    for result in results:  # the step averaged, whatever the plan
        assert all(torch.isfinite(tensor).all() for tensor in result["results"])


def _real_probe(rank, world_size):
    """The probe itself on real ranks: what it sends, and estimates a model can use."""
    state = ThreeLCState(min_numel=0)
    values = gradient(rank, 0, (20_000,))
    codec = codecs.for_bucket(state, values)
    link = plan._probe(codec, codec.array(values), [20_000], None, world_size, torch.device("cpu"), state._stats,
                       total_values=60_000)
    sent = state._stats.current.sent_bytes
    state.close()
    return link, sent


def test_the_real_probe_sends_agreed_sizes_and_measures_a_usable_link():
    world_size = 3
    results = run_ranks(_real_probe, world_size, timeout_s=300)
    links = [link for link, _ in results]
    for link in links:
        assert all(np.isfinite(value) and value >= 0 for value in link.__dict__.values())
        assert link.latency_s > 0 and link.encode_s > 0 and link.decode_s > 0 and link.decode_add_s > 0
        assert 0 < link.payload_bytes < 4
    # The sizes come from the largest payload estimate (3 values' worth of this bucket per step),
    # so every rank sent the same: three headers, then two probes of each size to each peer.
    step_payload = int(np.ceil(max(link.payload_bytes for link in links) * 60_000))
    small, large = plan.probe_sizes(step_payload, world_size)
    peers = world_size - 1
    assert [sent for _, sent in results] == [3 * 8 * peers + 2 * (small + large) * peers] * world_size


class TwoBuckets(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.second = nn.Linear(64, 64)
        self.third = nn.Linear(64, 8)

    def forward(self, x):
        return self.third(torch.relu(self.second(torch.relu(self.first(x)))))


def _ddp_training(rank, world_size):
    """The same training with per-bucket and coalesced exchanges: bitwise the same parameters,
    and fewer header bytes when coalesced."""
    outcomes = {}
    for collective in ("allgather", "scatter_reduce"):
        for coalesce in (False, True):
            torch.manual_seed(0)
            ddp = DDP(TwoBuckets(), bucket_cap_mb=0.01)  # several buckets
            state = register(ddp, collective=collective, coalesce=coalesce, start_iter=2, min_numel=0,
                             block_size=256)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
            for step in range(5):
                optimizer.zero_grad()
                generator = torch.Generator().manual_seed(100 * rank + step)
                ddp(torch.randn(8, 32, generator=generator)).pow(2).mean().backward()
                optimizer.step()
            state.close()
            outcomes[(collective, coalesce)] = {
                "parameters": torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]),
                "buckets": state.step_buckets, "sent": state.stats()["total"]["sent_bytes"],
                "collectives": state.stats()["total"]["collectives"],
                "plan": state.plan()}
    return outcomes


def test_coalescing_inside_ddp_changes_round_trips_not_results():
    results = run_ranks(_ddp_training, 3, timeout_s=300)
    for collective in ("allgather", "scatter_reduce"):
        for rank, result in enumerate(results):
            separate, together = result[(collective, False)], result[(collective, True)]
            assert separate["buckets"] >= 2, "the test needs several buckets"
            assert torch.equal(separate["parameters"], together["parameters"]), (collective, rank)
            assert torch.equal(together["parameters"], results[0][(collective, True)]["parameters"])
            assert together["plan"]["coalesce"] is True and separate["plan"]["coalesce"] is False
            # One exchange per compressed step instead of one per bucket: the same payload bytes in
            # fewer collectives, and fewer frames (each frame carries the N message sizes, 8 bytes each).
            assert together["collectives"] < separate["collectives"]
            compressed_steps = 5 - 2
            per_exchange = 2 if collective == "allgather" else 4  # a frame (header) and a payload collective each
            saved = compressed_steps * per_exchange * (separate["buckets"] - 1)
            assert separate["collectives"] - together["collectives"] == saved
            assert separate["sent"] - together["sent"] == saved // 2 * 3 * 8 * 2


def _coalesced_faults(rank, world_size):
    """In a coalesced step, a non-finite bucket becomes NaN on every rank while the others average,
    and a layout mismatch in a non-last bucket raises the same error on every rank."""
    state = ThreeLCState(collective="scatter_reduce", coalesce=True, min_numel=0, start_iter=2)
    state.iteration = 2
    layouts = [(700, 300), (500,), (64, 64)]
    gradients = [gradient(rank, 5, layout) for layout in layouts]
    if rank == world_size - 1:
        gradients[1][3] = float("inf")
    futures = [threelc_hook(state, FakeBucket(g.clone(), layout, index, index == 2))
               for index, (g, layout) in enumerate(zip(gradients, layouts))]
    results = [future.wait() for future in futures]
    nan_bucket = bool(torch.isnan(results[1]).all())
    others_finite = bool(torch.isfinite(results[0]).all() and torch.isfinite(results[2]).all())
    untouched = 1 not in state._residuals or not state._residuals[1].worker.any()
    state.close()

    # A backward pass abandoned after its first bucket (on every rank): the next pass starts over.
    state = ThreeLCState(collective="allgather", coalesce=True, min_numel=0, start_iter=2)
    state.iteration = 2
    abandoned = threelc_hook(state, FakeBucket(gradient(rank, 0, (300,)), (300,), 0, False))
    again = [threelc_hook(state, FakeBucket(gradient(rank, 1, (300,)), (300,), 0, False)),
             threelc_hook(state, FakeBucket(gradient(rank, 1, (200,)), (200,), 1, True))]
    state.wait()
    try:
        abandoned.wait()
        abandoned_error = None
    except RuntimeError as error:
        abandoned_error = str(error)
    restarted = bool(all(torch.isfinite(future.wait()).all() for future in again))
    state.close()

    state = ThreeLCState(collective="allgather", coalesce=True, min_numel=0, start_iter=2)
    state.iteration = 2
    first = (20, 30) if rank else (30, 20)
    message = None
    threelc_hook(state, FakeBucket(gradient(rank, 0, first), first, 0, False))
    try:
        threelc_hook(state, FakeBucket(gradient(rank, 0, (40,)), (40,), 1, True))
    except Exception as error:  # raised from the last bucket's hook call
        message = (type(error).__name__, str(error))
    state.close()
    return {"nan_bucket": nan_bucket, "others_finite": others_finite, "residual_untouched": untouched,
            "mismatch": message, "abandoned": abandoned_error, "restarted": restarted}


def test_coalesced_step_keeps_the_fault_guarantees():
    results = run_ranks(_coalesced_faults, 2, timeout_s=300)
    for result in results:
        assert result["nan_bucket"] and result["others_finite"] and result["residual_untouched"]
        kind, text = result["mismatch"]
        assert kind == "ConfigMismatchError" and "bucket 0 has different layouts" in text
        assert "abandoned" in result["abandoned"] and result["restarted"]
    assert results[0]["mismatch"] == results[1]["mismatch"]


# The model prefers scatter-reduce by a little (decoding is all it costs: 1.2 ns per value against
# allgather's 1.6), so the hook tries scatter-reduce, then allgather; each rank's "measured" medians
# are fixed per rank, so the outcome is known: the slowest rank's figures are 9 ms (scatter-reduce)
# and 6 ms (allgather).
_CLOSE_LINK = plan.LinkEstimate(latency_s=0.0, transfer_s=0.0, seconds_per_byte=0.0, encode_s=0.0, decode_s=1e-9,
                                decode_add_s=2e-10, payload_bytes=0.06)
_TRIAL_MEDIANS = {0: [9e-3, 1e-3], 3: [2e-3, 6e-3]}  # rank 3 alone would keep scatter-reduce


def _trial_steps(state, rank, steps, layout):
    """Run ``steps`` one-bucket steps; returns per step the mean, the plan after it and its stats."""
    record = []
    for step in steps:
        mean = threelc_hook(state, FakeBucket(gradient(rank, step, layout), layout, 0, True)).wait().clone()
        record.append({"mean": mean, "plan": state.plan(), "planning": state.stats()["step"]["planning"]})
    return record


def _trial(rank, world_size):
    plan._probe = lambda *args, **kwargs: _CLOSE_LINK
    plan.Trial.medians = lambda self: _TRIAL_MEDIANS.get(rank, [1e-3, 1e-3])
    plan.Trial.sent_medians = lambda self: [1000.0, 1000.0]  # (measured bytes differ after a resume)
    layout, total = (3000, 1000), 2 * plan.TRIAL_STEPS + 4

    def fresh():  # (separate headers: the link's latency is zero, and this test is about collectives)
        state = ThreeLCState(min_numel=0, start_iter=2, header="separate")
        state.iteration = 2  # compress from the first step
        return state

    state = fresh()
    uninterrupted = _trial_steps(state, rank, range(total), layout)
    # What the mean owes, in allgather's terms: every rank's worker residual over N (a server
    # residual left behind by scatter-reduce would be owed and never paid).
    entry = state._residuals[0]
    debt = entry.worker.clone()
    server_left = entry.server is not None
    state.close()
    torch.distributed.all_reduce(debt)
    truth = sum(gradient(r, step, layout).double() for r in range(world_size) for step in range(total)) / world_size
    paid = sum(item["mean"].double() for item in uninterrupted)

    # Resumed mid-trial from a checkpoint (the first step after it is not timed: one more step).
    state = fresh()
    first = _trial_steps(state, rank, range(6), layout)
    saved = state.state_dict()
    state.close()
    state = fresh()
    state.load_state_dict(saved)
    second = _trial_steps(state, rank, range(6, total), layout)
    state.close()
    return {"uninterrupted": uninterrupted, "resumed": first + second, "server_left": server_left,
            "error": float((paid + debt.double() / world_size - truth).abs().max()),
            "scale": float(truth.abs().max())}


def test_a_close_call_is_measured_and_every_rank_switches_together():
    results = run_ranks(_trial, 4, timeout_s=300)
    trial_steps = 2 * plan.TRIAL_STEPS + 1  # the probe's step, then the timed ones
    for result in results:
        run = result["uninterrupted"]
        # After the probe's step the steps alternate, scatter-reduce (the model's choice) first,
        # reversed halfway; the plan after each step is the next step's, and after the trial the
        # faster (the slowest rank's median) stays.
        collectives = [item["plan"]["collective"] for item in run]
        half = ["scatter_reduce", "allgather"] * (plan.TRIAL_STEPS // 2)
        assert collectives[:trial_steps - 1] == half + half[::-1]
        assert "measured trial" in run[0]["plan"]["reason"]
        assert collectives[trial_steps - 1:] == ["allgather"] * (len(run) - trial_steps + 1)
        assert "measured step: scatter_reduce 9.00 ms, allgather 6.00 ms" in run[trial_steps - 1]["plan"]["reason"]
        assert [item["planning"] for item in run] == [True] * trial_steps + [False] * (len(run) - trial_steps)
        # The switches kept what scatter-reduce's server residuals owed: folded, then paid or still owed.
        assert not result["server_left"]
        assert result["error"] < 1e-5 * max(result["scale"], 1.0) * len(run)
        # A checkpoint taken mid-trial resumes it: the same plans and bitwise the same means.
        resumed = result["resumed"]
        assert [item["plan"] for item in resumed] == [item["plan"] for item in run]
        assert all(torch.equal(a["mean"], b["mean"]) for a, b in zip(run, resumed))
    for item in zip(*(result["uninterrupted"] for result in results)):  # replicas agree at every step
        assert all(torch.equal(item[0]["mean"], other["mean"]) and item[0]["plan"] == other["plan"] for other in item)


def test_inline_headers_must_also_beat_what_their_extra_bytes_take_on_the_link():
    # 100 Mbit/s: 80 ns a byte.  Inline headers' padding sent 112 kB more per step (9 ms on the link).
    trial = plan.Trial(candidates=(("scatter_reduce", "inline"), ("scatter_reduce", "separate")), coalesce=False,
                       modelled="m", steps=2, seconds_per_byte=8e-8)
    for now, sent in zip(range(5), (0, 254_000, 142_000, 142_000, 254_000)):
        trial.record(float(now), sent_bytes=sent)
    assert trial.sent == [[254_000, 254_000], [142_000, 142_000]] and trial.sent_medians() == [254_000, 142_000]
    most_sent = [254_000, 142_000]
    # 7.7% faster (past INLINE_TIE) but by 5.7 ms, under the 9 ms its extra bytes take: separate headers.
    assert trial.outcome([0.0735, 0.0792], most_sent).header == "separate"
    # A far link: inline headers save round trips worth far more than their bytes.
    far = trial.outcome([0.120, 0.200], most_sent)
    assert far.header == "inline" and "the most of a rank: scatter_reduce+inline 254.0 kB" in far.reason
    # Without bytes the share alone decides, as before.
    assert trial.outcome([0.0735, 0.0792]).header == "inline"
    assert plan.Trial.from_dict(trial.as_dict()) == trial  # bytes and link speed are saved with the trial
