"""threelc.local.LocalSteps on real gloo ranks: the outer update's definition, identical replicas,
warm-up and H = 1, resume, mismatches, bad arguments, and the examples' --local-steps."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import threelc.local
import threelc.optim
from threelc.hooks import ConfigMismatchError, StateOwnerError, ThreeLCState
from threelc.hooks.hook import average

from _dist import run_ranks
from launch_helpers import torchrun


def _model(seed=0):
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    return nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 4))


def _flat(model):
    return torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()]).clone()


def _inner_step(ddp, inner, rank, step):
    """One inner step on this rank's own data (different on every rank and step)."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    inputs, targets = torch.randn(8, 24, generator=generator), torch.randn(8, 4, generator=generator)
    nn.functional.mse_loss(ddp(inputs), targets).backward()
    inner.step()
    inner.zero_grad()


def _train(rank, steps, **options):
    """Train ``steps`` inner steps; per step: (synced, local params before step(), params after)."""
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    local = threelc.local.LocalSteps(ddp, inner, **options)
    start = _flat(model)
    records = []
    for step in range(steps):
        _inner_step(ddp, inner, rank, step)
        before = _flat(model)
        synced = local.step()
        records.append((synced, before, _flat(model)))
    return start, records, local


# ------------------------------------------------------------------ the outer update's definition
def fp32_outer_update(rank, world_size, folder):
    start, records, local = _train(rank, 6, sync_every=3, outer="fp32", stats_dir=folder)
    local.close()
    return start, records


@pytest.mark.parametrize("world_size", [2, 4])
def test_fp32_outer_update_equals_its_definition(world_size, tmp_path):
    """After H local steps: mean pseudo-gradient, then torch.optim.SGD(nesterov) from the start."""
    results = run_ranks(fp32_outer_update, world_size, str(tmp_path), timeout_s=300)
    start = results[0][0]
    parameter = nn.Parameter(start.clone())
    outer = torch.optim.SGD([parameter], lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    for step in range(6):
        synced = [result[1][step][0] for result in results]
        locals_ = [result[1][step][1] for result in results]
        afters = [result[1][step][2] for result in results]
        assert synced == [step in (2, 5)] * world_size
        if not synced[0]:
            # Local steps: no averaging, every rank went its own way.
            assert not torch.equal(locals_[0], locals_[1])
            continue
        with torch.no_grad():
            mean = sum((parameter - local) / world_size for local in locals_)
        parameter.grad = mean
        outer.step()
        for after in afters:
            assert torch.equal(after, afters[0])  # bitwise identical replicas
            if world_size == 2:  # a sum of two terms has one order: gloo's result is exactly this
                assert torch.equal(after, parameter.detach())
            else:  # gloo's ring adds four terms in its own order
                torch.testing.assert_close(after, parameter.detach(), rtol=1e-6, atol=1e-7)
    # Bytes: the outer allreduce on sync steps (ring model), nothing on local steps.
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    raw = start.numel() * 4
    assert [line["raw_bytes"] for line in lines] == [0, 0, raw, 0, 0, raw]
    ring = 2 * (world_size - 1) * raw // world_size
    check = 8 * (world_size - 1)  # the agreement check: at construction (step 0) and at every sync
    assert [line["sent_bytes"] for line in lines] == [check, 0, ring + check, 0, 0, ring + check]


def threelc_outer(rank, world_size, folder):
    start, records, local = _train(rank, 8, sync_every=4, outer="3lc", stats_dir=folder)
    stats = local.state.stats()["total"]
    memory = local.state.memory_bytes()
    stats["plan"] = local.state.plan()
    stats["sparsity"] = local.state.sparsity
    local.close()
    # hook.average on its own: the same tensor averaged 40 times; error feedback delivers its mass.
    state = ThreeLCState(None)
    values = torch.randn(20_000, generator=torch.Generator().manual_seed(rank))
    delivered = torch.zeros_like(values)
    running_means = []
    for count in range(1, 41):
        delivered += average(state, values.clone(), index=0, layout=(5_000, 15_000))
        running_means.append(delivered / count)
    state.close()
    return records, stats, memory, values, running_means


def test_sync_exchange_is_fixed_allgather_up_to_four_ranks():
    """The 3LC sync never takes the hook's measured plan by default; allgather while it sends at
    most twice scatter-reduce's bytes ((N - 1) against 2 (N - 1) / N payloads)."""
    rule = {n: threelc.local.sync_exchange(n) for n in (1, 2, 3, 4, 5, 8, 64)}
    assert {n: r["collective"] for n, r in rule.items()} == {
        1: "allgather", 2: "allgather", 3: "allgather", 4: "allgather", 5: "scatter_reduce", 8: "scatter_reduce",
        64: "scatter_reduce"}
    assert all(r["coalesce"] is False for r in rule.values())


@pytest.mark.parametrize("world_size", [2, 4])
def test_3lc_outer_sync_leaves_identical_replicas(world_size, tmp_path):
    results = run_ranks(threelc_outer, world_size, str(tmp_path), timeout_s=300)
    for step in range(8):
        synced = [result[0][step][0] for result in results]
        assert synced == [step in (3, 7)] * world_size
        afters = [result[0][step][2] for result in results]
        if synced[0]:
            assert all(torch.equal(after, afters[0]) for after in afters)
            # The compressed mean moved the parameters away from every rank's local ones.
            assert not any(torch.equal(afters[0], result[0][step][1]) for result in results)
        else:
            assert not torch.equal(afters[0], afters[1])
    stats, memory = results[0][1], results[0][2]
    raw = results[0][0][0][1].numel() * 4
    assert stats["compressed"] and stats["raw_bytes"] == 2 * raw
    # LocalSteps' own defaults: s = OUTER_SPARSITY, and a fixed exchange (no probe, no trial of
    # collectives spread over the syncs, so no timing decides a run's arithmetic).
    assert stats["sparsity"] == threelc.local.OUTER_SPARSITY == 0.5
    assert stats["plan"]["collective"] == "allgather"  # up to threelc.local.SYNC_ALLGATHER_RANKS = 4
    assert stats["plan"]["reason"] == "configured" and stats["plan"]["coalesce"] is False
    # Far fewer bytes than a float32 ring allreduce of a sync would move, from the first sync on.
    ring = 2 * (world_size - 1) * raw / world_size
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    assert [line["sent_bytes"] > 0 for line in lines[1:]] == [step in (3, 7) for step in range(1, 8)]
    assert lines[7]["sent_bytes"] < ring / 4 and lines[3]["sent_bytes"] < ring / 4
    assert not any(line["planning"] for line in lines)
    assert memory >= raw  # the worker residuals (plus the server's with scatter-reduce)
    # The running mean of the compressed averages approaches the exact mean like 1/k: what a
    # round does not deliver waits in the residuals (bounded), none is lost.
    exact = sum(result[3] for result in results) / world_size
    errors = [float((mean - exact).norm() / exact.norm()) for mean in results[0][4]]
    assert errors[39] < errors[9] / 2 < errors[0] / 2 and errors[39] < 0.2
    assert all(torch.equal(result[4][-1], results[0][4][-1]) for result in results)


# ------------------------------------------------------------------ overlap: the one-round-delayed update
def fp32_overlap(rank, world_size):
    start, records, local = _train(rank, 9, sync_every=3, outer="fp32", overlap=True)
    finished = local.finish()
    after_finish = torch.cat([parameter.detach().reshape(-1) for parameter in local.parameters])
    again = local.finish()  # nothing in flight any more
    local.close()
    return start, records, finished, after_finish, again


@pytest.mark.parametrize("world_size", [2, 4])
def test_fp32_overlap_applies_each_mean_one_round_late(world_size):
    """Round k's mean pseudo-gradient (measured from round k's start) drives the outer step at the
    end of round k + 1; finish() applies the last round's."""
    results = run_ranks(fp32_overlap, world_size, timeout_s=300)
    start = results[0][0]
    parameter = nn.Parameter(start.clone())
    outer = torch.optim.SGD([parameter], lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    round_start, in_flight = start.clone(), None
    expected_after = []
    for step in range(9):
        synced = [result[1][step][0] for result in results]
        assert synced == [step in (2, 5, 8)] * world_size
        if not synced[0]:
            continue
        with torch.no_grad():
            mean = sum((round_start - result[1][step][1]) / world_size for result in results)
        if in_flight is not None:  # the previous round's mean arrives now
            parameter.grad = in_flight
            outer.step()
        in_flight, round_start = mean, parameter.detach().clone()
        expected_after.append((step, round_start))
    parameter.grad = in_flight
    outer.step()
    expected_after.append(("finish", parameter.detach().clone()))
    # The first round's sync applies nothing: every rank is back at the initial parameters.
    assert torch.equal(expected_after[0][1], start)
    for step, expected in expected_after:
        afters = [result[3] if step == "finish" else result[1][step][2] for result in results]
        for after in afters:
            assert torch.equal(after, afters[0])  # bitwise identical replicas after every outer update
            if world_size == 2:  # two terms: gloo's sum is exactly this
                assert torch.equal(after, expected), step
            else:
                torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)
    assert all(result[2] is True and result[4] is False for result in results)


def overlap_in_flight(rank, world_size, folder, outer):
    """Rank 1 launches the second sync's average only after rank 0 has trained an inner step past
    it: a blocking sync would hold rank 0 in its collective, and rank 1 would wait in vain."""
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    local = threelc.local.LocalSteps(ddp, inner, sync_every=2, outer=outer, overlap=True)
    marker = os.path.join(folder, "rank0-trained-past-the-sync")
    if rank == 1:
        launch = local._launch

        def late_launch(delta):
            if local.steps == 4:  # the second sync (steps 2 and 4 sync with H = 2)
                deadline = time.monotonic() + 60
                while not os.path.exists(marker):
                    if time.monotonic() > deadline:
                        raise AssertionError("rank 0 never trained past its sync: the sync blocked")
                    time.sleep(0.05)
            return launch(delta)

        local._launch = late_launch
    for step in range(6):
        _inner_step(ddp, inner, rank, step)
        local.step()
        if rank == 0 and step == 4:
            open(marker, "w").close()
    local.finish()
    params = _flat(model)
    local.close()
    return params


@pytest.mark.parametrize("outer", ["fp32", "3lc"])
def test_overlapped_sync_is_in_flight_during_the_next_inner_steps(tmp_path, outer):
    results = run_ranks(overlap_in_flight, 2, str(tmp_path), outer, timeout_s=300)
    assert torch.equal(results[0], results[1])


def threelc_overlap(rank, world_size, folder):
    start, records, local = _train(rank, 8, sync_every=2, outer="3lc", overlap=True, passes=2, stats_dir=folder)
    local.finish()
    flat = torch.cat([parameter.detach().reshape(-1) for parameter in local.parameters])
    local.close()
    return records, flat


def test_3lc_overlap_leaves_identical_replicas_and_counts_every_sync(tmp_path):
    results = run_ranks(threelc_overlap, 4, str(tmp_path), timeout_s=300)
    for step in range(8):
        afters = [result[0][step][2] for result in results]
        if results[0][0][step][0]:
            assert all(torch.equal(after, afters[0]) for after in afters)
        else:
            assert not torch.equal(afters[0], afters[1])
    assert all(torch.equal(result[1], results[0][1]) for result in results)
    assert not torch.equal(results[0][1], results[0][0][7][2])  # finish() applied the last round's mean
    # Each of the 4 syncs' bytes lands where it is waited for: at the next sync, the last at
    # finish() (a record of its own, numbered 8); nothing on the local steps.
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(9))
    assert [line["compressed"] for line in lines] == [False, False, False, True, False, True, False, True, True]
    raw = results[0][1].numel() * 4
    assert [line["raw_bytes"] for line in lines] == [0, 0, 0, 2 * raw, 0, 2 * raw, 0, 2 * raw, 2 * raw]


# ------------------------------------------------------------------ further 3LC passes per sync
PASSES = (1, 2, 3)


def passes_bookkeeping(rank, world_size):
    """One sync (H = 3; outer lr 1 without momentum: the update is the delivered mean) per
    collective and number of passes: the pseudo-gradient, what arrived, the residuals, the bytes."""
    results = {}
    for collective in ("scatter_reduce", "allgather"):
        for passes in PASSES:
            start, records, local = _train(rank, 3, sync_every=3, outer="3lc", passes=passes, outer_lr=1.0,
                                           outer_momentum=0.0, nesterov=False, collective=collective)
            (entry,) = local.state._residuals.values()
            server = torch.zeros_like(entry.worker)
            if entry.server is not None:
                server[entry.server_start:entry.server_start + entry.server.numel()] = entry.server
            results[collective, passes] = {"delta": start - records[-1][1], "delivered": start - records[-1][2],
                                           "worker": entry.worker.clone(), "server": server,
                                           "sent": local.state.stats()["total"]["sent_bytes"]}
            local.close()
    return results, [parameter.numel() for parameter in _model().parameters()]


def test_further_passes_send_the_residuals_and_lose_nothing():
    results = run_ranks(passes_bookkeeping, 2, timeout_s=300)
    layout = results[0][1]
    for collective in ("scatter_reduce", "allgather"):
        errors, sent = [], []
        for passes in PASSES:
            runs = [result[0][collective, passes] for result in results]
            delivered = runs[0]["delivered"]
            assert all(torch.equal(run["delivered"], delivered) for run in runs)  # identical replicas
            exact = sum(run["delta"] for run in runs) / 2
            # What arrived plus what the worker and server residuals still owe is the exact mean,
            # whatever the number of passes (up to float32 rounding): nothing lost, nothing twice.
            owed = sum(run["worker"] for run in runs) / 2 + sum(run["server"] for run in runs)
            torch.testing.assert_close(delivered + owed, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
            errors.append(float((delivered - exact).norm() / exact.norm()))
            sent.append(runs[0]["sent"])
            if collective == "allgather":
                # One lossy stage: each pass at least halves every residual's largest value in its
                # scale unit (here each parameter tensor), so the error is within M / 2**passes.
                for error, *deltas in zip((delivered - exact).split(layout), *(run["delta"].split(layout)
                                                                              for run in runs)):
                    bound = max(float(delta.abs().max()) for delta in deltas) / 2 ** passes
                    assert float(error.abs().max()) <= bound * (1 + 1e-5), (passes, bound)
        # Each further pass sends what the residuals held, at a finer scale: the mean arrives more
        # exactly, for more bytes.
        assert errors[2] < errors[1] < errors[0], (collective, errors)
        assert sent[0] < sent[1] < sent[2], (collective, sent)


# ------------------------------------------------------------------ warm-up and H = 1
def warmup_then_every_step(rank, world_size):
    """warm-up 2, H = 1, outer lr 1, no momentum, fp32, SGD inner: DDP's plain SGD, up to rounding."""
    reference = _model()
    reference_ddp = DDP(reference)
    reference_inner = torch.optim.SGD(reference_ddp.parameters(), lr=0.1)
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = threelc.local.LocalSteps(ddp, inner, sync_every=1, outer="fp32", outer_lr=1.0, outer_momentum=0.0,
                                     warmup_steps=2)
    records = []
    for step in range(5):
        averaging = local.averaging()
        _inner_step(reference_ddp, reference_inner, rank, step)
        _inner_step(ddp, inner, rank, step)
        synced = local.step()
        records.append((averaging, synced, _flat(model), _flat(reference)))
    local.close()
    return records


def test_warmup_allreduces_then_h1_syncs_every_step():
    results = run_ranks(warmup_then_every_step, 2, timeout_s=300)
    for step in range(5):
        (averaging, synced, params, reference), other = results[0][step], results[1][step]
        assert (averaging, synced) == (step < 2, step >= 2)
        assert torch.equal(params, other[2])  # identical replicas after every step
        if averaging:
            assert torch.equal(params, reference)  # warm-up is DDP's allreduce, bitwise
        else:
            torch.testing.assert_close(params, reference, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ checkpoint and resume
RESUME = {"sync_every": 3, "warmup_steps": 1, "outer": "3lc", "collective": "scatter_reduce"}


def _resume_setup(passes, overlap):
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    return model, ddp, inner, threelc.local.LocalSteps(ddp, inner, passes=passes, overlap=overlap, **RESUME)


def uninterrupted_and_first_half(rank, world_size, folder, passes, overlap):
    model, ddp, inner, local = _resume_setup(passes, overlap)
    for step in range(10):
        if step == 5:  # mid-round: the start-of-round parameters and momentum (with overlap, the
            # sync launched at step 3) are in flight; state_dict() waits for that sync
            assert (local._pending is not None) == overlap
            torch.save({"model": model.state_dict(), "inner": inner.state_dict(), "local": local.state_dict()},
                       os.path.join(folder, f"rank{rank}.pt"))
        _inner_step(ddp, inner, rank, step)
        local.step()
    local.finish()
    local.close()
    return _flat(model)


def resume_second_half(rank, world_size, folder, passes, overlap):
    model, ddp, inner, local = _resume_setup(passes, overlap)
    with pytest.raises(StateOwnerError, match="loaded the hook state of rank"):
        local.load_state_dict(torch.load(os.path.join(folder, f"rank{1 - rank}.pt"))["local"])
    checkpoint = torch.load(os.path.join(folder, f"rank{rank}.pt"))
    model.load_state_dict(checkpoint["model"])
    inner.load_state_dict(checkpoint["inner"])
    local.load_state_dict(checkpoint["local"])
    for step in range(5, 10):
        _inner_step(ddp, inner, rank, step)
        local.step()
    local.finish()
    local.close()
    return _flat(model)


@pytest.mark.parametrize("passes, overlap", [(1, False), (2, False), (1, True)])
def test_resume_in_fresh_processes_is_bitwise_identical(tmp_path, passes, overlap):
    uninterrupted = run_ranks(uninterrupted_and_first_half, 2, str(tmp_path), passes, overlap, timeout_s=300)
    resumed = run_ranks(resume_second_half, 2, str(tmp_path), passes, overlap, timeout_s=300)
    assert torch.equal(uninterrupted[0], uninterrupted[1])  # step 9 ends a round: synced
    for reference, result in zip(uninterrupted, resumed):
        assert torch.equal(reference, result)


# ------------------------------------------------------------------ mismatches across ranks
def mismatches(rank, world_size):
    messages = []
    for options in ({"sync_every": 10 + rank}, {"outer": "3lc", "sparsity": 1.0 + 0.5 * rank},
                    {"outer": "3lc", "passes": 1 + rank}, {"outer": "fp32", "overlap": rank == 1}):
        ddp = DDP(_model())
        with pytest.raises(ConfigMismatchError) as error:
            threelc.local.LocalSteps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), **options)
        messages.append(str(error.value))
    # The same options, but rank 1 resumed from a checkpoint of another step: caught at the sync.
    ddp = DDP(_model())
    inner = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = threelc.local.LocalSteps(ddp, inner, sync_every=2, outer="fp32")
    if rank == 1:  # a round ahead: it syncs when rank 0 does, but at another step count
        state = local.state_dict()
        local.load_state_dict({**state, "steps": 2})
    with pytest.raises(ConfigMismatchError) as error:
        for step in range(2):
            _inner_step(ddp, inner, rank, step)
            local.step()
    messages.append(str(error.value))
    local.close()
    return messages


def test_mismatched_options_or_steps_fail_on_every_rank():
    results = run_ranks(mismatches, 2, timeout_s=300)
    for messages in results:
        assert "sync_every': 10" in messages[0] and "sync_every': 11" in messages[0]
        assert re.search(r"sparsity=\S*1\.0\b", messages[1]) and re.search(r"sparsity=\S*1\.5\b", messages[1])
        assert "'passes': 1" in messages[2] and "'passes': 2" in messages[2]
        assert "'overlap': False" in messages[3] and "'overlap': True" in messages[3]
        assert "steps=2" in messages[4] and "steps=4" in messages[4]
    assert results[0] == results[1]  # the same message on every rank


# ------------------------------------------------------------------ bad arguments
BAD_ARGUMENTS = [
    ({"sync_every": 0}, "sync_every must be a positive integer"),
    ({"sync_every": 2.5}, "sync_every must be a positive integer"),
    ({"sync_every": True}, "sync_every must be a positive integer"),
    ({"outer_lr": 0.0}, "outer_lr must be a positive finite number"),
    ({"outer_lr": math.nan}, "outer_lr must be a positive finite number"),
    ({"outer_lr": "0.7"}, "outer_lr must be a positive finite number"),
    ({"outer_momentum": 1.0}, r"outer_momentum must be a number in \[0, 1\)"),
    ({"outer_momentum": -0.1}, r"outer_momentum must be a number in \[0, 1\)"),
    ({"nesterov": "yes"}, "nesterov must be True or False"),
    ({"outer": "int8"}, "outer must be one of"),
    ({"warmup_steps": -1}, "warmup_steps must be a non-negative integer"),
    ({"passes": 0}, "passes must be a positive integer"),
    ({"passes": 1.5}, "passes must be a positive integer"),
    ({"passes": True}, "passes must be a positive integer"),
    ({"overlap": 1}, "overlap must be True or False"),
    ({"outer": "fp32", "passes": 2}, r"passes=2 only applies to outer='3lc'"),
    ({"start_iter": 5}, "start_iter do not apply to LocalSteps"),
    ({"outer": "fp32", "sparsity": 1.5}, "sparsity only apply to outer='3lc'"),
    ({"sparsity": 2.5}, r"sparsity must be a number in \(0, 2\)"),
]


def bad_arguments(rank, world_size):
    errors = {}

    def capture(name, build):
        try:
            build()
        except Exception as error:  # noqa: BLE001 - the test compares types and messages
            errors[name] = (type(error).__name__, str(error))

    for index, (options, _) in enumerate(BAD_ARGUMENTS):
        ddp = DDP(_model())
        capture(index, lambda: threelc.local.LocalSteps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), **options))
    model = _model()
    capture("not ddp", lambda: threelc.local.LocalSteps(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    ddp = DDP(_model())
    capture("foreign", lambda: threelc.local.LocalSteps(ddp, torch.optim.SGD(_model().parameters(), lr=0.1)))
    capture("not an optimizer", lambda: threelc.local.LocalSteps(ddp, ddp.parameters()))
    capture("threelc adamw", lambda: threelc.local.LocalSteps(ddp, threelc.optim.AdamW(ddp.parameters())))
    ddp.register_comm_hook(None, lambda state, bucket: None)
    capture("hook taken", lambda: threelc.local.LocalSteps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1)))
    # Checkpoints that do not fit, and a sync before the first round.
    ddp = DDP(_model())
    local = threelc.local.LocalSteps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), warmup_steps=3, outer="fp32")
    capture("sync in warm-up", local.sync)
    state = local.state_dict()
    capture("version", lambda: local.load_state_dict({**state, "version": 99}))
    capture("other model", lambda: local.load_state_dict({**state, "start": torch.zeros(7)}))
    capture("pending without overlap", lambda: local.load_state_dict({**state, "pending": torch.zeros(7)}))
    local.close()
    # World size 1: the sync is the outer step on this rank's own pseudo-gradient.
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = threelc.local.LocalSteps(ddp, inner, sync_every=2, outer="3lc", outer_momentum=0.0, outer_lr=0.5)
    start = _flat(model)
    for step in range(2):
        _inner_step(ddp, inner, rank, step)
        before = _flat(model)
        local.step()
    alone = (start, before, _flat(model))
    # An inner optimizer that steps on without local.step(): a warning, not a silent drift.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("threelc.hooks.local").addHandler(handler)
    for step in range(3):
        _inner_step(ddp, inner, rank, step)
    local.close()
    return errors, alone, [record.getMessage() for record in records]


def test_bad_arguments_raise_clear_errors_and_one_rank_works():
    errors, (start, before, after), warnings = run_ranks(bad_arguments, 1, timeout_s=300)[0]
    for index, (options, message) in enumerate(BAD_ARGUMENTS):
        kind, text = errors[index]
        assert kind == "ValueError", (options, text)
        assert re.search(message, text), (options, text)
    assert errors["not ddp"][0] == "TypeError" and "DistributedDataParallel" in errors["not ddp"][1]
    assert errors["foreign"][0] == "ValueError" and "trainable parameters" in errors["foreign"][1]
    assert errors["not an optimizer"][0] == "ValueError"
    assert errors["threelc adamw"][0] == "ValueError" and "torch.optim.AdamW" in errors["threelc adamw"][1]
    assert errors["hook taken"][0] == "RuntimeError" and "once" in errors["hook taken"][1]
    assert errors["sync in warm-up"][0] == "RuntimeError" and "warm-up" in errors["sync in warm-up"][1]
    assert errors["version"][0] == "ValueError" and "version" in errors["version"][1]
    assert errors["other model"][0] == "ValueError" and "another model" in errors["other model"][1]
    kind, text = errors["pending without overlap"]
    assert kind == "ValueError" and "overlap=True" in text
    # One rank: nothing to average; outer lr 0.5 without momentum lands half-way.
    assert torch.equal(after, start.add(start - before, alpha=-0.5))
    assert len(warnings) == 1 and "stepped 3 times without LocalSteps.step()" in warnings[0]


# ------------------------------------------------------------------ the examples' --local-steps
TINY_TEXT = ["--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16", "--corpus-chars", "20000",
             "--batch-size", "4", "--no-progress"]


def test_train_text_with_local_steps_counts_the_outer_bytes(tmp_path):
    torchrun(2, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "6", "--eval-every", "6",
                                                       "--local-steps", "3", "--outer", "3lc", "--warmup-steps", "2",
                                                       "--outer-passes", "2", "--run-dir", tmp_path], timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "hook-rank1.jsonl").read_text().splitlines()]
    assert [line["compressed"] for line in lines] == [False, False, False, False, True, False]
    sent = [line["sent_bytes"] for line in lines]
    assert sent[0] > sent[4] > 0 and sent[2] == sent[3] == sent[5] == 0  # warm-up allreduce, then one sync
    assert lines[4]["raw_bytes"] == 2 * lines[0]["raw_bytes"]  # the model's bytes, once per 3LC pass
    config = json.loads((tmp_path / "config.json").read_text())
    # No --sparsity/--collective: the config records what LocalSteps chose, not the per-step hook's defaults.
    assert (config["hook"], config["sparsity"], config["collective"]) == (
        "local-3lc", threelc.local.OUTER_SPARSITY, threelc.local.sync_exchange(2)["collective"])


def test_train_text_with_overlap_finishes_the_last_sync(tmp_path):
    torchrun(2, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "4", "--eval-every", "4",
                                                       "--local-steps", "2", "--outer", "fp32", "--outer-overlap",
                                                       "--run-dir", tmp_path], timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    raw = lines[3]["raw_bytes"]
    # The sync of step 1 is waited for at step 3, the one of step 3 by finish() in a line of its own.
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert [line["raw_bytes"] for line in lines] == [0, 0, 0, raw, raw] and raw > 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["sync_s" in record for record in metrics] == [False, True, False, True]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["hook"], config["sparsity"], config["collective"]) == ("local-fp32", None, None)  # no 3LC


def test_local_steps_refuse_a_per_step_hook(tmp_path):
    with pytest.raises(AssertionError, match="replaces the per-step hook"):
        torchrun(1, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "2", "--local-steps", "2",
                                                           "--hook", "threelc"], timeout=120)
