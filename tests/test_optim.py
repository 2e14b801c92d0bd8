"""threelc.optim.AdamW paired with the hook: schedule, update rule, replicas, checkpoints, errors.

The multi-process tests run real gloo ranks (tests/_dist.py).  Bitwise promises: before the
freeze the optimizer is torch.optim.AdamW (compared against torch's own, under the same hook with
compression off); replicas stay identical; a resumed run equals an uninterrupted one.
"""

import os

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import threelc.optim
from threelc.hooks import register
from threelc.hooks.optim import UnpairedOptimizerError

from _dist import run_ranks

FREEZE = 4  # full precision for steps 0-3, compressed 4-7, refresh at 8, compressed 9-...
STEPS = 12
HOOK_OPTIONS = {"min_numel": 16, "scale": "tensor"}


class Net(nn.Module):
    """Two layers in two param groups, plus a parameter that never gets a gradient."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.first = nn.Linear(16, 64).to(dtype)
        self.second = nn.Linear(64, 4).to(dtype)
        self.unused = nn.Parameter(torch.ones(32, dtype=dtype))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _groups(model, lr=1e-2):
    return [{"params": model.first.parameters(), "lr": lr, "weight_decay": 0.1},
            {"params": [*model.second.parameters(), model.unused], "lr": lr / 2, "weight_decay": 0.0}]


def _batch(rank, step, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=generator).to(dtype)


def _step(ddp, optimizer, rank, step, clip=True, scaler=None, poison=False):
    optimizer.zero_grad()
    loss = ddp(_batch(rank, step, next(ddp.parameters()).dtype)).float().pow(2).mean()
    if poison:
        loss = loss * float("inf")
    if scaler is None:
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()


def _flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _paired(dtype=torch.float32, seed=0, **options):
    torch.manual_seed(seed)
    model = Net(dtype)
    ddp = DDP(model, find_unused_parameters=True)
    optimizer = threelc.optim.AdamW(_groups(model), freeze_step=options.pop("freeze_step", FREEZE), **options)
    state = register(ddp, optimizer=optimizer, **HOOK_OPTIONS)
    return model, ddp, optimizer, state


# ---------------------------------------------------------------------------- single process
def test_schedule_is_a_pure_function_of_the_step():
    doubling = threelc.optim.AdamW([nn.Parameter(torch.zeros(1))], freeze_step=10)
    none = threelc.optim.AdamW([nn.Parameter(torch.zeros(1))], freeze_step=10, refresh="none")
    full = [step for step in range(200) if doubling.full_precision(step)]
    assert full == [*range(10), 20, 40, 80, 160]
    assert [step for step in range(200) if none.full_precision(step)] == list(range(10))
    assert doubling.full_precision() is True  # the coming step: 0


@pytest.mark.parametrize("arguments, message", [
    ({"freeze_step": 1}, "freeze_step"), ({"freeze_step": 2.5}, "freeze_step"), ({"freeze_step": True}, "freeze_step"),
    ({"refresh": "sometimes"}, "refresh"), ({"compress": "weights"}, "compress"), ({"amsgrad": True}, "amsgrad"),
    ({"fused": True}, "fused"), ({"lr": -1.0}, "learning rate"),
    ({"betas": (0.9, 1.5)}, "beta"), ({"embedding_scale": "token"}, "embedding_scale"),
    ({"transpose_conv1d": 1}, "transpose_conv1d"), ({"floor_variance": 1}, "floor_variance"),
    ({"floor_variance": "persistent"}, "floor_variance"), ({"floor_variance": "Transient"}, "floor_variance"),
    ({"floor_variance": None}, "floor_variance"), ({"floor_variance": "Carry"}, "floor_variance"),
    ({"floor_variance": ["carry"]}, "floor_variance"),
    ({"block_sizes": [("*", 4)]}, "block_sizes"), ({"block_sizes": {"*": 0}}, "block_sizes"),
    ({"block_sizes": {"*": True}}, "block_sizes"), ({"block_sizes": {"": 4}}, "block_sizes"),
    ({"block_sizes": {"*": 2**32}}, "block_sizes"),
])
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        threelc.optim.AdamW([nn.Parameter(torch.zeros(1))], **arguments)


def test_unpaired_optimizer_refuses_to_step():
    parameter = nn.Parameter(torch.ones(3))
    optimizer = threelc.optim.AdamW([parameter])
    parameter.grad = torch.ones(3)
    with pytest.raises(UnpairedOptimizerError, match="register"):
        optimizer.step()
    assert torch.equal(parameter, torch.ones(3))


def _frozen_rule_run(refresh_every_step):
    torch.manual_seed(0)
    model = Net()
    # compress="gradient": the optimizer is driven alone with raw gradients (under "momentum" the
    # hook would have turned them into each rank's momentum first).
    ours = threelc.optim.AdamW(_groups(model), freeze_step=2, compress="gradient")
    ours.hook_state = "a stand-in: this test drives the optimizer alone"
    if refresh_every_step:
        ours.full_precision = lambda step=None: True
    reference_model = Net()
    reference_model.load_state_dict(model.state_dict())
    reference = torch.optim.AdamW(_groups(reference_model))
    for step in range(20):
        for net, optimizer in ((model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            net(_batch(0, step)).pow(2).mean().backward()
            optimizer.step()
    return model, reference_model, ours


def test_refresh_every_step_is_adamw():
    """After the freeze, a refresh on every step (n = 1) is AdamW's rule: equal to float32 rounding."""
    model, reference_model, _ = _frozen_rule_run(refresh_every_step=True)
    torch.testing.assert_close(_flat(model), _flat(reference_model), rtol=1e-5, atol=1e-6)


def test_frozen_steps_keep_the_second_moment():
    model, reference_model, ours = _frozen_rule_run(refresh_every_step=False)
    assert not torch.allclose(_flat(model), _flat(reference_model))  # the frozen rule is a different rule
    state = ours.state[model.first.weight]
    # v's last update: the refresh at 0-based step 16 (freeze_step 2 * 2**3), its 17th update.
    assert state["variance_step"] == 17 and int(state["step"]) == 20
    assert "exp_avg" not in ours.state.get(model.unused, {})  # no gradient, no state, as torch


class Tied(nn.Module):
    """A byte language model in miniature: an embedding table shared with the output layer."""

    def __init__(self, rows=8, width=4):
        super().__init__()
        self.embed = nn.Embedding(rows, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, rows, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_embedding_rows_get_their_own_scales():
    model = Tied()
    rows = threelc.optim.AdamW(model.parameters(), embedding_scale="row")
    rows.bind_module(model)
    parameters = [model.mix.weight, model.embed.weight, model.mix.bias]
    assert rows.scale_segments(parameters, (16, 32, 4)) == (16, *[4] * 8, 4)  # the tied table: 8 rows of 4
    assert rows.scale_segments(parameters, (16, 32, 4, 3)) == (16, *[4] * 8, 4, 3)  # DDP's padding stays whole
    blocks = threelc.optim.AdamW(model.parameters())  # the default
    blocks.bind_module(model)
    assert blocks.scale_segments(parameters, (16, 32, 4)) == (16, 32, 4)
    assert "embedding_scale=row" in rows.schedule_text() and rows.state_dict()["threelc"]["embedding_scale"] == "row"


def test_block_sizes_split_the_named_parameters():
    model = Tied()
    optimizer = threelc.optim.AdamW(model.parameters(), block_sizes={"mix.weight": 5, "mix.*": 3})
    optimizer.bind_module(model)
    parameters = [model.mix.weight, model.embed.weight, model.mix.bias]
    # mix.weight: pieces of 5 (the first pattern wins), the rest alone; mix.bias: pieces of 3; the table whole.
    assert optimizer.scale_segments(parameters, (16, 32, 4)) == (5, 5, 5, 1, 32, 3, 1)
    assert "block_sizes={'mix.weight': 5, 'mix.*': 3}" in optimizer.schedule_text()
    assert optimizer.state_dict()["threelc"]["block_sizes"] == {"mix.weight": 5, "mix.*": 3}
    for options, message in (({"block_sizes": {"mix.weight": 5, "head.*": 3}}, "head"),  # tied: named embed.weight
                             ({"block_sizes": {"mix.*": 5, "mix.bias": 3}}, "mix.bias"),  # shadowed by mix.*
                             ({"block_sizes": {"embed.weight": 4}, "embedding_scale": "row"}, "embedding_scale")):
        with pytest.raises(ValueError, match=message):
            threelc.optim.AdamW(model.parameters(), **options).bind_module(model)


def test_floor_variance_bounds_each_step_by_lr():
    """A gradient that grows ten thousandfold after the freeze: the frozen v alone lets the step
    grow with it; with the floor no step exceeds lr (weight decay off)."""
    largest = {}
    for floor_variance in (False, True, "transient"):
        parameter = nn.Parameter(torch.zeros(3))
        optimizer = threelc.optim.AdamW([parameter], lr=1e-3, weight_decay=0.0, freeze_step=2, refresh="none",
                                        floor_variance=floor_variance, compress="gradient")  # raw gradients
        optimizer.hook_state = "a stand-in: this test drives the optimizer alone"
        steps = []
        for step in range(8):
            parameter.grad = torch.full((3,), 1e-4 if step < 2 else 1.0)
            before = parameter.detach().clone()
            optimizer.step()
            steps.append(float((parameter.detach() - before).abs().max()))
        largest[floor_variance] = max(steps[2:])
        assert steps[:2] == pytest.approx([1e-3, 1e-3], rel=1e-3)  # the warm-up is AdamW either way
    assert largest[False] > 100 * 1e-3 and largest[True] <= 1e-3 * (1 + 1e-5)
    assert largest["transient"] <= 1e-3 * (1 + 1e-5)


def _frozen_after_warmup(floor_variance, lr: float, eps: float) -> tuple:
    """A float64 parameter of 2 values and its optimizer (driven alone), after a 2-step warm-up of
    gradient 1 that freezes v there (v_hat = 1)."""
    parameter = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = threelc.optim.AdamW([parameter], lr=lr, eps=eps, weight_decay=0.0, freeze_step=2,
                                    refresh="none", floor_variance=floor_variance, compress="gradient")  # raw gradients
    optimizer.hook_state = "a stand-in: this test drives the optimizer alone"
    for step in range(2):
        parameter.grad = torch.ones(2, dtype=torch.float64)
        optimizer.step()
    return parameter, optimizer


def test_transient_floor_caps_the_step_and_leaves_v_alone():
    """Crafted: v frozen at the warm-up's gradient 1; after the freeze coordinate 0 gets 100 (the
    cap binds), coordinate 1 gets 1 (it does not).  Each compressed step is
    m_hat / max(sqrt(v_hat) + eps, |m_hat|) * lr, v stays as frozen; the persistent floor raises it."""
    lr, eps, (beta1, beta2) = 1e-2, 1e-8, (0.9, 0.999)
    stored = {}
    for floor_variance in ("transient", True):
        parameter, optimizer = _frozen_after_warmup(floor_variance, lr, eps)
        frozen = optimizer.state[parameter]["exp_avg_sq"].clone()
        m = optimizer.state[parameter]["exp_avg"].clone()
        for step in range(2, 6):
            grad = torch.tensor([100.0, 1.0], dtype=torch.float64)
            parameter.grad = grad.clone()
            before = parameter.detach().clone()
            optimizer.step()
            m = beta1 * m + (1 - beta1) * grad
            m_hat = m / (1 - beta1 ** (step + 1))
            denominator = (frozen / (1 - beta2 ** 2)).sqrt() + eps
            expected = before - lr * m_hat / torch.maximum(denominator, m_hat.abs())
            if floor_variance == "transient":
                torch.testing.assert_close(parameter.detach(), expected, rtol=1e-12, atol=0)
                assert float(before[0] - parameter.detach()[0]) == pytest.approx(lr, rel=1e-12)  # capped at lr
                assert float(before[1] - parameter.detach()[1]) < lr  # not capped: the frozen v's step
        stored[floor_variance] = optimizer.state[parameter]["exp_avg_sq"]
        if floor_variance == "transient":
            assert torch.equal(stored[floor_variance], frozen)
    assert stored[True][0] > 1000 * stored["transient"][0]  # the persistent floor raised v; the transient did not


def test_carry_caps_each_step_at_lr_and_loses_nothing():
    """Crafted, float64: v frozen at the warm-up's gradient 1 (v_hat = 1); then coordinate 0 gets
    one lump of 30 and zeros after it, coordinate 1 gets 1 throughout; the lr halves halfway (a
    scheduler).  By hand, each compressed step's uncapped displacement is u = -lr m_hat / (1 + eps);
    under "carry" no step moves a coordinate more than that step's lr, the applied steps plus the
    carry equal the sum of u at every step, and once u falls below lr the carry drains to exactly
    0: the whole uncapped displacement arrives.  "transient" caps the same steps and loses the excess."""
    lr, eps, (beta1, beta2) = 1e-2, 1e-8, (0.9, 0.999)
    totals = {}
    for floor_variance in ("carry", "transient"):
        parameter, optimizer = _frozen_after_warmup(floor_variance, lr, eps)
        m, start = optimizer.state[parameter]["exp_avg"].clone(), parameter.detach().clone()
        uncapped, carried_steps = torch.zeros(2, dtype=torch.float64), 0
        for step in range(2, 100):
            step_lr = lr if step < 30 else lr / 2
            optimizer.param_groups[0]["lr"] = step_lr
            grad = torch.tensor([30.0 if step == 2 else 0.0, 1.0], dtype=torch.float64)
            parameter.grad = grad.clone()
            before = parameter.detach().clone()
            optimizer.step()
            m = beta1 * m + (1 - beta1) * grad
            u = -step_lr * (m / (1 - beta1 ** (step + 1))) / (1 + eps)
            uncapped += u
            applied = parameter.detach() - before
            assert float(applied.abs().max()) <= step_lr * (1 + 1e-12)  # no step exceeds this step's lr
            if floor_variance == "carry":
                carry = optimizer.state[parameter]["step_carry"]
                torch.testing.assert_close(parameter.detach() - start + carry, uncapped, rtol=1e-12, atol=1e-15)
                assert float(carry[1]) == 0.0 and float(applied[1]) == pytest.approx(float(u[1]), rel=1e-12)
                carried_steps += float(carry[0]) != 0.0
        totals[floor_variance] = parameter.detach() - start
        if floor_variance == "carry":
            assert carried_steps > 20 and float(optimizer.state[parameter]["step_carry"].abs().max()) == 0.0
            torch.testing.assert_close(totals["carry"], uncapped, rtol=1e-12, atol=0)  # nothing lost
    assert float(uncapped[0]) < -25 * lr  # the lump's displacement (~59 lr) arrives over ~90 steps
    assert float(totals["transient"][0]) > float(uncapped[0]) + 30 * lr  # the transient cap dropped ~38 lr of it


# ---------------------------------------------------------------------------- gloo ranks
def matches_torch_before_the_freeze(rank, world_size):
    """Per step: parameters under threelc.optim.AdamW and under torch.optim.AdamW (same hook, compression off)."""
    model, ddp, optimizer, state = _paired()
    torch.manual_seed(0)
    reference_model = Net()
    reference_ddp = DDP(reference_model, find_unused_parameters=True)
    reference = torch.optim.AdamW(_groups(reference_model))
    register(reference_ddp, start_iter=10**6, **HOOK_OPTIONS)  # allreduce every step
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)) for opt in (optimizer, reference)]
    same, compressed = [], []
    for step in range(STEPS):
        _step(ddp, optimizer, rank, step)
        _step(reference_ddp, reference, rank, step)
        for scheduler in schedulers:
            scheduler.step()
        same.append(torch.equal(_flat(model), _flat(reference_model)))
        compressed.append(state.stats()["step"]["compressed"])
    return same, compressed, _flat(model), optimizer.steps


@pytest.mark.parametrize("world_size", [2, 4])
def test_bitwise_adamw_before_the_freeze_and_identical_replicas(world_size):
    results = run_ranks(matches_torch_before_the_freeze, world_size, timeout_s=300)
    for same, compressed, parameters, steps in results:
        assert same[:FREEZE] == [True] * FREEZE and not any(same[FREEZE:])
        assert compressed == [not threelc.optim.AdamW([nn.Parameter(torch.zeros(1))], freeze_step=FREEZE)
                              .full_precision(step) for step in range(STEPS)]
        assert compressed[FREEZE] and not compressed[2 * FREEZE]  # the freeze step compresses; a refresh does not
        assert steps == STEPS and torch.isfinite(parameters).all()
        assert torch.equal(parameters, results[0][2])


def half_precision_and_momentum(rank, world_size):
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        for compress in ("gradient", "momentum", "preconditioned", "update"):
            # eps 1e-8 is 0 in float16, and torch's own AdamW then turns float16 weights into NaN.
            model, ddp, optimizer, state = _paired(dtype, compress=compress, eps=1e-4)
            compressed = 0
            for step in range(STEPS):
                _step(ddp, optimizer, rank, step)
                compressed += state.stats()["step"]["compressed"]
            out[(str(dtype), compress)] = (_flat(model), compressed)
    return out


def test_half_precision_buckets_and_momentum_compression():
    results = run_ranks(half_precision_and_momentum, 2, timeout_s=300)
    for key, (parameters, compressed_steps) in results[0].items():
        assert torch.isfinite(parameters).all(), key
        assert compressed_steps == STEPS - FREEZE - 1, key
        assert torch.equal(parameters, results[1][key][0]), key
    assert not torch.equal(results[0][("torch.bfloat16", "gradient")][0], results[0][("torch.bfloat16", "momentum")][0])


def exact_exchange(rank, world_size):
    """Every bucket allreduced (min_numel above the model) on the optimizer's schedule: what each
    compress mode sends, averaged exactly, must give the same steps."""
    out = {}
    for compress in ("gradient", "momentum", "preconditioned", "update"):
        torch.manual_seed(0)
        model = Net()
        ddp = DDP(model, find_unused_parameters=True)
        optimizer = threelc.optim.AdamW(_groups(model), freeze_step=FREEZE, compress=compress)
        register(ddp, optimizer=optimizer, min_numel=10**9)
        for step in range(STEPS):
            _step(ddp, optimizer, rank, step, clip=False)
        out[compress] = _flat(model)
    return out


def test_compress_modes_agree_when_the_exchange_is_exact():
    results = run_ranks(exact_exchange, 2, timeout_s=300)
    for compress in ("momentum", "preconditioned", "update"):
        torch.testing.assert_close(results[0][compress], results[0]["gradient"], rtol=1e-5, atol=1e-6)


def maximized_and_negated(rank, world_size, compress):
    """The run with maximize=True on ``-loss`` and the run with maximize=False on ``loss``."""
    out = []
    for maximize in (True, False):
        model, ddp, optimizer, state = _paired(compress=compress, maximize=maximize)
        for step in range(STEPS):
            optimizer.zero_grad()
            loss = ddp(_batch(rank, step)).pow(2).mean()
            (-loss if maximize else loss).backward()
            optimizer.step()
        out.append((_flat(model), state.stats()["step"]["compressed"]))
    return out


@pytest.mark.parametrize("compress", ["momentum", "update", "gradient"])
def test_maximize_is_minimizing_the_negated_loss_bit_for_bit(compress):
    """Under momentum compression the hook sends each rank's momentum of -g when maximizing."""
    for (maximized, compressed), (minimized, _) in run_ranks(maximized_and_negated, 2, compress, timeout_s=300):
        assert compressed and torch.equal(maximized, minimized)


def grad_scaler_skips(rank, world_size):
    model, ddp, optimizer, state = _paired()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(STEPS):
        # rank 0 alone overflows in a full-precision step (1) and in a compressed one (6)
        _step(ddp, optimizer, rank, step, scaler=scaler, poison=(rank == 0 and step in (1, 6)))
    return optimizer.steps, state.iteration, _flat(model)


def test_grad_scaler_skips_keep_every_rank_on_one_schedule():
    results = run_ranks(grad_scaler_skips, 2, timeout_s=300)
    for steps, iterations, parameters in results:
        assert (steps, iterations) == (STEPS - 2, STEPS)
        assert torch.isfinite(parameters).all() and torch.equal(parameters, results[0][2])


def floored_run(rank, world_size):
    """Per step: whether v_hat >= m_hat**2 holds for every parameter (to float32 rounding)."""
    model, ddp, optimizer, state = _paired(floor_variance=True)
    holds = []
    for step in range(STEPS):
        _step(ddp, optimizer, rank, step)
        bounded = []
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                entry = optimizer.state.get(parameter, {})
                if "exp_avg" in entry:
                    m_hat = entry["exp_avg"] / (1 - beta1 ** int(entry["step"]))
                    v_hat = entry["exp_avg_sq"] / (1 - beta2 ** entry.get("variance_step", int(entry["step"])))
                    bounded.append(bool((v_hat >= m_hat.square() * (1 - 1e-6)).all()))
        holds.append(all(bounded))
    return holds, _flat(model)


@pytest.mark.parametrize("world_size", [2, 4])
def test_floor_variance_keeps_v_above_the_momentum_and_replicas_identical(world_size):
    results = run_ranks(floored_run, world_size, timeout_s=300)
    for holds, parameters in results:
        compressed_steps = [step for step in range(STEPS) if not threelc.optim.AdamW(
            [nn.Parameter(torch.zeros(1))], freeze_step=FREEZE).full_precision(step)]
        assert compressed_steps and all(holds[step] for step in compressed_steps)
        assert not all(holds[:FREEZE])  # AdamW's own v (the warm-up) does not keep it: the floor does the work
        assert torch.isfinite(parameters).all() and torch.equal(parameters, results[0][1])


def bounded_step_run(rank, world_size, mode):
    """Per compressed step, against ``mode``'s formula from the step's own inputs (``w`` the weights
    after weight decay, ``u = -lr m_hat / (sqrt(v_hat) + eps)``): "transient" moves ``w`` by
    ``-lr m_hat / max(sqrt(v_hat) + eps, |m_hat|)``; "carry" by ``clamp(c + u, -lr, lr)`` and keeps
    ``c + u`` minus that as the carry ``c``.  Returns the largest differences of the parameters
    (and carries), whether v kept its value, and how many plain steps were over 2 lr (the bound bound)."""
    # compress="gradient": the formula below updates m from the averaged gradient.
    model, ddp, optimizer, state = _paired(floor_variance=mode, compress="gradient")
    differences, kept, capped = [], [], 0
    for step in range(STEPS):
        compressed = not optimizer.full_precision()
        optimizer.zero_grad()
        ddp(_batch(rank, step)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        before = {parameter: (parameter.detach().clone(), {key: value.clone() for key, value in entry.items()
                                                           if torch.is_tensor(value)},
                                         entry.get("variance_step", int(entry["step"])))
                  for parameter, entry in optimizer.state.items()}
        optimizer.step()
        if not compressed:
            continue
        for group in optimizer.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                weights, moments, variance_step = before[parameter]
                m_hat = moments["exp_avg"].lerp(parameter.grad, 1 - beta1) / (1 - beta1 ** (int(moments["step"]) + 1))
                denominator = (moments["exp_avg_sq"] / (1 - beta2 ** variance_step)).sqrt() + eps
                decayed = weights * (1 - lr * group["weight_decay"])
                if mode == "transient":
                    expected = decayed - lr * m_hat / torch.maximum(denominator, m_hat.abs())
                else:
                    total = moments.get("step_carry", torch.zeros_like(weights)) - lr * m_hat / denominator
                    expected = decayed + total.clamp(-lr, lr)
                    carry = optimizer.state[parameter]["step_carry"]
                    differences.append(float((total - total.clamp(-lr, lr) - carry).abs().max()))
                differences.append(float((expected - parameter.detach()).abs().max()))
                kept.append(torch.equal(optimizer.state[parameter]["exp_avg_sq"], moments["exp_avg_sq"]))
                capped += int((m_hat.abs() > 2 * denominator).sum())  # the plain step would be over 2 lr
    return differences, kept, capped, _flat(model)


@pytest.mark.parametrize("mode", ["transient", "carry"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_step_bounds_follow_their_formula_and_replicas_identical(world_size, mode):
    results = run_ranks(bounded_step_run, world_size, mode, timeout_s=300)
    for differences, kept, capped, parameters in results:
        assert differences and max(differences) < 1e-6  # float32 rounding of lr * (a ratio <= 1)
        assert all(kept)  # v is never raised
        assert capped > 0  # the cap did bind, by far: the formula is not the plain frozen-v step
        assert torch.isfinite(parameters).all() and torch.equal(parameters, results[0][3])


def different_freeze_steps(rank, world_size):
    model, ddp, optimizer, state = _paired(freeze_step=FREEZE + rank)
    try:
        _step(ddp, optimizer, rank, 0)
    except Exception as error:  # DDP may wrap the hook's error
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_ranks_with_different_freeze_steps_fail_clearly():
    for message in run_ranks(different_freeze_steps, 2, timeout_s=120):
        assert "different configurations" in message and "freeze_step=4" in message and "freeze_step=5" in message


def bad_pairings(rank, world_size):
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, find_unused_parameters=True)
    errors = []
    for optimizer in (torch.optim.AdamW(model.parameters()), threelc.optim.AdamW(Net().parameters()), "adam"):
        try:
            register(ddp, optimizer=optimizer)
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    paired = threelc.optim.AdamW(model.parameters())
    register(ddp, optimizer=paired)
    try:
        register(DDP(model, find_unused_parameters=True), optimizer=paired)
        errors.append(None)
    except ValueError as error:
        errors.append(str(error))
    return errors


def test_bad_pairings_raise_value_error():
    torch_adamw, foreign, text, twice = run_ranks(bad_pairings, 1, timeout_s=120)[0]
    assert "threelc.optim.AdamW" in torch_adamw and "torch.optim.adamw.AdamW" in torch_adamw
    assert "not the DDP model's" in foreign
    assert "threelc.optim.AdamW" in text
    assert "already paired" in twice


def framework_wrappers(rank, world_size):
    """Accelerate (and the HF Trainer) hand out ``.optimizer`` wrappers, Lightning ``._optimizer``
    ones; Lightning builds its optimizer after the hook is registered, so it pairs later."""
    import types

    from threelc.hooks import optim

    torch.manual_seed(0)
    results = []
    for wrap in (lambda opt: types.SimpleNamespace(optimizer=opt), lambda opt: types.SimpleNamespace(_optimizer=opt)):
        model = Net()
        ddp = DDP(model, find_unused_parameters=True)
        inner = threelc.optim.AdamW(model.parameters())
        state = register(ddp, optimizer=wrap(inner))
        results.append(state.optimizer is inner and inner.hook_state is state)
    model = Net()
    ddp = DDP(model, find_unused_parameters=True)
    state = register(ddp)  # registered first, as Lightning's configure_ddp does
    inner = threelc.optim.AdamW(model.parameters())
    optim.pair(state, wrap(inner), ddp.module)
    _step(ddp, inner, rank, 0)  # a paired optimizer steps
    results.append(state.optimizer is inner and inner.hook_state is state)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    results.append(optim.unwrap(types.SimpleNamespace(optimizer=plain)) is plain)  # then check_pairing refuses it
    return results


def test_framework_wrappers_and_late_pairing():
    assert run_ranks(framework_wrappers, 1, timeout_s=120)[0] == [True, True, True, True]


TOTAL, STOP_AT = 14, 7  # the stop falls between the freeze (4) and the refresh (8)


def first_half_and_uninterrupted(rank, world_size, folder, options):
    model, ddp, optimizer, state = _paired(**options)
    for step in range(TOTAL):
        _step(ddp, optimizer, rank, step)
    reference = _flat(model)
    model, ddp, optimizer, state = _paired(**options)
    for step in range(STOP_AT):
        _step(ddp, optimizer, rank, step)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict()},
               os.path.join(folder, f"rank{rank}.pt"))
    return reference


def resume(rank, world_size, folder, options):
    checkpoint = torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False)
    torch.manual_seed(123)  # a fresh process with other random weights: everything comes from the checkpoint
    model = Net()
    model.load_state_dict(checkpoint["model"])
    optimizer = threelc.optim.AdamW(_groups(model), freeze_step=FREEZE, **options)
    optimizer.load_state_dict(checkpoint["optimizer"])
    ddp = DDP(model, find_unused_parameters=True)
    state = register(ddp, optimizer=optimizer, **HOOK_OPTIONS)
    state.load_state_dict(checkpoint["hook"])
    assert optimizer.steps == STOP_AT and state.iteration == STOP_AT
    for step in range(STOP_AT, TOTAL):
        _step(ddp, optimizer, rank, step)
    return _flat(model)


@pytest.mark.parametrize("options", [{}, {"floor_variance": True, "block_sizes": {"first.weight": 100}},
                                     {"floor_variance": "transient"}, {"floor_variance": "carry"}])
def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path, options):
    references = run_ranks(first_half_and_uninterrupted, 2, str(tmp_path), options, timeout_s=300)
    if options.get("floor_variance") == "carry":  # the checkpoint holds a carry that the resumed run must use
        saved = torch.load(tmp_path / "rank0.pt", weights_only=False)["optimizer"]["state"].values()
        assert any(bool(entry["step_carry"].any()) for entry in saved if "step_carry" in entry)
    resumed = run_ranks(resume, 2, str(tmp_path), options, timeout_s=300)
    for rank in range(2):
        assert torch.equal(resumed[rank], references[rank])
    assert torch.equal(references[0], references[1])


def test_loading_a_state_compressed_under_another_mode_raises():
    """A state saved after compressed steps under compress="gradient" (the default before the
    ninth session) must not resume under "momentum": the hook's residuals are gradient owed, which
    momentum compression would feed back ten times over.  Before the freeze no residual exists."""
    def saved(compress, steps):
        optimizer = threelc.optim.AdamW([nn.Parameter(torch.zeros(3))], freeze_step=2, compress=compress)
        optimizer.steps = steps
        return optimizer.state_dict()

    fresh = threelc.optim.AdamW([nn.Parameter(torch.zeros(3))], freeze_step=2)  # compress="momentum"
    with pytest.raises(ValueError, match="compress='gradient' to resume"):
        fresh.load_state_dict(saved("gradient", 5))
    assert fresh.steps == 0 and not fresh.state  # refused before anything was loaded
    fresh.load_state_dict(saved("gradient", 2))  # still in the warm-up: nothing compressed, nothing owed
    assert fresh.steps == 2
    same = threelc.optim.AdamW([nn.Parameter(torch.zeros(3))], freeze_step=2, compress="gradient")
    same.load_state_dict(saved("gradient", 5))
    assert same.steps == 5


def test_a_refresh_after_a_long_gap_keeps_half_of_v():
    """beta2**n -> 0 would let one minibatch replace v; a zero gradient then would zero it."""
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = threelc.optim.AdamW([parameter], betas=(0.9, 0.5), weight_decay=0.0, freeze_step=2,
                                    compress="gradient")  # driven alone with raw gradients
    optimizer.hook_state = "a stand-in: this test drives the optimizer alone"
    for step in range(5):  # full, full, compressed, compressed, refresh (step 4 = 2 * 2)
        if step == 4:
            before = optimizer.state[parameter]["exp_avg_sq"].clone()
        parameter.grad = torch.zeros(3) if step == 4 else torch.ones(3)
        optimizer.step()
    state = optimizer.state[parameter]
    assert state["variance_step"] == 5  # 0.5**3 = 0.125 < the floor of 0.5
    torch.testing.assert_close(state["exp_avg_sq"], before * 0.5, rtol=0, atol=0)


def rare_token_gradient(rank, world_size, options):
    """One compressed step of a tied embedding whose row 0 (a frequent token) gets a gradient a
    hundred times row 1's (a rare one): the decoded mean of row 1, and the replicas' weights."""
    torch.manual_seed(0)
    model = Tied(rows=8, width=128)
    ddp = DDP(model)
    optimizer = threelc.optim.AdamW(model.parameters(), freeze_step=2, **options)
    register(ddp, optimizer=optimizer, min_numel=16)
    tokens = torch.tensor([[0] * 100 + [1]])
    for _ in range(3):  # full, full, compressed
        optimizer.zero_grad()
        ddp(tokens).sum().backward()
        rare = model.embed.weight.grad[1].clone()
        optimizer.step()
    return rare, _flat(model)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_rare_tokens_row_is_not_silenced_by_a_frequent_one(world_size):
    """With one scale per row (embedding_scale="row", or block_sizes of one row) the rare row
    reaches the mean on the first compressed step; in a block shared with the frequent row it
    stays in the residual (all zero)."""
    for options, delivered in (({"embedding_scale": "row"}, True), ({"block_sizes": {"embed.weight": 128}}, True),
                               ({"embedding_scale": "block"}, False)):
        results = run_ranks(rare_token_gradient, world_size, options, timeout_s=300)
        for rare, parameters in results:
            assert bool(rare.abs().sum() > 0) == delivered, options
            assert torch.equal(parameters, results[0][1])


def fused_projection_gradient(rank, world_size, transpose_conv1d):
    """One compressed step of a transformers Conv1D (weight [in, out]) whose first output columns
    (a query's) get gradients a hundred times smaller than its last ones (a value's), alternating
    in sign column by column: the decoded mean gradient of the weight."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    projection = Conv1D(24, 64)  # nf=24 outputs (query, key, value columns of 8), nx=64 inputs
    ddp = DDP(projection)
    optimizer = threelc.optim.AdamW(projection.parameters(), freeze_step=2, transpose_conv1d=transpose_conv1d)
    register(ddp, optimizer=optimizer, min_numel=16, block_size=64)
    sign = torch.tensor([1.0, -1.0]).repeat(12)
    column_weight = torch.cat([torch.full((16,), 0.01), torch.ones(8)]) * sign
    for _ in range(3):  # full, full, compressed
        optimizer.zero_grad()
        (ddp(torch.ones(4, 64)) * column_weight).sum().backward()
        decoded = projection.weight.grad.clone()
        optimizer.step()
    return decoded, torch.sign(column_weight), _flat(projection)


@pytest.mark.parametrize("world_size", [2, 4])
def test_conv1d_gradients_are_scaled_by_output_column(world_size):
    """Transposed, a block of 64 is one output column, so the small query columns get scales of
    their own and arrive whole, with their signs, in their places; stored [in, out], a block is
    2.7 rows of 24 and mixes them with the large value columns, which silence them (but for the
    odd short piece where scatter-reduce's shards cut a block)."""
    pytest.importorskip("transformers")
    for transpose_conv1d in (True, False):
        results = run_ranks(fused_projection_gradient, world_size, transpose_conv1d, timeout_s=300)
        for decoded, sign, parameters in results:
            query = decoded[:, :8]
            if transpose_conv1d:
                assert torch.equal(torch.sign(query), sign[:8].expand_as(query))
            else:
                assert torch.count_nonzero(query) < query.numel() // 8
            assert torch.equal(parameters, results[0][2])
