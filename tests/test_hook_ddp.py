"""The hook inside real DDP models on real gloo ranks: replicas stay bitwise identical.

Each world size spawns once and runs every case in it (spawning costs more than the cases); the
tests assert on the collected results.
"""

import itertools
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from threelc.hooks import STAT_KEYS, ThreeLCState, register, threelc_hook

from _dist import run_ranks

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STEPS = 6
START_ITER = 2


class Net(nn.Module):
    def __init__(self, unused_branch=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        # With find_unused_parameters, a parameter that gets no gradient must not upset the hook.
        self.unused = nn.Linear(16, 40) if unused_branch else None

    def forward(self, x):
        return self.body(x)


def _batch(rank, step, dtype):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=generator).to(dtype)


def _flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def train_case(rank, world_size, collective="allgather", scale="tensor", dtype="float32", ddp_options=None,
               no_sync=False, stats_dir=None, group_ranks=None, explicit_state=False):
    """Train a few steps; return the parameters before and after and the hook's statistics."""
    ddp_options = {"bucket_cap_mb": 0.01, **(ddp_options or {})}
    group = None
    if group_ranks is not None:
        # Every rank must create every group, in the same order.
        groups = [dist.new_group(ranks) for ranks in group_ranks]
        group = next(g for g, ranks in zip(groups, group_ranks) if rank in ranks)
    torch.manual_seed(0)
    model = Net(unused_branch=ddp_options.get("find_unused_parameters", False)).to(DTYPES[dtype])
    before = _flat(model)
    ddp = DDP(model, process_group=group, **ddp_options)
    options = dict(collective=collective, scale=scale, block_size=100, start_iter=START_ITER, min_numel=64,
                   stats_dir=stats_dir)
    if explicit_state:
        state = ThreeLCState(process_group=group, **options)
        ddp.register_comm_hook(state, threelc_hook)
    else:
        state = register(ddp, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    steps = []
    for step in range(STEPS):
        optimizer.zero_grad()
        if no_sync:
            # Gradient accumulation: the first micro-batch stays local, the second is averaged.
            with ddp.no_sync():
                ddp(_batch(rank, 100 + step, DTYPES[dtype])).float().pow(2).mean().backward()
        ddp(_batch(rank, step, DTYPES[dtype])).float().pow(2).mean().backward()
        optimizer.step()
        steps.append(state.stats()["step"])
    residuals_finite = all(np.isfinite(entry.worker).all() for entry in state._residuals.values())
    state.close()
    return {"before": before, "after": _flat(model), "steps": steps, "total": state.stats()["total"],
            "residuals": len(state._residuals), "residuals_finite": residuals_finite}


def train_with_grad_scaler(rank, world_size, collective, inf_step=4):
    """AMP loss scaling on CPU with an Inf injected into one rank's gradient at ``inf_step``."""
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = register(ddp, collective=collective, start_iter=START_ITER, min_numel=64)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    poison = {"on": False}
    # A tensor hook edits the gradient before DDP's reducer copies it into the bucket.
    model.body[2].weight.register_hook(lambda grad: grad + float("inf") if poison["on"] else grad)
    records = []
    for step in range(STEPS + 2):
        poison["on"] = rank == 1 and step == inf_step
        optimizer.zero_grad()
        scaler.scale(ddp(_batch(rank, step, torch.float32)).pow(2).mean()).backward()
        bucket_finite = [bool(torch.isfinite(p.grad).all()) for p in model.parameters()]
        before = _flat(model)
        scaler.step(optimizer)
        scaler.update()
        records.append({"grads_finite": all(bucket_finite), "moved": not torch.equal(before, _flat(model)),
                        "scale": scaler.get_scale()})
    residuals_finite = all(np.isfinite(entry.worker).all() and (entry.server is None or np.isfinite(entry.server).all())
                           for entry in state._residuals.values())
    state.close()
    return {"records": records, "after": _flat(model), "residuals_finite": residuals_finite}


def run_cases(rank, world_size, cases):
    """Run ``(function name, kwargs)`` cases in order in one process group."""
    functions = {"train_case": train_case, "train_with_grad_scaler": train_with_grad_scaler}
    return [functions[name](rank, world_size, **kwargs) for name, kwargs in cases]


def _assert_replicas_identical(results, index, label):
    reference = results[0][index]["after"]
    for rank, result in enumerate(results):
        assert torch.equal(result[index]["after"], reference), f"{label}: rank {rank} diverged from rank 0"
    assert not torch.equal(reference, results[0][index]["before"]), f"{label}: the model did not train"


TWO_RANK_MATRIX = [dict(collective=c, scale=s, dtype=d) for c, s, d in
                   itertools.product(("allgather", "scatter_reduce"), ("tensor", "bucket", "block"), DTYPES)]
DDP_VARIANTS = [
    dict(ddp_options={"gradient_as_bucket_view": True}),
    dict(ddp_options={"static_graph": True}),
    dict(ddp_options={"find_unused_parameters": True}),
    dict(no_sync=True),
    dict(ddp_options={"bucket_cap_mb": 25}),  # one big bucket
    dict(explicit_state=True),
]
TWO_RANK_CASES = ([("train_case", case) for case in TWO_RANK_MATRIX]
                  + [("train_case", {**variant, "collective": c}) for variant in DDP_VARIANTS
                     for c in ("allgather", "scatter_reduce")]
                  + [("train_with_grad_scaler", {"collective": c}) for c in ("allgather", "scatter_reduce")])
FOUR_RANK_CASES = ([("train_case", dict(collective=c, scale=s)) for c in ("allgather", "scatter_reduce")
                    for s in ("tensor", "bucket", "block")]
                   + [("train_case", dict(collective=c, dtype=d)) for c in ("allgather", "scatter_reduce")
                      for d in ("float16", "bfloat16")]
                   + [("train_case", dict(collective="auto", group_ranks=[[0, 1], [2, 3]])),
                      ("train_case", dict(collective="scatter_reduce", group_ranks=[[0, 1], [2, 3]],
                                          explicit_state=True)),
                      ("train_with_grad_scaler", {"collective": "scatter_reduce"})])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    stats_dir = str(tmp_path_factory.mktemp("stats"))
    cases = TWO_RANK_CASES + [("train_case", {"collective": "allgather", "stats_dir": stats_dir})]
    return run_ranks(run_cases, 2, cases, timeout_s=400), stats_dir


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(run_cases, 4, FOUR_RANK_CASES, timeout_s=400)


def test_replicas_identical_for_every_collective_scale_and_dtype_on_two_ranks(two_ranks):
    results, _ = two_ranks
    for index, case in enumerate(TWO_RANK_MATRIX):
        _assert_replicas_identical(results, index, case)
        steps = results[0][index]["steps"]
        assert [s["compressed"] for s in steps] == [False] * START_ITER + [True] * (STEPS - START_ITER)


def test_replicas_identical_with_every_ddp_option(two_ranks):
    results, _ = two_ranks
    offset = len(TWO_RANK_MATRIX)
    for k, (variant, collective) in enumerate(itertools.product(DDP_VARIANTS, ("allgather", "scatter_reduce"))):
        index = offset + k
        label = {**variant, "collective": collective}
        _assert_replicas_identical(results, index, label)
        assert results[0][index]["steps"][-1]["compressed"], label
        assert results[0][index]["residuals_finite"], label


def test_replicas_identical_on_four_ranks_and_on_subgroups(four_ranks):
    results = four_ranks
    for index, (name, case) in enumerate(FOUR_RANK_CASES):
        if name != "train_case":
            continue
        if "group_ranks" in case:
            for pair in ([0, 1], [2, 3]):
                assert torch.equal(results[pair[0]][index]["after"], results[pair[1]][index]["after"]), case
            # The two pairs trained on different data: they must not have been averaged together.
            assert not torch.equal(results[0][index]["after"], results[2][index]["after"]), case
            assert all(r[index]["steps"][-1]["world_size"] == 2 for r in results)
        else:
            _assert_replicas_identical(results, index, case)
        assert results[0][index]["steps"][-1]["compressed"], case


def _check_grad_scaler(records_per_rank, inf_step):
    for records in records_per_rank:
        step = records[inf_step]
        assert step["grads_finite"] is False, "the non-finite bucket must reach every rank"
        assert step["moved"] is False, "GradScaler must skip the step"
        assert step["scale"] == records[inf_step - 1]["scale"] / 2
        assert all(r["grads_finite"] and r["moved"] for k, r in enumerate(records) if k != inf_step)


def test_grad_scaler_skips_the_poisoned_step_on_every_rank(two_ranks, four_ranks):
    results, _ = two_ranks
    scaler_indices = [k for k, (name, _) in enumerate(TWO_RANK_CASES) if name == "train_with_grad_scaler"]
    for index in scaler_indices:
        _check_grad_scaler([result[index]["records"] for result in results], inf_step=4)
        assert all(result[index]["residuals_finite"] for result in results)
        assert all(torch.equal(result[index]["after"], results[0][index]["after"]) for result in results)
    index = len(FOUR_RANK_CASES) - 1
    _check_grad_scaler([result[index]["records"] for result in four_ranks], inf_step=4)
    assert all(result[index]["residuals_finite"] for result in four_ranks)


def test_statistics_and_json_lines_log(two_ranks):
    results, stats_dir = two_ranks
    index = len(TWO_RANK_CASES)
    for rank, result in enumerate(results):
        steps, total = result[index]["steps"], result[index]["total"]
        lines = [json.loads(line) for line in open(os.path.join(stats_dir, f"hook-rank{rank}.jsonl"))]
        assert [line["step"] for line in lines] == list(range(STEPS))
        assert all(tuple(line) == STAT_KEYS + ("time",) for line in lines)
        assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == steps
        assert total["step"] == STEPS and total["raw_bytes"] == sum(s["raw_bytes"] for s in steps)
        assert total["sent_bytes"] == sum(s["sent_bytes"] for s in steps)
        raw = steps[-1]["raw_bytes"]
        assert raw == 4 * sum(p.numel() for p in Net().parameters())
        # Warm-up: ring allreduce bytes (2 (N - 1) / N * raw = raw for N = 2); the first call adds
        # the 8-byte configuration fingerprint.
        assert steps[1]["sent_bytes"] == steps[1]["received_bytes"] == raw
        assert steps[0]["sent_bytes"] == raw + 8
        assert steps[1]["ratio"] == 1.0 and not steps[1]["compressed"]
        # Compressed steps move far fewer bytes, and every rank counts what the others sent it.
        assert steps[-1]["compressed"] and steps[-1]["ratio"] > 5
        assert steps[-1]["compress_s"] > 0 and steps[-1]["decompress_s"] > 0 and steps[-1]["comm_s"] > 0
    assert results[0][index]["steps"][-1]["sent_bytes"] == results[1][index]["steps"][-1]["received_bytes"]
    assert results[1][index]["steps"][-1]["sent_bytes"] == results[0][index]["steps"][-1]["received_bytes"]


def test_world_size_one_leaves_gradients_exact():
    hooked, = run_ranks(run_cases, 1, [("train_case", {}), ("train_case", {"collective": "scatter_reduce"})])
    torch.manual_seed(0)
    reference = Net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(STEPS):
        optimizer.zero_grad()
        reference(_batch(0, step, torch.float32)).pow(2).mean().backward()
        optimizer.step()
    for result in hooked:
        assert torch.equal(result["after"], _flat(reference))
        assert result["total"]["sent_bytes"] == 0 and result["total"]["ratio"] is None
