"""threelc.integrations in the real frameworks, 2 gloo ranks each (tests/_frameworks.py runs them).

For each framework: training compresses (the statistics count compressed steps and fewer bytes
sent than raw), the replicas end bitwise identical, the framework's own save writes one hook
state file per rank, and a resume in fresh framework objects loads every rank's residuals
exactly as saved.  Nothing warns in correct use; Lightning's own comm-hook arguments on CPU do,
and so does the Hugging Face Trainer's default optimizer (torch's AdamW, not paired with the hook).
"""

import pytest
import torch

from _dist import run_ranks
import _frameworks

pytest.importorskip("lightning")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")


def _check_common(results, resumed_iteration, expected_warning=None):
    """``expected_warning``: a phrase that every threelc warning of the run must contain (and at least
    one must be logged); None: no warning at all."""
    for rank, result in enumerate(results):
        for key in ("stats", "resumed_stats"):
            assert result[key]["compressed"] and result[key]["sent_bytes"] < result[key]["raw_bytes"], (key, result[key])
        saved, loaded = result["saved"], result["loaded"]
        loaded_residuals = loaded["residuals"] if "residuals" in loaded else loaded
        assert saved.keys() == loaded_residuals.keys() and saved
        for index in saved:
            assert saved[index].abs().sum() > 0  # the comparison below has something to compare
            assert torch.equal(saved[index], loaded_residuals[index]), (rank, index)
        if resumed_iteration is not None:
            assert loaded["iteration"] == resumed_iteration
        if expected_warning is None:
            assert result["warnings"] == [], result["warnings"]
        else:
            assert result["warnings"] and all(expected_warning in message for message in result["warnings"]), \
                result["warnings"]
    # The two ranks saved different residuals (each rank restored its own, not rank 0's).
    assert any(not torch.equal(results[0]["saved"][index], results[1]["saved"][index]) for index in results[0]["saved"])
    for key in ("parameters", "resumed_parameters"):
        assert torch.equal(results[0][key], results[1][key]), key


@pytest.mark.slow
def test_lightning_strategy_compresses_on_cpu_and_resumes_every_rank(tmp_path):
    results = run_ranks(_frameworks.lightning_run, 2, str(tmp_path), timeout_s=600)
    _check_common(results, resumed_iteration=_frameworks.STEPS)
    # ModelCheckpoint kept the step-6 checkpoint with both ranks' files; the rotated ones left none.
    assert results[0]["files"] == ["epoch=1-step=6.ckpt", "epoch=1-step=6.ckpt.threelc-rank0.pt",
                                   "epoch=1-step=6.ckpt.threelc-rank1.pt", "last.ckpt"], results[0]["files"]
    for result in results:  # DDPStrategy(ddp_comm_hook=...) on CPU: no longer silent
        assert len(result["plain_warnings"]) == 1 and "never run" in result["plain_warnings"][0]


@pytest.mark.slow
def test_accelerate_register_compresses_and_save_load_state_carries_every_rank(tmp_path):
    results = run_ranks(_frameworks.accelerate_run, 2, str(tmp_path), timeout_s=600)
    _check_common(results, resumed_iteration=None)
    assert {"threelc-rank0.pt", "threelc-rank1.pt", "model.safetensors"} <= set(results[0]["files"])


@pytest.mark.slow
def test_transformers_callback_resumes_bitwise_from_checkpoint_folder(tmp_path):
    results = run_ranks(_frameworks.transformers_run, 2, str(tmp_path), timeout_s=600)
    # The Trainer's default optimizer is torch's AdamW: the hook says to pair threelc.optim.AdamW instead.
    _check_common(results, resumed_iteration=_frameworks.TRAINER_SAVE_AT,
                  expected_warning="torch.optim.adamw.AdamW steps parameters whose gradients the 3LC hook")
    assert {"threelc-rank0.pt", "threelc-rank1.pt", "rng_state_1.pth"} <= set(results[0]["files"])
    for result in results:  # trainer.train(resume_from_checkpoint=...) ends where the uninterrupted run did
        assert torch.equal(result["parameters"], result["resumed_parameters"])
