"""Checkpoint and resume: a run stopped after k steps and resumed in fresh processes from
(model, optimizer, hook state) ends bitwise identical to a run that never stopped.

DDP's first iteration in a fresh process uses its initial bucket layout (parameters in
registration order, a 1 MiB first bucket) and rebuilds the buckets in gradient-ready order after
it.  With parameter names bound (``register`` does it), residuals follow the parameters across
that change, and allgather with per-tensor scales resumes bitwise identically whatever the
layouts ("rebuilt" model).  Without names, or with scatter-reduce (whose shards depend on the
layout), bitwise identity needs the two layouts to agree: the "ready_order" model registers its
layers in the order their gradients become ready, without biases, in one bucket.
"""

import os

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from threelc.hooks import ThreeLCState, register, threelc_hook

from _dist import run_ranks

TOTAL_STEPS = 10
STOP_AT = 6
OPTIONS = {"start_iter": 3, "min_numel": 64}
# (collective, how the hook state is saved, model)
CASES = [("allgather", "state_dict", "ready_order"), ("scatter_reduce", "state_dict", "ready_order"),
         ("scatter_reduce", "pickle", "ready_order"), ("allgather", "state_dict", "rebuilt")]


class ReadyOrderNet(nn.Module):
    """Layers registered last-to-first: registration order == gradient-ready order."""

    def __init__(self):
        super().__init__()
        self.output = nn.Linear(64, 4, bias=False)
        self.hidden = nn.Linear(64, 64, bias=False)
        self.input = nn.Linear(16, 64, bias=False)

    def forward(self, x):
        return self.output(torch.relu(self.hidden(torch.relu(self.input(x)))))


def _setup(kind):
    """The model and optimizer, and DDP's bucket cap (small: initial and rebuilt layouts differ)."""
    torch.manual_seed(0)
    if kind == "ready_order":
        model, bucket_cap_mb = ReadyOrderNet(), 25
    else:
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        bucket_cap_mb = 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # stateful optimizer
    return model, optimizer, bucket_cap_mb


def _train(ddp, optimizer, rank, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * rank + step)
        optimizer.zero_grad()
        ddp(torch.randn(8, 16, generator=generator)).pow(2).mean().backward()
        optimizer.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def first_half_and_uninterrupted(rank, world_size, folder):
    results = {}
    for collective, how, kind in CASES:
        # The uninterrupted reference.
        model, optimizer, bucket_cap_mb = _setup(kind)
        ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
        register(ddp, collective=collective, **OPTIONS)
        _train(ddp, optimizer, rank, range(TOTAL_STEPS))
        reference = _flat(model)
        # The run that stops after STOP_AT steps and saves everything.
        model, optimizer, bucket_cap_mb = _setup(kind)
        ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
        state = register(ddp, collective=collective, **OPTIONS)
        _train(ddp, optimizer, rank, range(STOP_AT))
        hook_state = state.state_dict() if how == "state_dict" else state  # pickled by torch.save
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook_state},
                   os.path.join(folder, f"{collective}-{how}-{kind}-rank{rank}.pt"))
        results[(collective, how, kind)] = reference
    return results


def _resume_one(rank, folder, collective, how, kind, keep_residuals):
    checkpoint = torch.load(os.path.join(folder, f"{collective}-{how}-{kind}-rank{rank}.pt"), weights_only=False)
    model, optimizer, bucket_cap_mb = _setup(kind)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    if how == "state_dict":
        state = ThreeLCState(collective=collective, **OPTIONS)
        state.load_state_dict(checkpoint["hook"])
        state.bind_parameters(model)
    else:
        state = checkpoint["hook"]  # unpickled: no process group, no parameter names
        assert state.process_group is None
    assert state.iteration == STOP_AT and state._residuals
    if not keep_residuals:
        state._residuals = {}
        state._by_name = {}
    ddp.register_comm_hook(state, threelc_hook)
    _train(ddp, optimizer, rank, range(STOP_AT, TOTAL_STEPS))
    return _flat(model), state.stats()["total"]["step"]


def resume(rank, world_size, folder):
    """Resume every case in these fresh processes; also once with the residuals thrown away."""
    return {(*case, keep): _resume_one(rank, folder, *case, keep) for case in CASES for keep in (True, False)}


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    folder = str(tmp_path)
    references = run_ranks(first_half_and_uninterrupted, 2, folder, timeout_s=300)
    resumed = run_ranks(resume, 2, folder, timeout_s=300)
    for case in CASES:
        for rank in range(2):
            parameters, steps = resumed[rank][(*case, True)]
            assert steps == TOTAL_STEPS  # cumulative statistics travel with the state too
            assert torch.equal(parameters, references[rank][case]), (case, rank)
            # The residuals matter: without them the run ends elsewhere (so the check above has teeth).
            assert not torch.equal(resumed[rank][(*case, False)][0], references[rank][case])
        assert torch.equal(references[0][case], references[1][case])
