"""AdamW that agrees with the 3LC hook on when gradients travel at full precision.

Why a separate optimizer: Adam divides by ``sqrt(v)``, an average of squared gradients.  An
error-fed ternary gradient delivers a small coordinate as a rare spike ``+-M*s`` (the tensor's
scale times the sparsity multiplier), so its average square is ``~|g| M s`` instead of ``g**2``
and Adam shrinks that coordinate's steps by ``sqrt(|g| / (M s))``.  With ``v`` taken from exact
gradients and then held, Adam is linear in the gradient again (preconditioned SGD with momentum),
which is where error feedback keeps allreduce's accuracy.  The anchors are DeepSpeed's 1-bit Adam
(full-precision warm-up, then ``v`` frozen) and 0/1 Adam (``v`` refreshed at doubling intervals).

The schedule, a pure function of the optimizer's step count (identical on every rank)::

    steps 0 .. freeze_step-1          full precision: plain allreduce, torch.optim.AdamW's update
    steps freeze_step*2**k (k >= 1)   full precision refresh of v (refresh="doubling" only)
    every other step                  3LC-compressed momentum (or gradient: ``compress``), v frozen

Pairing: ``threelc.hooks.register(ddp_model, optimizer=opt)`` stores the optimizer on the hook's
state; the hook asks :meth:`AdamW.full_precision` once per bucket.  A GradScaler step skipped
for inf/NaN (the hook turns a non-finite bucket into NaN on every rank) does not advance the step
count on any rank, so every rank stays on the same schedule.
"""

from __future__ import annotations

import fnmatch
import logging
import math

import torch

__all__ = ["AdamW", "REFRESH", "COMPRESS", "MOMENTUM_BLOCK_SIZE", "EMBEDDING_SCALES", "FLOOR_VARIANCE", "UnpairedOptimizerError", "check_pairing", "pair", "unwrap"]

logger = logging.getLogger(__name__)

#: ``refresh`` choices: no refresh after the freeze, or refreshes at freeze_step * 2**k.
REFRESH = ("none", "doubling")
#: ``compress`` choices: what the hook compresses after the freeze.
COMPRESS = ("gradient", "momentum", "preconditioned", "update")
#: ``compress`` modes whose ranks send their momentum (divided by sqrt(v_hat) under "update"), so the
#: hook averages a momentum and the step takes it as ``m``.
MOMENTUM_MODES = ("momentum", "update")
#: ``embedding_scale`` choices: one 3LC scale per row of each ``nn.Embedding`` weight, or the hook's blocks.
EMBEDDING_SCALES = ("row", "block")
#: ``floor_variance`` choices: off, raise the stored v (True, persistent), cap each step at lr ("transient"),
#: or cap each step at lr and carry the excess to the next compressed steps ("carry").
FLOOR_VARIANCE = (False, True, "transient", "carry")
#: ``floor_variance`` modes given as strings (the others are False and True).
FLOOR_MODES = ("transient", "carry")
#: The paired hook's values per scale under compress="momentum" (or "update") when the hook's block_size is not
#: given: a momentum is smooth, so its ternary payloads are sparse and finer scales pay for
#: themselves (docs/benchmarks.md, "Eighth session": 512 was the best of 256, 512, 1024 and 8192).
MOMENTUM_BLOCK_SIZE = 512
#: Most values a ``block_sizes`` entry may give one scale (the hook's own block size is below 2**32).
MAX_BLOCK = 2**32 - 1
#: The least fraction of v a refresh keeps (see AdamW._frozen_group_step).
REFRESH_KEEP = 0.5
#: Version of the ``"threelc"`` entry in :meth:`AdamW.state_dict`.
STATE_VERSION = 1


class UnpairedOptimizerError(RuntimeError):
    """A threelc optimizer stepped without a 3LC hook paired with it."""


class AdamW(torch.optim.AdamW):
    r"""torch.optim.AdamW with a full-precision warm-up, then a frozen second moment.

    A drop-in for :class:`torch.optim.AdamW` (same ``lr``, ``betas``, ``eps``, ``weight_decay``,
    param groups, LR schedulers) to pair with the 3LC hook::

        opt = threelc.optim.AdamW(ddp_model.parameters(), lr=3e-4, weight_decay=0.1)
        state = threelc.hooks.register(ddp_model, optimizer=opt)

    Algorithm, for step ``t`` (0-based count of completed steps):

    1. ``t < freeze_step``: the hook averages gradients with a plain allreduce and this is
       ``torch.optim.AdamW.step`` (bitwise the same update).
    2. ``t >= freeze_step``, a *refresh* step (``refresh="doubling"``: ``t = freeze_step * 2**k``, ``k >= 1``):
       full-precision gradients again; ``v`` catches up on the ``n`` steps since its last update
       as if the squared gradient had been this step's all along,
       ``v = d v + (1 - d) g**2`` with ``d = max(beta2**n, 1/2)`` (one minibatch never replaces
       more than half of ``v``), and the step is the usual AdamW step.
    3. any other step: the hook sends each rank's momentum ``beta1 m + (1 - beta1) g``
       3LC-compressed (``compress="momentum"``, the default and 1-bit Adam's choice; error
       feedback keeps what was not sent), and the averaged result becomes ``m``; ``v`` is not
       updated, and the step divides by ``sqrt(v_hat)`` with the bias correction of ``v``'s last
       update (so the preconditioner stays fixed).  ``compress="gradient"`` sends the gradient
       instead and updates ``m`` as usual.

    Parameters
    ----------
    params, lr, betas, eps, weight_decay, maximize, foreach
        As :class:`torch.optim.AdamW` (defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
        weight_decay=1e-2``).  ``amsgrad``, ``capturable``, ``differentiable`` and ``fused``
        are not supported (ValueError).
    freeze_step : int, default 20
        Full-precision steps before ``v`` freezes and compression starts; at least 2 (DDP
        rebuilds its buckets after the first iteration).  With the doubling refreshes a 1,000-step
        run sends 25 steps at full precision (2.5%, against 1-bit Adam's 15-25% warm-up).
        docs/benchmarks.md measures 10 to 200 on 1,000-step runs: 20 met the byte targets on
        both transformers, 100 holds the whole run to ~8x fewer bytes than allreduce.
    refresh : {"doubling", "none"}, default "doubling"
        Refresh ``v`` at full precision on steps ``freeze_step * 2**k`` (0/1 Adam's schedule:
        ``log2(T / freeze_step)`` extra full-precision steps in a T-step run), or never.
    compress : {"momentum", "gradient", "preconditioned", "update"}, default "momentum"
        What the hook compresses after the freeze (see step 3): each rank's momentum
        ``beta1 m + (1 - beta1) g`` (1-bit Adam's choice), its gradient, its gradient divided by
        ``sqrt(v_hat) + eps`` (``"preconditioned"``), or its momentum so divided (``"update"``,
        AdamW's update direction); the last two are exact to average while ``v`` is frozen, and
        the mean is multiplied back.  Under ``"momentum"`` and ``"update"`` the paired hook uses
        blocks of :data:`MOMENTUM_BLOCK_SIZE` (512) values per 3LC scale unless its own
        ``block_size`` is given (:attr:`hook_block_size`); under the others the hook's default
        (8192).  docs/benchmarks.md measures them on two transformers, 1,000 steps, 4 ranks:
        momentum in 512-value blocks was the best within the byte targets on both (a tiny
        GPT-2 +1.8% of AdamW's loss over 3 seeds at 21x fewer bytes over the run and 44x per
        compressed step, where gradients in 8192-value blocks end +5.0%; a char transformer
        2.6% below AdamW's loss at 20x / 41x); ``"update"`` in 512-value blocks ended above it on
        GPT-2 (seed 0; "Ninth session").
    embedding_scale : {"block", "row"}, default "block"
        How the hook scales the gradient of every ``nn.Embedding`` weight of the paired model
        (a tied output embedding included) on compressed steps: one 3LC scale per row (token), or
        the hook's own blocks (``block_size`` values share a scale).  Why rows: a token's row
        gets a gradient in proportion to how often the token occurs, so in a shared block the
        frequent tokens set the scale and a rare token's gradient reaches the mean only after its
        residual has grown to half of it; Adam turns that late lump into a full-size step where
        SGD would take a small one.  Costs 12 bytes per row per payload (its size and scale).
        docs/benchmarks.md: on the tiny GPT-2 it cost 9% more bytes and did not lower the loss.
    transpose_conv1d : bool, default False
        Compress the gradient of every Hugging Face ``Conv1D`` weight (GPT-2's projections, stored
        ``[in, out]``, the transpose of ``nn.Linear``'s ``[out, in]``) transposed, so that the
        hook's scale blocks run along output features as they do for ``nn.Linear``.  Stored as
        it is, every block of GPT-2's fused ``c_attn`` weight mixes query, key and value columns,
        and the value columns' gradients (an order of magnitude larger early in training) set
        the scale that the query and key columns are quantized against: their gradients reach
        the mean late and in lumps, which Adam turns into full-size steps.  Adds no header bytes, but the query
        and key columns now send nonzeros: on the tiny GPT-2, with ``embedding_scale="row"``,
        +3.1% loss against AdamW (+4.8% without it) at 6% more bytes than rows alone, which took
        the run below the 20x / 40x byte bars (docs/benchmarks.md).
    floor_variance : {False, True, "transient", "carry"}, default False
        ``True`` (persistent): on every compressed step raise ``v`` where needed so that ``v_hat >= m_hat**2``: no
        coordinate steps more than ``lr`` (the bound exact Adam keeps by itself while a gradient
        is steady).  Why: a ``v`` frozen at the warm-up cannot follow a gradient that grows by
        orders of magnitude later; in the tiny GPT-2 the query and key weights' gradients are
        tiny while attention is uniform (``sqrt(v)`` down to 1e-6 at step 20) and grow once it
        learns: within 60 steps of a freeze at 20 their largest ``|m_hat| / sqrt(v_hat)`` was 35-46
        where torch's own ``v`` gave 1.6; with every bucket allreduced the floor took that run's
        final loss from +12.5% to +0.1% of AdamW's, but with 3LC's gradients it cost loss
        (+7.5%, where similar scales without it reach +3.1%; docs/benchmarks.md), likely because a
        compressed lump raises ``m_hat`` and the floor holds ``v`` up.  ``v`` only grows between
        refreshes; a refresh goes on from the raised value.
        ``"transient"``: the same bound, but the stored ``v`` is never raised: on every compressed
        step the update divides by ``max(sqrt(v_hat) + eps, |m_hat|)`` instead of
        ``sqrt(v_hat) + eps`` (each coordinate's step is at most ``lr``), computed for that step
        only, so once a lump has left ``m`` the coordinate's step is the frozen ``v``'s again.
        Full-precision steps (warm-up, refreshes) are torch's AdamW update under every mode.
        Measured on the tiny GPT-2 with 3LC's gradients (seeds 1 and 0): +9.2% and +8.1% against
        AdamW, where the default ends +4.3% and +4.7% (docs/benchmarks.md): a step bound of either kind cost loss under
        compression, so both modes stay opt-in.
        ``"carry"``: the same cap, but what a step loses to it is carried, not dropped.  Each
        parameter keeps a buffer ``c`` (``state["step_carry"]``, in the parameter's units and
        dtype, zero at first).  On every compressed step the uncapped AdamW displacement
        ``u = -lr * m_hat / (sqrt(v_hat) + eps)`` is added to it, the parameter moves by
        ``clamp(c + u, -lr, lr)`` and ``c`` keeps the rest: ``c <- c + u - clamp(c + u, -lr, lr)``.
        So no coordinate moves more than ``lr`` on one step, and the displacements applied so far
        plus ``c`` always equal the sum of the uncapped ones: a lump that error feedback delivered
        at once is paid out at ``lr`` per step over the following compressed steps, as error
        feedback spreads the gradient it could not send.  A coordinate whose step stays below
        ``lr`` keeps ``c = 0`` and steps exactly as without the option.  Full-precision steps
        (warm-up, refreshes) are torch's AdamW update and leave ``c`` as it is (it goes on
        draining on the next compressed steps).  Weight decay acts on the parameter before the
        step as usual, outside the cap and the carry.  The cap is each param group's ``lr`` at
        that step (so an LR scheduler changes it); ``c`` holds displacement, not a multiple of
        ``lr``, so a lump owed under a larger ``lr`` drains over more steps of a smaller one, and
        what is left in ``c`` when training stops is never applied (like error feedback's
        residual).  ``c`` is a function of the averaged gradients only (identical on every rank)
        and is saved by :meth:`state_dict` with the moments (a bitwise resume).
        Measured on the tiny GPT-2 with 3LC's gradients (seeds 0 and 1): +67.9% and +18.9% against
        AdamW, where the default ends +4.7% and +4.3% and ``"transient"`` +8.1% and +9.2%
        (docs/benchmarks.md): paying the excess out later is far worse than dropping it, so this
        mode is opt-in too.
    block_sizes : dict of str to int, optional
        Finer 3LC scales for chosen parameters on compressed steps: ``{pattern: values}`` gives
        every parameter whose name in the paired model matches ``pattern`` (``fnmatch``, e.g.
        ``"*.c_attn.weight"``; the first matching pattern wins) one scale per ``values``
        consecutive values of its gradient (as compressed, so along output features under
        ``transpose_conv1d``), the hook's ``block_size`` elsewhere.  Each such piece costs 12
        header bytes per payload (its size and scale) where a hook block costs 4, so keep it to
        the tensors where the hook's blocks mix gradients of very different sizes.  A pattern that
        decides no parameter's block size (it matches no name, or only names an earlier pattern
        took), or one that names an embedding weight under ``embedding_scale="row"``, is a
        ValueError at pairing.

    Gradient clipping (``clip_grad_norm_`` between backward and step) clips what the hook
    delivered: the exact mean gradient on full-precision steps, the decoded 3LC mean gradient on
    compressed steps, the averaged momentum with ``compress="momentum"``, and the averaged
    preconditioned gradient with ``compress="preconditioned"``.

    Raises
    ------
    ValueError
        A bad argument (the message says which and why).
    UnpairedOptimizerError
        From :meth:`step`, when no hook was paired with the optimizer.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 freeze_step: int = 20, refresh: str = "doubling", compress: str = "momentum",
                 embedding_scale: str = "block", transpose_conv1d: bool = False, floor_variance: bool | str = False,
                 block_sizes: dict | None = None,
                 amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        if amsgrad or capturable or differentiable or fused:
            raise ValueError("threelc.optim.AdamW does not support amsgrad, capturable, differentiable or fused "
                             "(its frozen-variance step is a plain per-tensor loop)")
        if isinstance(freeze_step, bool) or not isinstance(freeze_step, int) or freeze_step < 2:
            raise ValueError(f"freeze_step must be an integer >= 2 (DDP rebuilds its buckets after the first "
                             f"iteration, which must run at full precision), got {freeze_step!r}")
        if refresh not in REFRESH:
            raise ValueError(f"refresh must be one of {REFRESH}, got {refresh!r}")
        if compress not in COMPRESS:
            raise ValueError(f"compress must be one of {COMPRESS}, got {compress!r}")
        if embedding_scale not in EMBEDDING_SCALES:
            raise ValueError(f"embedding_scale must be one of {EMBEDDING_SCALES}, got {embedding_scale!r}")
        if not isinstance(transpose_conv1d, bool):
            raise ValueError(f"transpose_conv1d must be True or False, got {transpose_conv1d!r}")
        if not (isinstance(floor_variance, bool) or (isinstance(floor_variance, str) and floor_variance in FLOOR_MODES)):
            raise ValueError(f"floor_variance must be False, True (raise the stored v), 'transient' (cap each "
                             f"compressed step at lr, v untouched) or 'carry' (cap each compressed step at lr, the "
                             f"excess carried to the next ones), got {floor_variance!r}")
        block_sizes = _check_block_sizes(block_sizes)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         foreach=foreach)
        self.freeze_step = freeze_step
        self.refresh = refresh
        self.compress = compress
        self.embedding_scale = embedding_scale
        self.transpose_conv1d = transpose_conv1d
        self.floor_variance = floor_variance
        self.block_sizes = block_sizes
        #: id(parameter) -> values per scale, for block_sizes (set at pairing).
        self._block_of: dict[int, int] = {}
        #: id(embedding weight) -> row length, for embedding_scale="row" (set at pairing).
        self._row_sizes: dict[int, int] = {}
        #: id(Conv1D weight) -> its (in, out) shape, for transpose_conv1d (set at pairing).
        self._transposed: dict[int, tuple] = {}
        #: Completed optimizer steps (skipped GradScaler steps do not count).
        self.steps = 0
        #: The hook's state once paired (:func:`threelc.hooks.register` sets it).
        self.hook_state = None

    # ------------------------------------------------------------------ schedule
    def full_precision(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the coming one) averages exact gradients."""
        step = self.steps if step is None else step
        if step < self.freeze_step:
            return True
        if self.refresh == "none":
            return False
        # Refreshes at freeze_step * 2, * 4, * 8, ...: the freeze step itself is already compressed.
        ratio = step // self.freeze_step
        return step % self.freeze_step == 0 and ratio >= 2 and ratio & (ratio - 1) == 0

    def schedule_text(self) -> str:
        """What every rank must agree on (part of the hook's configuration fingerprint)."""
        return (f"AdamW(freeze_step={self.freeze_step} refresh={self.refresh} compress={self.compress} "
                f"embedding_scale={self.embedding_scale} transpose_conv1d={self.transpose_conv1d}"
                f"{f' floor_variance={self.floor_variance}' if self.floor_variance else ''}"
                f"{f' block_sizes={self.block_sizes}' if self.block_sizes else ''})")

    @property
    def hook_block_size(self) -> int | None:
        """Values per 3LC scale the paired hook uses when its own ``block_size`` is not given:
        :data:`MOMENTUM_BLOCK_SIZE` under ``compress="momentum"`` or ``"update"``, else None (the hook's default)."""
        return MOMENTUM_BLOCK_SIZE if self.compress in MOMENTUM_MODES else None

    def bind_module(self, module) -> None:
        """Learn which of ``module``'s parameters are embedding tables and Conv1D weights (pairing
        calls this)."""
        self._row_sizes, self._transposed = {}, {}
        for child in module.modules():
            weight = getattr(child, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            if self.embedding_scale == "row" and isinstance(child, torch.nn.Embedding):
                self._row_sizes[id(weight)] = int(weight.shape[1])
            elif self.transpose_conv1d and _is_conv1d(child):
                self._transposed[id(weight)] = tuple(int(size) for size in weight.shape)
        self._block_of = self._match_block_sizes(module)
        if self.embedding_scale == "row" or self.transpose_conv1d or self.block_sizes:
            logger.info("threelc.optim.AdamW: %d embedding weight(s) scaled by row, %d Conv1D weight(s) compressed "
                        "transposed, %d parameter(s) with their own block size", len(self._row_sizes),
                        len(self._transposed), len(self._block_of))

    def _match_block_sizes(self, module) -> dict:
        """id(parameter) -> values per scale for the parameters ``block_sizes`` names (ValueError
        for a pattern that matches nothing, or an embedding weight already scaled by row)."""
        if not self.block_sizes:
            return {}
        found, used = {}, set()
        for name, parameter in module.named_parameters():
            pattern = next((pattern for pattern in self.block_sizes if fnmatch.fnmatchcase(name, pattern)), None)
            if pattern is None:
                continue
            if id(parameter) in self._row_sizes:
                raise ValueError(f"block_sizes pattern {pattern!r} matches the embedding weight {name!r}, which "
                                 f"embedding_scale='row' already scales by row: use one or the other")
            found[id(parameter)] = self.block_sizes[pattern]
            used.add(pattern)
        unused = [pattern for pattern in self.block_sizes if pattern not in used]
        if unused:
            raise ValueError(f"block_sizes pattern(s) {unused} decide no parameter's block size: they match no "
                             f"parameter name of the paired model, or only names an earlier pattern took (names look "
                             f"like {next(iter(dict(module.named_parameters())), '')!r})")
        return found

    def transposed_segments(self, parameters) -> tuple:
        """``(offset, rows, columns)`` of each gradient in a bucket of ``parameters`` that the
        hook compresses transposed (``transpose_conv1d``): offsets in the flat bucket."""
        if not self._transposed:
            return ()
        found, offset = [], 0
        for parameter in parameters:
            shape = self._transposed.get(id(parameter))
            if shape is not None:
                found.append((offset, *shape))
            offset += parameter.numel()
        return tuple(found)

    def scale_segments(self, parameters, layout: tuple) -> tuple:
        """The segments the hook gives one 3LC scale each (blocks within them), for a bucket of
        ``parameters`` with sizes ``layout`` (a trailing padding segment stays as it is): each
        embedding weight split into its rows under ``embedding_scale="row"``, each parameter
        that ``block_sizes`` names into pieces of its block size, every other one whole."""
        if not self._row_sizes and not self._block_of:
            return layout
        segments = []
        for index, size in enumerate(layout):
            key = id(parameters[index]) if index < len(parameters) else None
            row = self._row_sizes.get(key)
            if row and size % row == 0:
                segments.extend((row,) * (size // row))
            elif key in self._block_of:
                block = self._block_of[key]
                segments.extend((block,) * (size // block) + ((size % block,) if size % block else ()))
            else:
                segments.append(size)
        return tuple(segments)

    def prepare_bucket(self, parameters, buffer: torch.Tensor) -> None:
        """Before a compressed step: turn the gradients in ``buffer`` (the flat DDP bucket of
        ``parameters``) into what ``compress`` says this rank sends (nothing to do for "gradient")."""
        if self.compress == "gradient":
            return
        group_of = {id(parameter): group for group in self.param_groups for parameter in group["params"]}
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            state = self.state.get(parameter, {})
            if "exp_avg" in state:
                chunk = buffer[offset:offset + size]
                group = group_of[id(parameter)]
                if self.compress in MOMENTUM_MODES:
                    # lerp(g, m, beta1) = beta1 m + (1 - beta1) g, in float32 whatever the bucket's dtype;
                    # under maximize m is the momentum of -g, as in the step.
                    gradient = chunk.float().neg() if group["maximize"] else chunk.float()
                    sent = torch.lerp(gradient, state["exp_avg"].float().reshape(-1), group["betas"][0])
                    if self.compress == "update":
                        sent.div_(_denominator(state, group).float().reshape(-1))
                else:
                    sent = chunk.float() / _denominator(state, group).float().reshape(-1)
                chunk.copy_(sent)
            offset += size

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the averaged gradients (see the class docstring for which rule)."""
        if self.hook_state is None:
            raise UnpairedOptimizerError(
                "threelc.optim.AdamW must be paired with the 3LC hook: call "
                "threelc.hooks.register(ddp_model, optimizer=opt) before training; without it the "
                "hook would compress on its own schedule and the frozen second moment would be wrong")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps < self.freeze_step:
            super().step()
        else:
            refresh = self.full_precision()
            for group in self.param_groups:
                self._frozen_group_step(group, refresh)
        self.steps += 1
        return loss

    def _frozen_group_step(self, group: dict, refresh: bool) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = float(group["lr"]), group["eps"], group["weight_decay"]
        for parameter in group["params"]:
            if parameter.grad is None:
                continue
            grad = -parameter.grad if group["maximize"] else parameter.grad
            state = self.state[parameter]
            if "exp_avg" not in state:
                # A parameter that got its first gradient after the freeze: its v starts now.
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(parameter),
                             exp_avg_sq=torch.zeros_like(parameter))
                refresh_this = True
            else:
                refresh_this = refresh
            step = int(state["step"]) + 1
            # v's last update: the step count of the warm-up unless a refresh set it since.
            variance_step = state.setdefault("variance_step", int(state["step"]))
            state["step"] += 1
            parameter.mul_(1 - lr * weight_decay)
            if self.compress == "momentum" and not refresh_this:
                state["exp_avg"].copy_(parameter.grad)  # the hook averaged beta1 m + (1 - beta1) g (g negated under maximize)
            elif self.compress == "update" and not refresh_this:
                state["exp_avg"].copy_(parameter.grad * _denominator(state, group))  # the hook averaged that / denominator
            else:
                if self.compress == "preconditioned" and not refresh_this:
                    grad = grad * _denominator(state, group)  # the hook averaged g / denominator
                state["exp_avg"].lerp_(grad, 1 - beta1)
            if refresh_this:
                # One minibatch's square stands for the n skipped steps; after long gaps (n of
                # thousands) it would replace v outright, and a coordinate whose gradient is ~0 on
                # this step would get v ~ 0 and a huge step.  At most half of v comes from it.
                decay = max(beta2 ** (step - variance_step), REFRESH_KEEP)
                state["exp_avg_sq"].mul_(decay).addcmul_(grad, grad, value=1 - decay)
                state["variance_step"] = variance_step = int(step)
            bias_correction1 = 1 - beta1 ** step
            if self.floor_variance is True and not refresh_this:
                # v_hat >= m_hat**2, in v's own units: v >= (m / bias_correction1)**2 * bias_correction2.
                bias_correction2 = 1 - beta2 ** variance_step
                floor = state["exp_avg"].square().mul_(bias_correction2 / bias_correction1 ** 2)
                torch.maximum(state["exp_avg_sq"], floor, out=state["exp_avg_sq"])
            denominator = _denominator(state, group)
            if self.floor_variance == "transient" and not refresh_this:
                # max(sqrt(v_hat) + eps, |m_hat|), this step only: no coordinate steps more than lr.
                torch.maximum(denominator, state["exp_avg"].abs().div_(bias_correction1), out=denominator)
            if self.floor_variance == "carry" and not refresh_this:
                _carried_step(parameter, state, denominator, lr, bias_correction1)
            else:
                parameter.addcdiv_(state["exp_avg"], denominator, value=-lr / bias_correction1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """torch's optimizer state (moments, per-parameter steps, each ``variance_step`` and, under
        ``floor_variance="carry"``, each ``step_carry``) plus a ``"threelc"`` entry: the step
        count and the schedule options."""
        state_dict = super().state_dict()
        state_dict["threelc"] = {"version": STATE_VERSION, "steps": self.steps, "freeze_step": self.freeze_step,
                                 "refresh": self.refresh, "compress": self.compress,
                                 "embedding_scale": self.embedding_scale, "transpose_conv1d": self.transpose_conv1d,
                                 "floor_variance": self.floor_variance, "block_sizes": dict(self.block_sizes)}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s result; a plain torch AdamW state dict starts the count
        from the largest per-parameter step (schedule options stay as constructed; other saved
        options than these log a warning).  ValueError for a state saved after compressed steps
        under another ``compress`` (the hook's residuals would be read in the wrong units)."""
        state_dict = dict(state_dict)
        entry = state_dict.pop("threelc", None)
        if entry is not None:
            if entry.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported threelc.optim.AdamW state version {entry.get('version')!r} "
                                 f"(this version reads {STATE_VERSION})")
            compressed = int(entry["steps"]) > int(entry.get("freeze_step", 0))
            if compressed and entry.get("compress", self.compress) != self.compress:
                # The hook's residuals hold what the saved mode still owes, in its units (a gradient
                # owed enters m at 1 - beta1, a momentum owed whole): another mode would misread them.
                raise ValueError(f"this state was saved by a run that compressed with compress="
                                 f"{entry['compress']!r}, and this optimizer has compress={self.compress!r}: the "
                                 f"hook's residuals are in the saved mode's units.  Construct the optimizer with "
                                 f"compress={entry['compress']!r} to resume that run (the default changed from "
                                 f"'gradient' to 'momentum'), or start a new one")
        super().load_state_dict(state_dict)
        if entry is None:
            steps = [int(state["step"]) for state in self.state.values() if "step" in state]
            self.steps = max(steps, default=0)
            return
        saved = {key: entry[key] for key in ("freeze_step", "refresh", "compress", "embedding_scale", "transpose_conv1d",
                                             "floor_variance", "block_sizes") if key in entry}
        changed = {key: (value, getattr(self, key)) for key, value in saved.items() if value != getattr(self, key)}
        if changed:
            logger.warning("threelc.optim.AdamW: loading a state saved with other options (saved, now): %s", changed)
        self.steps = int(entry["steps"])


def _check_block_sizes(block_sizes) -> dict:
    """``block_sizes`` as a dict of name pattern -> values per scale (ValueError if malformed)."""
    if block_sizes is None:
        return {}
    if not isinstance(block_sizes, dict):
        raise ValueError(f"block_sizes must be a dict of parameter-name pattern -> values per scale, "
                         f"got {type(block_sizes).__name__}")
    for pattern, size in block_sizes.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"block_sizes keys must be non-empty parameter-name patterns (str), got {pattern!r}")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BLOCK:
            raise ValueError(f"block_sizes[{pattern!r}] must be an integer from 1 to {MAX_BLOCK}, got {size!r}")
    return dict(block_sizes)


def _is_conv1d(module) -> bool:
    """Hugging Face transformers' ``Conv1D`` (a linear layer whose weight is stored ``[in, out]``),
    recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def transpose_segments(values: torch.Tensor, segments: tuple, *, inverse: bool = False) -> None:
    """Transpose, in place, each ``(offset, rows, columns)`` matrix stored flat in ``values``
    (``inverse``: from its transposed order back to the stored one)."""
    for offset, rows, columns in segments:
        matrix = values[offset:offset + rows * columns]
        shape = (columns, rows) if inverse else (rows, columns)
        matrix.copy_(matrix.view(shape).t().reshape(-1))


def _carried_step(parameter: torch.Tensor, state: dict, denominator: torch.Tensor, lr: float,
                  bias_correction1: float) -> None:
    """floor_variance="carry": add this step's uncapped displacement to the parameter's carry,
    move the parameter by the carry clamped to ``[-lr, lr]`` and keep the rest in the carry."""
    carry = state.get("step_carry")
    if carry is None:
        carry = state["step_carry"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
    carry.addcdiv_(state["exp_avg"], denominator, value=-lr / bias_correction1)
    applied = carry.clamp(-lr, lr)
    parameter.add_(applied)
    carry.sub_(applied)


def _denominator(state: dict, group: dict) -> torch.Tensor:
    """AdamW's ``sqrt(v_hat) + eps``, with the bias correction of v's last update."""
    variance_step = state.get("variance_step", int(state["step"]))
    bias_correction2 = 1 - group["betas"][1] ** variance_step
    return (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])


def unwrap(optimizer):
    """The optimizer inside a framework's wrapper: Accelerate's ``AcceleratedOptimizer`` (and so
    the Hugging Face Trainer's) keeps it in ``.optimizer``, Lightning's ``LightningOptimizer`` in
    ``._optimizer``.  An optimizer that wraps nothing comes back as it is."""
    for _ in range(4):  # wrappers of wrappers, but never a cycle
        if isinstance(optimizer, AdamW):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def pair(state, optimizer, module) -> None:
    """Pair a threelc optimizer (or a framework's wrapper of one) with the hook ``state`` that is
    registered on the DDP model of ``module``: from the next backward on, the optimizer's schedule
    decides which steps the hook compresses.  :func:`threelc.hooks.register` calls it for its
    ``optimizer=``; the framework integrations call it once the framework has built the optimizer."""
    optimizer = unwrap(optimizer)
    check_pairing(optimizer, module)
    optimizer.bind_module(module)
    state.optimizer, optimizer.hook_state = optimizer, state


def check_pairing(optimizer, module) -> None:
    """Raise ValueError unless ``optimizer`` is a threelc optimizer, unpaired, over ``module``'s parameters."""
    if not isinstance(optimizer, AdamW):
        raise ValueError(f"optimizer must be a threelc.optim.AdamW to pair with the hook, got "
                         f"{type(optimizer).__module__}.{type(optimizer).__qualname__}; a torch optimizer needs no "
                         f"pairing (omit optimizer=), but under AdamW compressed gradients inflate its second "
                         f"moment: use threelc.optim.AdamW")
    if optimizer.hook_state is not None:
        raise ValueError("this threelc.optim.AdamW is already paired with a hook; one optimizer per DDP model")
    own = {id(parameter) for parameter in module.parameters()}
    foreign = sum(id(parameter) not in own for group in optimizer.param_groups for parameter in group["params"])
    if foreign:
        raise ValueError(f"the optimizer holds {foreign} parameter(s) that are not the DDP model's; pair the "
                         f"optimizer built over ddp_model.parameters()")
