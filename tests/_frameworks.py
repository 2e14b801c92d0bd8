"""Rank functions of tests/test_integrations_frameworks.py: real Lightning, Accelerate and Hugging
Face Trainer runs on gloo ranks (tiny models, random data made on the spot, nothing downloaded).

Each function runs in one process per rank: it trains and saves through the framework's own
checkpointing, then builds everything afresh (model, framework objects, hook state) and resumes
from that checkpoint, reporting the residuals saved and the residuals loaded for comparison.
"""

from __future__ import annotations

import logging
import os

import torch

OPTIONS = {"start_iter": 2, "min_numel": 16}
STEPS = 6


def framework_environment(rank: int, world_size: int) -> None:
    """The torchrun variables the frameworks read, describing the process group run_ranks made."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29500"), "TORCHELASTIC_RUN_ID": "threelc-test"})


class WarningCounter(logging.Handler):
    """Collects the warnings threelc logs (the never-called warning above all)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
        logging.getLogger("threelc").addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def residuals(state) -> dict:
    """A state's worker residual tensors by bucket index."""
    return {index: entry["worker"] for index, entry in state.state_dict()["residuals"].items()}


def flat_parameters(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def data(seed: int, count: int = 64, features: int = 16):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=generator)
    targets = (inputs @ torch.randn(features, 1, generator=generator)).squeeze(1)
    return inputs, targets


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def loader(rank: int):
    inputs, targets = data(seed=rank)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8)


# ---------------------------------------------------------------------------- Lightning
def lightning_run(rank, world_size, folder):
    """Lightning's own comm-hook arguments on CPU (must warn), then ThreeLCStrategy: fit, save,
    and a fresh Trainer that resumes the checkpoint."""
    framework_environment(rank, world_size)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from threelc.hooks import ThreeLCState, threelc_hook
    from threelc.integrations import ThreeLCStrategy

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_model()

        def training_step(self, batch, index):
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs).squeeze(1), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def fit(strategy, steps, ckpt_path=None, callbacks=()):
        trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=steps, logger=False,
                            callbacks=list(callbacks), enable_checkpointing=any(
                                isinstance(callback, L.pytorch.callbacks.ModelCheckpoint) for callback in callbacks),
                            enable_progress_bar=False, enable_model_summary=False)
        module = Regression()
        trainer.fit(module, loader(rank), ckpt_path=ckpt_path)
        return trainer, module

    result = {}
    # The case: Lightning registers comm hooks on CUDA only, so this state never runs.
    counter = WarningCounter()
    fit(DDPStrategy(ddp_comm_state=ThreeLCState(**OPTIONS), ddp_comm_hook=threelc_hook), 2)
    result["plain_warnings"] = counter.messages
    counter = WarningCounter()

    # Checkpoints every 2 steps, only the latest kept (older ones and their hook files rotate out),
    # and last.ckpt a symbolic link to it.
    strategy = ThreeLCStrategy(hook_options=OPTIONS)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=1,
                                                      save_last="link")
    trainer, module = fit(strategy, STEPS, callbacks=[checkpoints])
    checkpoint = os.path.join(folder, "last.ckpt")
    result.update(stats=strategy.threelc_state.stats()["total"], parameters=flat_parameters(module),
                  saved=residuals(strategy.threelc_state), files=sorted(os.listdir(folder)))

    resumed, loaded = ThreeLCStrategy(hook_options=OPTIONS), {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):  # after the checkpoint's hook state was loaded
            loaded.update(residuals=residuals(resumed.threelc_state), iteration=resumed.threelc_state.iteration)

    _, module = fit(resumed, 2 * STEPS, ckpt_path=checkpoint, callbacks=[Capture()])
    result.update(loaded=loaded, resumed_stats=resumed.threelc_state.stats()["total"],
                  resumed_parameters=flat_parameters(module), warnings=counter.messages)
    return result


# ---------------------------------------------------------------------------- Accelerate
def accelerate_run(rank, world_size, folder):
    """register_accelerate: train, save_state, then fresh objects that load_state and train on."""
    framework_environment(rank, world_size)
    from accelerate import Accelerator

    from threelc.integrations import register_accelerate

    counter = WarningCounter()

    def train(resume):
        accelerator = Accelerator(cpu=True)
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, optimizer, batches = accelerator.prepare(model, optimizer, loader(rank))
        state = register_accelerate(accelerator, model, **OPTIONS)
        loaded = None
        if resume:
            accelerator.load_state(folder)
            loaded = residuals(state)
        for _, (inputs, targets) in zip(range(STEPS), batches):
            optimizer.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(inputs).squeeze(1), targets))
            optimizer.step()
        if not resume:
            accelerator.save_state(folder)
        return state, model, loaded

    state, model, _ = train(resume=False)
    result = {"stats": state.stats()["total"], "parameters": flat_parameters(model), "saved": residuals(state)}
    state, model, loaded = train(resume=True)
    result.update(loaded=loaded, resumed_stats=state.stats()["total"], resumed_parameters=flat_parameters(model),
                  files=sorted(os.listdir(folder)), warnings=counter.messages)
    return result


# ---------------------------------------------------------------------------- Hugging Face Trainer
TRAINER_STEPS, TRAINER_SAVE_AT = 8, 4


class _Regression(torch.nn.Module):
    """The Trainer's model contract: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = small_model()

    def forward(self, inputs, labels=None):
        prediction = self.net(inputs).squeeze(1)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels), "logits": prediction}


def transformers_run(rank, world_size, folder):
    """ThreeLCCallback: TRAINER_STEPS steps saving at TRAINER_SAVE_AT, then a fresh Trainer that
    resumes from that checkpoint and must end bitwise where the uninterrupted run ended."""
    framework_environment(rank, world_size)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from threelc.integrations import ThreeLCCallback

    counter = WarningCounter()
    inputs, targets = data(seed=0, count=128)
    dataset = [{"inputs": x, "labels": y} for x, y in zip(inputs, targets)]

    def train(resume_from_checkpoint):
        args = TrainingArguments(output_dir=folder, use_cpu=True, max_steps=TRAINER_STEPS, save_steps=TRAINER_SAVE_AT,
                                 per_device_train_batch_size=8, learning_rate=0.05, logging_steps=2, report_to="none",
                                 seed=0, ddp_backend="gloo", disable_tqdm=True)
        model = _Regression()
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        callback = ThreeLCCallback(trainer, **OPTIONS)
        trainer.add_callback(callback)
        loaded = {}

        class Capture(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # called after ThreeLCCallback's
                loaded.update(residuals=residuals(callback.threelc_state), iteration=callback.threelc_state.iteration)

        trainer.add_callback(Capture())
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return callback.threelc_state, model, loaded

    state, model, _ = train(None)
    checkpoint = os.path.join(folder, f"checkpoint-{TRAINER_SAVE_AT}")
    saved = torch.load(os.path.join(checkpoint, f"threelc-rank{rank}.pt"), weights_only=True)
    result = {"stats": state.stats()["total"], "parameters": flat_parameters(model),
              "saved": {index: entry["worker"] for index, entry in saved["residuals"].items()},
              "files": sorted(os.listdir(checkpoint))}
    state, model, loaded = train(checkpoint)
    result.update(loaded=loaded, resumed_stats=state.stats()["total"], resumed_parameters=flat_parameters(model),
                  warnings=counter.messages)
    return result
