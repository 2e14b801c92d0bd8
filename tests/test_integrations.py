"""The pieces under threelc.integrations, without the frameworks' training loops: state dict
ownership (rank, world size), merging for a new world size, the per-rank checkpoint files, the
never-called warning, register()'s refusals, and the integrations' argument checks.
(tests/test_integrations_frameworks.py runs the real frameworks.)"""

import logging
import subprocess
import sys
import weakref

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from threelc.hooks import StateOwnerError, ThreeLCState, merge_state_dicts, never_called, register, threelc_hook
from threelc.hooks.integrations import check_option_names
from threelc.hooks.integrations.checkpoint import load_rank_state

from _dist import run_ranks
import _frameworks

LOGGER = "threelc"


def _state_with_residuals(worker, server=None, server_start=0):
    """A state holding one bucket's residuals (layout (2, 2)), like one rank's after training."""
    state = ThreeLCState()
    entry = state.residual_for(0, (2, 2), 4, None if server is None else (server_start, server_start + len(server)))
    entry.worker[:] = torch.tensor(worker)
    if server is not None:
        entry.server[:] = torch.tensor(server)
    return state


def _owned(state_dict, rank, world_size):
    return {**state_dict, "owner": {"rank": rank, "world_size": world_size}}


# ---------------------------------------------------------------------------- ownership records
def test_state_dict_records_owner_and_configuration():
    saved = ThreeLCState(sparsity=1.5).state_dict()
    assert saved["version"] == 2
    assert saved["owner"] == {"rank": 0, "world_size": 1}  # no process group: one process
    assert saved["config"]["sparsity"] == 1.5


@pytest.mark.parametrize("owner, words", [((1, 1), "rank 0 loaded the hook state of rank 1"),
                                          ((0, 4), "saved by rank 0 of 4 ranks, but this run has 1")])
def test_loading_another_ranks_or_world_sizes_state_raises(owner, words):
    saved = _owned(_state_with_residuals([1.0, 2, 3, 4]).state_dict(), *owner)
    state = ThreeLCState()
    state.load_state_dict(saved)  # no process group yet: checked on the hook's first call
    with pytest.raises(StateOwnerError, match=words):
        state.check_owner()


def test_version_1_state_dicts_load_with_a_warning_and_unknown_versions_refuse(caplog):
    saved = _state_with_residuals([1.0, 2, 3, 4]).state_dict()
    old = {key: value for key, value in saved.items() if key != "owner"} | {"version": 1}
    state = ThreeLCState()
    with caplog.at_level(logging.WARNING, LOGGER):
        state.load_state_dict(old)
    assert "version 1" in caplog.text
    assert torch.equal(state.state_dict()["residuals"][0]["worker"], saved["residuals"][0]["worker"])
    with pytest.raises(ValueError, match="version 3"):
        ThreeLCState().load_state_dict(saved | {"version": 3})


# ---------------------------------------------------------------------------- merging for a new world size
def test_merge_keeps_the_gradient_mass_every_rank_still_owes():
    # Two ranks of a scatter-reduce run: rank r owns shard [2r, 2r + 2) and its server residual.
    rank0 = _owned(_state_with_residuals([1.0, 2, 3, 4], server=[0.5, 0.25], server_start=0).state_dict(), 0, 2)
    rank1 = _owned(_state_with_residuals([3.0, 0, -3, 8], server=[1.0, -1.0], server_start=2).state_dict(), 1, 2)
    merged = merge_state_dicts([rank1, rank0])  # any order
    # Owed by the mean: (w0 + w1) / 2 + server residuals at their positions.
    expected = torch.tensor([(1 + 3) / 2 + 0.5, (2 + 0) / 2 + 0.25, (3 - 3) / 2 + 1.0, (4 + 8) / 2 - 1.0])
    assert torch.equal(merged["residuals"][0]["worker"], expected)
    assert merged["residuals"][0]["server"] is None and merged["owner"]["merged_from"] == 2
    # Any rank of any world size loads it: with N ranks each owing `expected`, the mean owes it once.
    state = ThreeLCState()
    state.load_state_dict(merged)
    state.check_owner()
    assert torch.equal(state.state_dict()["residuals"][0]["worker"], expected)


def test_merge_refuses_incomplete_or_inconsistent_sets():
    saved = _state_with_residuals([1.0, 2, 3, 4]).state_dict()
    with pytest.raises(ValueError, match="every rank"):
        merge_state_dicts([_owned(saved, 0, 2)])
    with pytest.raises(ValueError, match="every rank"):
        merge_state_dicts([_owned(saved, 0, 2), _owned(saved, 0, 2)])
    with pytest.raises(ValueError, match="iterations"):
        merge_state_dicts([_owned(saved, 0, 2), _owned(saved | {"iteration": 3}, 1, 2)])
    other = ThreeLCState()
    other.residual_for(0, (4,), 4, None)
    with pytest.raises(ValueError, match="bucket 0 differs"):
        merge_state_dicts([_owned(saved, 0, 2), _owned(other.state_dict(), 1, 2)])


# ---------------------------------------------------------------------------- per-rank files
def _write_ranks(folder, world_size):
    for rank in range(world_size):
        state = _state_with_residuals([float(rank + 1)] * 4)
        torch.save(_owned(state.state_dict(), rank, world_size), folder / f"threelc-rank{rank}.pt")


def test_rank_files_load_own_refuse_a_new_world_size_or_reshard(tmp_path):
    path_of = lambda rank: str(tmp_path / f"threelc-rank{rank}.pt")  # noqa: E731
    assert load_rank_state(ThreeLCState(), path_of) is False  # nothing saved: nothing to lose
    _write_ranks(tmp_path, 2)
    with pytest.raises(StateOwnerError, match="holds the hook state of 2 ranks, this run has 1"):
        load_rank_state(ThreeLCState(), path_of)
    state = ThreeLCState()
    assert load_rank_state(state, path_of, reshard=True)
    assert torch.equal(state.state_dict()["residuals"][0]["worker"], torch.full((4,), 1.5))
    # Rank 1 of 2 loads its own file.
    state = ThreeLCState()
    state._owner = lambda: (1, 2)
    assert load_rank_state(state, path_of)
    assert torch.equal(state.state_dict()["residuals"][0]["worker"], torch.full((4,), 2.0))
    # Rank 1's file missing while rank 0 saved: an error, not zero residuals.
    (tmp_path / "threelc-rank1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="every rank must save its own"):
        load_rank_state(state, path_of)
    with pytest.raises(FileNotFoundError, match="resharding needs every saved rank"):
        load_rank_state(ThreeLCState(), path_of, reshard=True)


# ---------------------------------------------------------------------------- never-called warning
@pytest.fixture
def fresh_watch(monkeypatch):
    """Watch only the states this test makes (other tests' states live on in this process)."""
    monkeypatch.setattr(never_called, "_pending", weakref.WeakSet())
    monkeypatch.setattr(never_called, "_registered", weakref.WeakSet())


def _optimizer_step():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    parameter.sum().backward()
    optimizer.step()


def test_a_state_whose_hook_never_ran_warns_once_at_the_optimizer_step(fresh_watch, caplog):
    state = ThreeLCState()
    with caplog.at_level(logging.WARNING, LOGGER):
        _optimizer_step()
        _optimizer_step()
    warnings = [record.getMessage() for record in caplog.records if "never run" in record.getMessage()]
    assert len(warnings) == 1
    assert "never registered" in warnings[0] and "ThreeLCStrategy" in warnings[0] and "register(" in warnings[0]
    del state


def _adam_warnings(caplog, make_optimizer, paired=False, bound=True):
    """The unpaired-Adam warnings of one optimizer step over a model a fresh state is bound to."""
    import threelc.optim

    model = torch.nn.Linear(3, 2)
    state = ThreeLCState()
    if bound:
        state.bind_parameters(model)  # what register() does
    if paired:
        state.optimizer = threelc.optim.AdamW(model.parameters())
    state._hook_called = True  # the never-called warning is another test's
    optimizer = make_optimizer(model)
    model(torch.ones(1, 3)).sum().backward()
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOGGER):
        optimizer.step()
        optimizer.step()  # warns once
    del state
    return [record.getMessage() for record in caplog.records if "paired" in record.getMessage()]


def test_torch_adam_over_the_compressed_model_warns_once_and_says_what_to_use(fresh_watch, caplog):
    """The Hugging Face Trainer's default (torch's AdamW) with only the callback added: warned."""
    for make in (lambda model: torch.optim.AdamW(model.parameters()), lambda model: torch.optim.Adam(model.parameters())):
        warnings = _adam_warnings(caplog, make)
        assert len(warnings) == 1 and "torch.optim" in warnings[0], warnings
        assert "threelc.optim.AdamW" in warnings[0] and "register(ddp_model, optimizer=opt)" in warnings[0]
    other = torch.nn.Linear(2, 2)  # an Adam over another model's parameters
    assert _adam_warnings(caplog, lambda model: torch.optim.AdamW(other.parameters())) == []
    assert _adam_warnings(caplog, lambda model: torch.optim.SGD(model.parameters(), lr=0.1)) == []
    assert _adam_warnings(caplog, lambda model: torch.optim.AdamW(model.parameters()), paired=True) == []
    assert _adam_warnings(caplog, lambda model: torch.optim.AdamW(model.parameters()), bound=False) == []


def test_a_registered_state_never_called_warns_at_exit(fresh_watch, caplog):
    state = ThreeLCState()
    never_called.watch_registered(state)
    called = ThreeLCState()
    never_called.watch_registered(called)
    called._hook_called = True
    with caplog.at_level(logging.WARNING, LOGGER):
        never_called._at_exit()
    warnings = [record.getMessage() for record in caplog.records if "never run" in record.getMessage()]
    assert len(warnings) == 1 and "exiting" in warnings[0] and "ddp_model.module" in warnings[0]


def correct_use(rank, world_size):
    """torch.compile around DDP (register() unwraps it), warm-up and compressed steps, the exit
    check; then the compiled-autograd Python reducer, which register() refuses."""
    counter = _frameworks.WarningCounter()
    ddp = DDP(_frameworks.small_model())
    compiled = torch.compile(ddp, backend="aot_eager")  # DDPOptimizer, the default optimize_ddp
    state = register(compiled, **_frameworks.OPTIONS)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for inputs, targets in list(_frameworks.loader(rank))[:4]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(compiled(inputs).squeeze(1), targets).backward()
        optimizer.step()
    never_called._at_exit()
    torch._dynamo.config.optimize_ddp = "python_reducer"
    try:
        register(DDP(_frameworks.small_model()))
        refused = None
    except NotImplementedError as error:
        refused = str(error)
    return {"warnings": counter.messages, "called": state._hook_called, "stats": state.stats()["total"],
            "refused": refused, "parameters": _frameworks.flat_parameters(ddp.module)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_correct_use_never_warns_and_the_python_reducer_is_refused(world_size):
    results = run_ranks(correct_use, world_size, timeout_s=300)
    for result in results:
        assert result["called"] and result["warnings"] == []
        assert result["stats"]["compressed"] == (world_size > 1)
        assert "python_reducer" in result["refused"] and "not supported" in result["refused"]
    assert all(torch.equal(result["parameters"], results[0]["parameters"]) for result in results)


# ---------------------------------------------------------------------------- refusals and argument checks
def test_register_needs_a_ddp_model():
    with pytest.raises(TypeError, match="needs a torch.nn.parallel.DistributedDataParallel model, got Sequential"):
        register(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_hook_refuses_python_reducer_tuples():
    parameter = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="python_reducer"):
        threelc_hook(ThreeLCState(), (torch.ones(2), parameter))


def test_misspelt_hook_options_are_caught_when_the_integration_is_built():
    check_option_names({"sparsity": 1.0, "start_iter": 3, "process_group": None})
    with pytest.raises(ValueError, match="sparsty"):
        check_option_names({"sparsty": 1.0})


def test_lightning_strategy_refuses_comm_hook_arguments_and_typos():
    pytest.importorskip("lightning")
    from threelc.integrations import ThreeLCStrategy

    with pytest.raises(ValueError, match="registers the 3LC hook itself"):
        ThreeLCStrategy(ddp_comm_hook=threelc_hook)
    with pytest.raises(ValueError, match="sparsty"):
        ThreeLCStrategy(hook_options={"sparsty": 1.0})


def test_accelerate_with_one_process_says_how_to_start_several():
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from threelc.integrations import register_accelerate

    accelerator = Accelerator(cpu=True)
    with pytest.raises(TypeError, match="torchrun --nproc-per-node 2"):
        register_accelerate(accelerator, torch.nn.Linear(2, 2))


def test_threelc_integrations_imports_no_framework_until_asked():
    code = ("import sys, threelc, threelc.integrations as i; "
            "assert not {'lightning', 'accelerate', 'transformers', 'torch'} & set(sys.modules), sys.modules.keys(); "
            "assert sorted(dir(i)) == ['ThreeLCCallback', 'ThreeLCStrategy', 'register_accelerate']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import threelc.integrations

        threelc.integrations.nothing  # noqa: B018


def test_accelerate_gives_a_second_model_files_of_its_own():
    from threelc.hooks.integrations.accelerate import _path_of

    assert _path_of("ckpt", 0)(1).endswith("ckpt/threelc-rank1.pt")
    assert _path_of("ckpt", 1)(1).endswith("ckpt/threelc-model1-rank1.pt")


def test_trainer_callback_resumes_only_the_checkpoint_the_trainer_resumed(tmp_path, caplog):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from threelc.hooks.integrations.transformers import ThreeLCCallback, _trainer_fingerprint

    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    trainer_state = SimpleNamespace(global_step=4, log_history=[{"loss": 1.25, "step": 2}])
    callback = ThreeLCCallback(trainer=None)
    callback.threelc_state = ThreeLCState()
    with caplog.at_level(logging.WARNING, LOGGER):
        callback._resume(args, trainer_state)  # nothing saved: a warning, residuals from zero
    assert "no 3LC hook state was found" in caplog.text
    saved = _state_with_residuals([1.0, 2, 3, 4]).state_dict()
    (tmp_path / "checkpoint-4").mkdir()
    torch.save({**saved, "trainer": _trainer_fingerprint(trainer_state)}, tmp_path / "checkpoint-4" / "threelc-rank0.pt")
    callback._resume(args, trainer_state)
    assert torch.equal(callback.threelc_state.state_dict()["residuals"][0]["worker"], torch.tensor([1.0, 2, 3, 4]))
    # Same step, another run's log history: the files belong to another checkpoint.
    other_run = SimpleNamespace(global_step=4, log_history=[{"loss": 9.5, "step": 2}])
    with pytest.raises(FileNotFoundError, match="belongs to another checkpoint"):
        callback._resume(args, other_run)
