"""threelc_hook: the DDP communication hook that averages gradient buckets through 3LC payloads.

Data flow of one bucket (see docs/HOOK.md for the full design)::

    autograd thread                       worker thread (one per state, FIFO)
    ---------------                       -----------------------------------
    threelc_hook(state, bucket)
      read index, layout, iteration  -->  [first call] compare config fingerprints
      submit job, return future           warm-up / small bucket: allreduce (mean)
                                          else: compress v = gradient + worker residual
                                                (the encoder leaves v - decoded in the bucket)
                                                [first time] measure, agree on the plan (plan.py)
                                                [close call] try both collectives, keep the faster
                                          [per bucket, or after the last one when coalesced]
                                                exchange sizes, non-finite flags, layout fingerprints
                                                allgather | scatter-reduce-allgather
                                                residual = v - decoded (if all finite)
                                                decode in rank order (checksums), average
                                          write the means into the buckets, resolve futures
    [last bucket] wait for the worker,
      raise the step's failure, typed

Every rank decodes the same bytes in the same order with the same float32 arithmetic, so the
replicas receive bitwise identical gradients, and a corrupt payload stops every rank with the
same error (:mod:`threelc.hooks.faults`).
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook inspects the hook's
# annotations and rejects them as strings.

import contextlib
import dataclasses
import functools
import logging
import time

import numpy as np
import torch
import torch.distributed as dist

import threelc

from . import codecs, collectives, faults, never_called, optim, plan
from .state import ConfigMismatchError, ThreeLCState, fingerprint

__all__ = ["threelc_hook", "register"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _BucketJob:
    """What the worker needs to know about one bucket; read on the autograd thread."""

    buffer: torch.Tensor
    index: int
    is_last: bool
    iteration: int
    compress: bool
    layout: tuple  # sizes of the bucket's parameter tensors
    segments: tuple  # sizes of the runs of values with one scale each (blocks within them): layout, or finer
    transposed: tuple  # (offset, rows, columns) of gradients compressed transposed (threelc.optim.AdamW)
    names: tuple | None  # their names, when the state knows them
    check_config: bool
    future: torch.futures.Future  # what the hook returned to DDP; the worker side resolves it
    exchange_now: bool = False  # exchange this bucket at once even when buckets are coalesced


def threelc_hook(state: ThreeLCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""Average a gradient bucket across ranks through 3LC-compressed payloads.

    Implements 3LC (Lim, Andersen, Kaminsky, MLSys 2019, arXiv:1802.07389) as a DDP
    communication hook.  For each bucket:

    1. During the first ``state.start_iter`` iterations, and for buckets with fewer than
       ``state.min_numel`` values, average with a plain allreduce.
    2. Otherwise add the worker residual and compress (3-value quantization with sparsity
       multiplication, base-3^5 packing, zero-run encoding), one scale per parameter tensor,
       bucket or block (``state.scale``); the residual keeps what was not sent.  A payload larger
       than the raw values is replaced by the raw values.  ``state.codec`` picks the numba codec
       on host memory or the torch codec on the bucket's device ("auto": torch for CUDA buckets);
       both write the same bytes.
    3. Exchange payload sizes and a layout fingerprint, then the payloads ("allgather"), or
       shard j of every rank to rank j ("scatter_reduce"; rank j averages, adds its server
       residual, compresses again, and every rank gathers the compressed shards); per bucket,
       or for all the step's buckets at once after the last one (``state.coalesce``).  With
       ``"auto"`` options the collective and the coalescing come from a cost model of the link
       and codec measured at the first compressed bucket (:mod:`threelc.hooks.plan`).
    4. Decode the payloads in rank order, average, and write the mean into the bucket in its
       own dtype.  If any payload was flagged non-finite (the size headers carry the flags), the
       whole bucket becomes NaN on every rank (so ``torch.amp.GradScaler`` skips the step
       everywhere) and the residuals stay as they were: they are updated only once every rank's
       payloads are known to be finite.
    5. Failures are raised from the hook call of the step's last bucket, on the autograd thread,
       with their own type (``ConfigMismatchError``, :class:`~threelc.hooks.CorruptPayloadError`,
       the collectives' errors); a corrupt payload raises the same error, naming its sender, on
       every rank (see :mod:`threelc.hooks.faults`).

    The work runs on the state's worker thread; this function only enqueues it, so the
    collectives are issued in bucket order on every rank while backward continues.

    Args:
        state (ThreeLCState): configuration and residuals.
        bucket (dist.GradBucket): the flattened gradients of several parameters.

    Returns:
        A future that resolves to the averaged bucket (its shape, dtype and device).

    Example::
        >>> # xdoctest: +SKIP
        >>> state = ThreeLCState(process_group=None, sparsity=1.0)
        >>> ddp_model.register_comm_hook(state, threelc_hook)
    """
    if isinstance(bucket, tuple):
        raise TypeError(_PYTHON_REDUCER_REFUSED)
    if not state._hook_called:
        state._hook_called = True
        state.check_owner()
    # A failure of an earlier bucket job is raised here, on the autograd thread, with its own type:
    # DDP passes an exception raised by the hook call to loss.backward() unchanged (one set on the
    # future would reach the user as "RuntimeError: Unable to cast ... to Tensor").
    faults.raise_pending(state)
    group = state.group()
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    iteration = state.iteration
    is_last = bucket.is_last()
    if is_last:
        state.iteration += 1
        if state.iteration == state.start_iter and state.optimizer is None:
            logger.info("threelc: compression starts after %d iterations", state.iteration)

    full_precision = iteration < state.start_iter if state.optimizer is None else state.optimizer.full_precision()
    if state.optimizer is not None and not full_precision:
        state.optimizer.prepare_bucket(bucket.parameters(), buffer)  # compress="momentum": send local momentum

    if world_size == 1:
        # Nothing to exchange: the mean is the gradient itself, and it stays exact.
        state.wait()
        state._stats.add_raw(buffer.numel() * buffer.element_size())
        if is_last:
            state._stats.finish_step(iteration, dist.get_rank(), world_size)
        future = collectives.future_for(buffer)
        future.set_result(buffer)
        return future

    compress = not full_precision and buffer.numel() >= max(state.min_numel, 1)
    layout, names, segments, transposed = (), None, (), ()
    if compress:
        parameters = bucket.parameters()
        layout = tuple(int(parameter.numel()) for parameter in parameters)
        padding = buffer.numel() - sum(layout)
        if padding > 0:  # DDP may pad a bucket; the padding is one more segment
            layout += (padding,)
        names = state.parameter_names(parameters, bucket.index(), padding)
        segments = layout
        if state.optimizer is not None:  # threelc.optim.AdamW: embedding rows, Conv1D weights transposed
            segments = state.optimizer.scale_segments(parameters, layout)
            transposed = state.optimizer.transposed_segments(parameters)
    future = collectives.future_for(buffer)
    job = _BucketJob(buffer=buffer, index=bucket.index(), is_last=is_last, iteration=iteration,
                     compress=compress, layout=layout, segments=segments, transposed=transposed, names=names,
                     check_config=not state._config_checked, future=future)
    state._config_checked = True
    state.worker().submit(functools.partial(_run_job, state, job))
    if is_last:
        # Right after the last bucket, DDP issues collectives of its own on the same process
        # group from this thread (with find_unused_parameters=True, the allreduce of the
        # used-parameter map).  Letting the worker finish first keeps the order identical on every
        # rank; it costs no overlap, because DDP waits for every bucket's future next anyway.
        state.wait()
        faults.raise_pending(state)  # every job of the step has run: raise its failure, typed
    return future


def register(ddp_model, optimizer=None, **options) -> ThreeLCState:
    """Create a :class:`ThreeLCState` and register :func:`threelc_hook` on a DDP model.

    ``options`` are ThreeLCState's keyword arguments; ``process_group`` defaults to the
    model's own.  ``optimizer``: a :class:`threelc.optim.AdamW` over the model's parameters, to
    pair with the hook (its schedule then decides which steps are compressed; ``start_iter`` is
    not used).  Returns the state (for ``stats()``, ``state_dict()``, ...).  ``ddp_model`` may
    be ``torch.compile`` of a DDP model (the DDP model inside is used).  Raises TypeError for a
    model that is not DDP, and NotImplementedError under compiled autograd's Python reducer.

    Example::
        >>> # xdoctest: +SKIP
        >>> opt = threelc.optim.AdamW(ddp_model.parameters(), lr=3e-4, weight_decay=0.1)
        >>> state = threelc.hooks.register(ddp_model, optimizer=opt)
    """
    ddp_model = _distributed_model(ddp_model)
    process_group = options.pop("process_group", None)
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    if optimizer is not None:  # checked before the state exists: a refused pairing leaves nothing behind
        optim.check_pairing(optim.unwrap(optimizer), ddp_model.module)
    state = ThreeLCState(process_group=process_group, **options)
    state.bind_parameters(ddp_model.module)
    if optimizer is not None:
        optim.pair(state, optimizer, ddp_model.module)
    ddp_model.register_comm_hook(state, threelc_hook)
    never_called.watch_registered(state)
    return state


_PYTHON_REDUCER_REFUSED = (
    "threelc: compiled autograd's Python reducer (torch._dynamo.config.optimize_ddp = 'python_reducer') is not "
    "supported: it calls the hook once per parameter with (grad, param) inside the traced backward, while 3LC "
    "compresses whole buckets with numba kernels on a worker thread, which cannot be traced.  Keep the default "
    "optimize_ddp (DDPOptimizer), which calls the hook with DDP's buckets as in eager mode.")


def _distributed_model(model) -> torch.nn.parallel.DistributedDataParallel:
    """The DistributedDataParallel model inside ``model`` (unwrapping torch.compile), or TypeError."""
    ddp_model = getattr(model, "_orig_mod", model)  # torch.compile(ddp_model) wraps it
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"threelc: register() needs a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(model).__name__}: the hook averages DDP's gradient buckets, so wrap the model first "
            f"(DistributedDataParallel(model) after torch.distributed.init_process_group).  With a framework, use "
            f"threelc.integrations (Lightning, Accelerate, Hugging Face Trainer), which find the DDP model for you.")
    if getattr(ddp_model, "_use_python_reducer", False):
        raise NotImplementedError(_PYTHON_REDUCER_REFUSED)
    return ddp_model


# ---------------------------------------------------------------------------- worker side
@dataclasses.dataclass
class _Compressed:
    """A bucket compressed on the worker thread, waiting for its exchange (alone, or coalesced
    with the step's other buckets)."""

    job: _BucketJob
    codec: object
    work: torch.Tensor  # float32 values in the codec's memory: the bucket itself when in_place
    in_place: bool
    values: object  # the codec's view of ``work``: gradient + worker residual (or what the payloads left of
    # it: ``kept``), then the mean
    shards: list  # slices of ``values``: [all] for allgather, one per rank for scatter-reduce
    payloads: list  # one per shard
    kept: list  # per shard: whether the codec left the new worker residual in its values (codec.compress)
    nonfinite: bool
    worker: object  # the codec's view of the worker residual (None without error feedback)
    server: object  # scatter-reduce: this rank's server residual shard (None without error feedback)
    segments: list  # parameter pieces inside each shard

    def finish(self) -> None:
        """Write the mean into the bucket (when the codec worked on a copy) and resolve its future."""
        optim.transpose_segments(self.work.reshape(-1), self.job.transposed, inverse=True)
        if not self.in_place:
            self.job.buffer.copy_(self.work.view(self.job.buffer.shape))
        self.job.future.set_result(self.job.buffer)


def _run_job(state: ThreeLCState, job: _BucketJob) -> None:
    """Average one bucket, or compress it and wait for the step's last bucket (runs on the worker
    thread; see the module docstring).  Resolves ``job.future``."""
    group = state.group()
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    stats = state._stats
    try:
        if state._failure is not None:
            raise RuntimeError("threelc: an earlier bucket failed on this rank; refusing to issue more "
                               f"collectives: {state._failure}") from state._failure
        device = collectives.comm_device(group, job.buffer.device)
        # The worker thread's current CUDA device is not the training thread's: use the bucket's.
        with torch.cuda.device(job.buffer.device) if job.buffer.is_cuda else contextlib.nullcontext():
            if job.check_config:
                _check_config(state, group, world_size, job.iteration, device)
            _drop_stale(state, job.index)
            stats.add_raw(job.buffer.numel() * job.buffer.element_size())
            started, sent_before = time.perf_counter(), stats.current.sent_bytes
            if not job.compress:
                job.future.set_result(collectives.allreduce_mean(job.buffer, group, stats))
            else:
                stats.mark_compressed()
                state._pending.append(_compress_bucket(state, job, group, rank, world_size, device))
            if state._pending and (job.is_last or job.exchange_now or not state._plan.coalesce):
                pending, state._pending = state._pending, []
                _exchange(state, pending, group, rank, world_size, device)
                for item in pending:
                    item.finish()
            if state._trial is not None and (job.exchange_now or (job.is_last and stats.current.compressed)):
                # A close call between the collectives: this step was one of their trial (plan.py).
                plan.end_trial_step(state, group, device, started if job.exchange_now else None,
                                    stats.current.sent_bytes - (sent_before if job.exchange_now else 0))
    except BaseException as error:
        if state._failure is None:
            state._failure = error
        for waiting in [job] + [item.job for item in state._pending]:
            if not waiting.future.done():
                waiting.future.set_exception(error)
        state._pending = []
        raise
    finally:
        state.record_bucket(job.buffer.numel(), job.is_last)
        if job.is_last:
            stats.finish_step(job.iteration, dist.get_rank(), world_size)


def _drop_stale(state, index: int) -> None:
    """Forget buckets still waiting for a coalesced exchange when a new backward pass begins.

    DDP hands buckets over in increasing index order, so a bucket whose index is not above the
    last waiting one starts a new pass.  Only a backward that stopped between buckets (an
    exception in user code, on every rank alike) leaves buckets waiting: their step never
    reached its last bucket, their residuals were not touched, and DDP reuses their buffers.
    """
    if not state._pending or state._pending[-1].job.index < index:
        return
    logger.warning("threelc: dropping %d compressed bucket(s) of a backward pass that never reached its last "
                   "bucket", len(state._pending))
    for item in state._pending:
        item.job.future.set_exception(RuntimeError("threelc: the backward pass of this bucket's step was abandoned"))
    state._pending = []


def _compress_bucket(state, job, group, rank, world_size, device) -> _Compressed:
    """``v = gradient + worker residual``, compressed whole (allgather) or per shard (scatter-reduce)."""
    codec = codecs.for_bucket(state, job.buffer)
    # The numba codec works on float32 host memory: a float32 CPU bucket in place, anything else
    # (fp16/bf16, CUDA) through a float32 host copy.  The torch codec works on the bucket's
    # device: a float32 bucket in place, fp16/bf16 through a float32 copy on the same device.
    work, in_place = codec.work_copy(job.buffer)
    optim.transpose_segments(work.reshape(-1), job.transposed)  # the residuals live in this order too
    values = codec.array(work.reshape(-1))
    count = codec.numel(values)
    if state._plan is None:  # the first compressed bucket of the run: every rank decides here
        state._plan, state._trial = plan.decide(state, codec, values, list(job.segments), group, world_size, device,
                                  buckets=state.step_buckets or 1, total_values=state.step_values or count)
    if state._plan.collective == "allgather":
        shards, server_range = [slice(0, count)], None
    else:
        bounds = collectives.shard_bounds(count, world_size)
        shards = [slice(int(bounds[j]), int(bounds[j + 1])) for j in range(world_size)]
        server_range = (shards[rank].start, shards[rank].stop)
    entry = _residual_entry(state, codec, job, count, world_size, server_range)
    worker = server = None
    if entry is not None:
        worker = codec.array(entry.worker)
        server = None if entry.server is None else codec.array(entry.server)
    segments = [collectives.segments_in_range(job.segments, shard.start, shard.stop) for shard in shards]
    with state._stats.timer("compress_s"):
        # v = gradient + residual is compressed; the residuals wait for the step's outcome (see _feedback).
        compressed = [codec.compress(values[shard], pieces, None if worker is None else worker[shard])
                      for shard, pieces in zip(shards, segments)]
    return _Compressed(job=job, codec=codec, work=work, in_place=in_place, values=values, shards=shards,
                       payloads=[payload for payload, _, _ in compressed], kept=[kept for _, _, kept in compressed],
                       nonfinite=any(nonfinite for _, nonfinite, _ in compressed), worker=worker, server=server,
                       segments=segments)


def _exchange(state, items, group, rank, world_size, device) -> None:
    """Exchange and average compressed buckets (one bucket, or a step's coalesced buckets)."""
    if len({type(item.codec) for item in items}) > 1:
        raise RuntimeError("threelc: cannot coalesce buckets that live on different devices; "
                           "construct the state with coalesce=False")
    if state._plan.collective == "allgather":
        _allgather_mean(state, items, group, rank, world_size, device)
    else:
        _scatter_reduce_mean(state, items, group, rank, world_size, device)


def _check_config(state: ThreeLCState, group, world_size: int, iteration: int, device) -> None:
    """Compare configuration fingerprints; on mismatch every rank raises the same error."""
    text = state.fingerprint_text(world_size, iteration)
    fingerprints = collectives.exchange_header([fingerprint(text)], group, device, state._stats)[:, 0]
    if np.all(fingerprints == fingerprints[0]):
        return
    # Every rank saw the same fingerprints, so every rank takes this branch: gather the texts to
    # say exactly what differs.
    texts = [None] * world_size
    dist.all_gather_object(texts, text, group=group)
    lines = "\n".join(f"  rank {rank}: {rank_text}" for rank, rank_text in enumerate(texts))
    raise ConfigMismatchError(f"threelc: the ranks run the hook with different configurations:\n{lines}")


def _check_layouts(fingerprints: np.ndarray, index: int) -> None:
    if not np.all(fingerprints == fingerprints[0]):
        raise ConfigMismatchError(
            f"threelc: bucket {index} has different layouts on different ranks (fingerprints "
            f"{fingerprints.tolist()}); are the models or DDP's bucket_cap_mb different?")


def _layout_fingerprint(item: _Compressed) -> int:
    return fingerprint(f"{item.job.index}:{item.codec.numel(item.values)}:{item.job.layout}")


def _residual_entry(state, codec, job, count, world_size, server_range=None):
    """The bucket's residual entry on the codec's device, or None without error feedback."""
    if not state.error_feedback:
        return None
    return state.residual_for(job.index, job.layout, count, server_range, job.names, world_size,
                              device=codec.device)


def _finite_items(items, header, flag_column: int) -> list:
    """The items no rank flagged non-finite; the flagged ones become NaN on every rank.

    Every rank saw the same flags, so every rank poisons the same buckets (AMP then skips the
    step everywhere), keeps their residuals as they were, and leaves them out of the exchanges
    that follow, whose result would be NaN.
    """
    finite = []
    for k, item in enumerate(items):
        if header[:, k, flag_column].any():
            item.codec.fill_nan(item.values)
        else:
            finite.append(k)
    return finite


def _framed(state, phase: str, items, header, outgoing, group, device) -> tuple:
    """One exchange of ``items`` (see :func:`threelc.hooks.collectives.exchange_framed`), with the
    slots of the exchanges of the same phase and buckets before it when headers travel inline."""
    key = (phase, items[0].job.index, len(items))
    slots = state._slots.for_exchange(key) if state._plan.header == "inline" else None
    headers, sizes, received = collectives.exchange_framed(header, outgoing, slots, group, device, state._stats)
    state._slots.record(key, sizes, slots)
    return headers.reshape(headers.shape[0], len(items), -1), received


def _allgather_mean(state, items, group, rank, world_size, device) -> None:
    """Each rank sends its compressed buckets to all others; all decode the N payloads of each."""
    stats = state._stats
    codec = items[0].codec
    own = collectives.concat_payloads([item.payloads[0] for item in items], items[0].payloads[0][:0])
    header, received = _framed(
        state, "allgather", items,
        [value for item in items for value in (_layout_fingerprint(item), codec.nbytes(item.payloads[0]),
                                                item.nonfinite)],
        [own[:0] if j == rank else own for j in range(world_size)], group, device)
    for k, item in enumerate(items):
        _check_layouts(header[:, k, 0], item.job.index)
    finite = _finite_items(items, header, 2)
    if not finite:
        return
    received[rank] = own
    per_sender = [collectives.split_payload(payload, header[sender, :, 1]) for sender, payload in enumerate(received)]
    _feedback(stats, codec, [(items[k].values, items[k].payloads[0], items[k].worker, items[k].kept[0])
                             for k in finite if items[k].worker is not None])
    with stats.timer("decompress_s"), codec.lock():
        # 0 + a == a exactly, so decoding the first payload in place equals adding it to zeros.
        # Every rank decodes the same bytes in the same order, so a corrupt payload stops every
        # rank at the same sender with the same message.
        for k in finite:
            item = items[k]
            for sender in range(world_size):
                faults.decode_checked(codec.decompress if sender == 0 else codec.decompress_add,
                                      per_sender[sender][k], item.values, bucket=item.job.index, sender=sender)
            codec.divide(item.values, world_size)


def _feedback(stats, codec, updates) -> None:
    """Error feedback once the step is known to be finite: ``residual = v - decoded`` for each
    ``(v, own payload, residual, kept)`` (``kept``: ``v`` already holds that difference, which
    the encoder wrote; see the codec's ``compress``).  Deferring it is what makes the non-finite
    rollback free: a step that turns out non-finite never touched the residual, so no backup
    copy is kept.

    An own payload damaged since it was made fails here (when decoded: not ``kept``) on this
    rank only; the error is left to the decoding of the payloads in rank order that follows,
    which fails on every rank alike (``kept`` or not).
    """
    with stats.timer("compress_s"), codec.lock():
        for values, payload, residual, kept in updates:
            try:
                codec.feedback(values, payload, residual, kept)
            except threelc.FormatError:
                return


def _scatter_reduce_mean(state, items, group, rank, world_size, device) -> None:
    """Shard j of every rank goes to rank j, which averages, recompresses and shares it."""
    stats = state._stats
    codec = items[0].codec
    empty = items[0].payloads[0][:0]

    # Scatter-reduce: shard j of every bucket goes to rank j, in one all-to-all.
    header, received = _framed(
        state, "scatter", items,
        [value for item in items
         for value in (_layout_fingerprint(item), item.nonfinite, *map(codec.nbytes, item.payloads))],
        [empty if j == rank else collectives.concat_payloads([item.payloads[j] for item in items], empty)
         for j in range(world_size)], group, device)
    for k, item in enumerate(items):
        _check_layouts(header[:, k, 0], item.job.index)
    finite = _finite_items(items, header, 1)
    if not finite:
        return
    per_sender = [[item.payloads[rank] for item in items] if sender == rank
                  else collectives.split_payload(payload, header[sender, :, 2 + rank])
                  for sender, payload in enumerate(received)]

    # This rank's shard of each bucket: average in rank order, add the server residual, compress
    # again.  A corrupt shard payload reaches this rank only: its report replaces the compressed mean.
    means = [_shard_mean(state, codec, items[k], [per_sender[sender][k] for sender in range(world_size)],
                         rank, world_size) for k in finite]

    # Allgather the compressed means; every rank, the owner too, decodes the same bytes.
    own = collectives.concat_payloads([mean_payload for mean_payload, _, _, _, _ in means], empty)
    mean_header, received = _framed(
        state, "means", [items[k] for k in finite],
        [value for mean_payload, report, nonfinite, _, _ in means
         for value in (codec.nbytes(mean_payload), report, nonfinite)],
        [empty if j == rank else own for j in range(world_size)], group, device)
    received[rank] = own
    mean_payloads = [collectives.split_payload(payload, mean_header[owner, :, 0])
                     for owner, payload in enumerate(received)]
    for position, k in enumerate(finite):
        reporters = np.flatnonzero(mean_header[:, position, 1] != faults.NO_REPORT)
        if reporters.size:
            owner = int(reporters[0])  # the same report on every rank
            raise faults.CorruptPayloadError(codec.payload_text(mean_payloads[owner][position]),
                                             bucket=items[k].job.index, sender=int(mean_header[owner, position, 1]),
                                             receiver=owner)
    for position, k in enumerate(finite):
        item, (mean_payload, _, _, shard_mean, mean_kept) = items[k], means[position]
        if mean_header[:, position, 2].any():
            codec.fill_nan(item.values)
            continue
        if item.worker is not None:
            _feedback(stats, codec, [(item.values[shard], shard_payload, item.worker[shard], kept)
                                     for shard, shard_payload, kept in zip(item.shards, item.payloads, item.kept)]
                      + [(shard_mean, mean_payload, item.server, mean_kept)])
        with stats.timer("decompress_s"), codec.lock():
            for owner in range(world_size):
                faults.decode_checked(codec.decompress, mean_payloads[owner][position], item.values[item.shards[owner]],
                                      bucket=item.job.index, sender=owner)


def _shard_mean(state, codec, item, received, rank, world_size) -> tuple:
    """This rank's shard of one bucket, averaged over the received shard payloads, plus its
    server residual, compressed again.  Returns ``(payload, report, nonfinite, shard mean, kept)``
    (``kept``: the shard mean now holds the new server residual; see the codec's ``compress``); a
    corrupt shard payload makes the payload the error's text and the report its sender."""
    own = item.shards[rank]
    shard_mean = codec.zeros(own.stop - own.start)
    try:
        with state._stats.timer("decompress_s"), codec.lock():
            for sender, rank_payload in enumerate(received):
                faults.decode_checked(codec.decompress_add, rank_payload, shard_mean, bucket=item.job.index,
                                      sender=sender, receiver=rank)
            codec.divide(shard_mean, world_size)
    except faults.CorruptPayloadError as error:
        return codec.text_payload(str(error)), error.sender, False, shard_mean, False
    with state._stats.timer("compress_s"):
        mean_payload, nonfinite, kept = codec.compress(shard_mean, item.segments[rank], item.server)
    return mean_payload, faults.NO_REPORT, nonfinite, shard_mean, kept


# ---------------------------------------------------------------------------- beyond DDP's buckets
def average(state: ThreeLCState, tensor: torch.Tensor, index: int = 0, layout: tuple | None = None) -> torch.Tensor:
    """Average a flat float tensor across the state's ranks through 3LC, in place, as the hook
    averages a bucket (the same codec, collectives, exchange plan and error feedback; residuals
    under ``index``), and exchange it at once (never held back for coalescing).

    For callers outside DDP's backward, such as the outer sync of :mod:`threelc.hooks.local`.
    ``layout``: the sizes of the tensors flattened into ``tensor`` (the scale units; default one).
    A collective: every rank calls it with the same index and layout.  Returns ``tensor``.
    """
    layout = tuple(int(size) for size in layout) if layout is not None else (int(tensor.numel()),)
    future = collectives.future_for(tensor)
    job = _BucketJob(buffer=tensor, index=index, is_last=False, iteration=state.iteration, compress=True,
                     layout=layout, segments=layout, transposed=(), names=None,
                     check_config=not state._config_checked, future=future, exchange_now=True)
    state._config_checked = True
    state.worker().submit(functools.partial(_run_job, state, job))
    state.wait()
    faults.raise_pending(state)
    return future.wait()
