"""ThreeLCState: the 3LC hook's configuration and internal state (residuals, iteration, stats)."""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from threelc import format as payload_format
from threelc.codec import check_sparsity

from . import never_called
from .codecs import CODECS
from .plan import Plan, Slots, Trial, collective_option
from .stats import HookStats
from .worker import BucketWorker

__all__ = ["ThreeLCState", "COLLECTIVES", "HEADERS", "SCALES", "DEFAULT_BLOCK_SIZE", "ConfigMismatchError", "StateOwnerError", "merge_state_dicts"]

logger = logging.getLogger(__name__)

COLLECTIVES = ("auto", "allgather", "scatter_reduce")
HEADERS = ("auto", "separate", "inline")
SCALES = ("tensor", "bucket", "block")
#: Values per scale under ``scale="block"`` when neither the state nor a paired optimizer says.
DEFAULT_BLOCK_SIZE = 8192
#: Version of the dictionary :meth:`ThreeLCState.state_dict` returns.  Version 2 added the
#: ``owner`` record (rank and world size); version 1 dicts still load, unchecked, with a warning.
STATE_DICT_VERSION = 2
#: Environment variable naming the statistics folder when ``stats_dir`` is not given.
STATS_DIR_ENV = "THREELC_STATS_DIR"


class ConfigMismatchError(RuntimeError):
    """The ranks of one process group run the hook with different configurations or buckets."""


class StateOwnerError(ValueError):
    """A state dict saved by another rank, or by a run with another world size, was loaded."""


class _BucketResidual:
    """Error-feedback memory of one bucket: the worker residual and, for scatter-reduce, the
    server residual of the shard this rank owns (``server_start`` is its offset in the bucket).
    ``layout`` is the tuple of parameter sizes the residuals were made for, and ``names`` the
    parameters' names when the state knows them (see :meth:`ThreeLCState.bind_parameters`).

    The residuals are float32 torch tensors on the device of the codec that uses them: host
    memory for the numba codec (which works on ``Tensor.numpy()`` views of them, sharing the
    memory), the bucket's device for the torch codec.  No backup copies: the hook updates them only
    once every rank's payload is known to be finite, so a skipped step leaves them untouched."""

    __slots__ = ("layout", "names", "worker", "server", "server_start")

    def __init__(self, layout: tuple, worker: torch.Tensor, server: torch.Tensor | None = None,
                 server_start: int = 0, names: tuple | None = None):
        self.layout = layout
        self.names = names
        self.worker = worker
        self.server = server
        self.server_start = server_start

    @property
    def device(self) -> torch.device:
        return self.worker.device

    def to(self, device: torch.device) -> None:
        """Move the residuals to ``device``, in place."""
        self.worker = self.worker.to(device)
        if self.server is not None:
            self.server = self.server.to(device)

    def fold_server(self, world_size: int) -> None:
        """Move the server residual into the worker residual, keeping what is owed unchanged.

        The mean owes ``server`` directly but only ``worker / world_size``; adding
        ``world_size * server`` to the worker residual keeps the owed total exact when the shard
        this rank owns changes (a new bucket layout, a new world size).
        """
        if self.server is not None:
            stop = self.server_start + self.server.numel()
            # float32 arithmetic, as numpy's float32 scalar times a float32 array.
            self.worker[self.server_start:stop] += self.server.to(self.worker.device) * float(np.float32(world_size))
        self.server = None

    def tensors(self) -> list:
        return [tensor for tensor in (self.worker, self.server) if tensor is not None]


class ThreeLCState:
    r"""Configuration and state of :func:`~threelc.hooks.threelc_hook`.

    3LC (Lim, Andersen, Kaminsky, "3LC: Lightweight and Effective Traffic Compression for
    Distributed Machine Learning", MLSys 2019, arXiv:1802.07389) compresses each gradient bucket
    in three steps, with error feedback around them:

    1. error feedback: ``v = gradient + residual`` (the residual is this rank's float32 memory of
       what earlier steps failed to send);
    2. 3-value quantization with sparsity multiplication: per scale unit (a parameter tensor, the
       bucket, or a block), ``M = max|v|`` and ``q = round(v / (M * sparsity))`` in {-1, 0, +1};
    3. base-3^5 packing: five ternary digits per byte (1.6 bits per value);
    4. zero-run encoding: runs of 2..14 all-zero bytes become one byte;
    5. ``residual = v - decompress(payload)``.

    The hook then exchanges payloads (``collective``) and every rank decodes the same bytes in
    the same order, so all replicas apply the same, bitwise identical, averaged gradient.

    Parameters
    ----------
    process_group : ProcessGroup, optional
        The group to average over; ``None`` means the default (world) group.
    sparsity : float, default 1.0
        The sparsity multiplier s in (0, 2): larger s zeroes more values (smaller payloads).
        The paper's range is [1, 2); s < 1 sets the scale below each unit's largest value
        (denser payloads, less delay in error feedback; see docs/HOOK.md).
    collective : {"auto", "allgather", "scatter_reduce"}, default "auto"
        ``"allgather"``: every rank sends its compressed bucket to every other rank and averages
        the N decoded payloads; bytes per rank ~ (N - 1) C.  ``"scatter_reduce"``: shard j of
        every rank's bucket goes to rank j, which averages, adds its server residual, compresses
        again, and all ranks gather the compressed shards; bytes per rank ~ 2 (N - 1) / N C,
        like a ring allreduce, at the price of a second lossy step and twice the collectives.
        ``"auto"`` picks allgather for world sizes up to 2 (the bytes are the same there, and it
        quantizes once); above, the collective with the smaller modelled step time, from a cost
        model of the link and codec measured once at the first compressed bucket, agreed by
        every rank (:mod:`threelc.hooks.plan`): allgather's two collectives win on far links,
        scatter-reduce's fewer bytes and O(bucket) decoding on fast ones.
    coalesce : bool or "auto", default "auto"
        Exchange the step's compressed buckets together, after its last bucket: one exchange per
        step instead of one per bucket (a round trip each), at the price of the overlap of
        earlier buckets' exchanges with backward.  ``"auto"`` decides with the collective, from
        the same measured cost model.  The plan taken is kept in :meth:`state_dict`.
    header : {"auto", "separate", "inline"}, default "auto"
        How receivers learn the compressed payloads' sizes, which gloo needs before the
        collective that carries them.  ``"separate"``: a small header exchange before each payload
        collective (one more round trip; exact sizes, no padding).  ``"inline"``: the header
        travels in the payload's collective, whose messages are padded to slots sized from the
        previous steps' payloads; one that outgrows its slot sends the rest in a second collective
        (see :mod:`threelc.hooks.plan`).  ``"auto"`` decides with the collective, from the same
        measured cost model (inline on far links); ``"separate"`` when ``collective`` and
        ``coalesce`` are both given, since then nothing is measured.
    scale : {"tensor", "bucket", "block"}, default "block"
        One scale (max |v|) per ``block_size`` values of each parameter tensor; one per parameter
        tensor of the bucket, as in the paper; or one per bucket (or shard).  See docs/HOOK.md
        for the accuracy-per-byte measurements behind the default: on a 2M-parameter CNN with 4
        ranks, one scale per tensor lets a few outliers silence the rest of a large tensor and
        lost 5-10 points of accuracy, while blocks of 8192 kept allreduce's accuracy at ~50x.
    block_size : int, optional
        Values per scale with ``scale="block"``.  Default: 8192, or the paired optimizer's
        ``hook_block_size`` (512 for ``threelc.optim.AdamW``'s default ``compress="momentum"``:
        a momentum is smooth, so its payloads are sparse and finer scales pay for themselves;
        docs/benchmarks.md).  A value given here wins over the optimizer's.
    start_iter : int, default 10
        Iterations that use plain allreduce before compression starts; must be >= 2 because
        DDP rebuilds its buckets after the first iteration, which changes bucket sizes.
        Compressing from the very first steps can also cost accuracy for good.
    min_numel : int, default 1024
        Buckets with fewer values are averaged with plain allreduce: compressing them saves
        fewer bytes than the payload header and a second collective cost.
    error_feedback : bool, default True
        Keep residuals (worker and server).  Without them 3LC is biased and loses accuracy.
    stats_dir : str, optional
        Append one JSON line per step to ``{stats_dir}/hook-rank{rank}.jsonl``; defaults to the
        environment variable ``THREELC_STATS_DIR``, and to no log when neither is set.  The
        folder is created and checked to be writable at construction (ValueError otherwise).
    stats_every : int, default 1
        Log only the steps whose index is a multiple of ``stats_every`` (a line is ~300 bytes).
    stats_max_bytes : int, optional
        Stop appending to the log once it would grow beyond this many bytes (one warning).
    codec_threads : int, optional
        Threads of the numba codec kernels in this process.  By default the cores numba sees
        divided by torchrun's ``LOCAL_WORLD_SIZE`` (at least 1): every worker's kernels would
        otherwise use every core, and 4 workers on 2 cores ran 3LC steps 13x slower.  A
        per-process setting, so ranks may differ (it is not part of the configuration check).
    codec : {"auto", "numba", "torch"}, default "auto"
        Which implementation of the codec runs.  ``"numba"``: the numba kernels on host memory
        (a CUDA bucket goes through a float32 host copy, and payloads through host memory).
        ``"torch"``: the vectorized torch codec on the bucket's device; values, residuals,
        payloads and (with a CUDA-capable backend such as NCCL) the collectives stay there.
        ``"auto"`` picks ``"torch"`` for CUDA buckets and ``"numba"`` otherwise (on CPU the numba
        kernels are faster).  Both produce the same bytes and bitwise the same results, so this is
        a per-process setting like ``codec_threads``: ranks may differ, and it is not part of the
        configuration check.  Forcing ``"torch"`` on CPU is what the tests use to run the device
        path with gloo.

    Residuals live in the state, per bucket; :meth:`bind_parameters` (called by
    :func:`~threelc.hooks.register`) lets them follow parameters across DDP's bucket rebuilds.
    :meth:`state_dict` / :meth:`load_state_dict` checkpoint them; :meth:`stats` reports traffic.

    Raises
    ------
    ValueError
        If an option is out of range; the message says which and why.

    Examples
    --------
    >>> state = ThreeLCState(process_group=None, sparsity=1.0)       # doctest: +SKIP
    >>> ddp_model.register_comm_hook(state, threelc_hook)              # doctest: +SKIP
    """

    def __init__(
        self,
        process_group=None,
        *,
        sparsity: float = 1.0,
        collective: str = "auto",
        coalesce: bool | str = "auto",
        header: str = "auto",
        scale: str = "block",
        block_size: int | None = None,
        start_iter: int = 10,
        min_numel: int = 1024,
        error_feedback: bool = True,
        stats_dir: str | None = None,
        stats_every: int = 1,
        stats_max_bytes: int | None = None,
        codec_threads: int | None = None,
        codec: str = "auto",
    ):
        # Hyperparameters.
        sparsity32 = check_sparsity(sparsity)
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
        if not (isinstance(coalesce, bool) or coalesce == "auto"):
            raise ValueError(f"coalesce must be True, False or 'auto', got {coalesce!r}")
        if header not in HEADERS:
            raise ValueError(f"header must be one of {HEADERS}, got {header!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if block_size is not None and (not _is_int(block_size) or not 1 <= block_size < 2**32):
            raise ValueError(f"block_size must be a positive integer below 2**32 or None, got {block_size!r}")
        if not _is_int(start_iter) or start_iter < 2:
            # DDP rebuilds its buckets after the first iteration; residuals made for the first
            # layout would not fit the second.
            raise ValueError(f"start_iter must be an integer >= 2 because DDP rebuilds its buckets after the "
                             f"first iteration, got {start_iter!r}")
        if not _is_int(min_numel) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative integer, got {min_numel!r}")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        if stats_dir is None:
            stats_dir = os.environ.get(STATS_DIR_ENV) or None
        if stats_dir is not None and not isinstance(stats_dir, (str, os.PathLike)):
            raise ValueError(f"stats_dir must be a path or None, got {stats_dir!r}")
        if not _is_int(stats_every) or stats_every < 1:
            raise ValueError(f"stats_every must be a positive integer, got {stats_every!r}")
        if stats_max_bytes is not None and (not _is_int(stats_max_bytes) or stats_max_bytes < 1):
            raise ValueError(f"stats_max_bytes must be a positive integer or None, got {stats_max_bytes!r}")
        if codec_threads is None:
            codec_threads = default_codec_threads()
        if not _is_int(codec_threads) or codec_threads < 1:
            raise ValueError(f"codec_threads must be a positive integer or None, got {codec_threads!r}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS} ('auto': the torch codec for CUDA buckets, the numba "
                             f"codec otherwise), got {codec!r}")

        self.process_group = process_group
        self.sparsity = float(sparsity32)
        self.collective = collective
        self.coalesce = coalesce
        self.header = header
        self.scale = scale
        #: As configured: None means DEFAULT_BLOCK_SIZE or the paired optimizer's (resolved_block_size).
        self.block_size = None if block_size is None else int(block_size)
        self.start_iter = int(start_iter)
        self.min_numel = int(min_numel)
        self.error_feedback = error_feedback
        self.stats_dir = os.fspath(stats_dir) if stats_dir is not None else None
        self.stats_every = int(stats_every)
        self.stats_max_bytes = None if stats_max_bytes is None else int(stats_max_bytes)
        self.codec_threads = int(codec_threads)
        self.codec = codec

        # Internal state.
        #: Iterations completed (advanced when DDP hands over the last bucket of an iteration).
        self.iteration = 0
        self._residuals: dict[int, _BucketResidual] = {}
        # Residuals displaced by a bucket layout change, kept for one return: after a restart,
        # DDP's first iteration uses its initial buckets before rebuilding the saved layout.
        self._parked: dict[int, _BucketResidual] = {}
        # With parameter names (bind_parameters), residuals follow parameters across bucket
        # layouts instead: name -> (entry, offset, size) of the latest copy of its residual.
        self._parameter_names: dict[int, str] = {}
        self._by_name: dict[str, tuple] = {}
        self._stats = HookStats(self.stats_dir, self.stats_every, self.stats_max_bytes)
        self._worker: BucketWorker | None = None
        self._config_checked = False
        #: How compressed buckets are exchanged (:class:`threelc.hooks.plan.Plan`), decided at the
        #: first compressed bucket; the measured trial of both collectives while one runs
        #: (:class:`threelc.hooks.plan.Trial`); buckets compressed and waiting for a coalesced exchange.
        self._plan = None
        self._trial = None
        self._pending: list = []
        #: Slot sizes of inline-header exchanges (:class:`threelc.hooks.plan.Slots`; not saved).
        self._slots = Slots()
        #: Buckets and values of the last complete step (for the plan's cost model).
        self.step_buckets, self.step_values = 0, 0
        self._step_buckets_seen, self._step_numel = 0, 0
        #: The paired threelc optimizer (``register(..., optimizer=)``): its schedule decides which
        #: iterations are compressed, instead of ``start_iter``.
        self.optimizer = None
        # The first exception of a bucket job: later jobs fail fast instead of issuing
        # collectives that the other ranks may never match.
        self._failure: BaseException | None = None
        # (rank, world size) of a loaded state dict, until checked against this process's.
        self._saved_owner: tuple[int, int] | None = None
        # Whether DDP ever called the hook with this state (see never_called: a warning if not).
        self._hook_called = False
        self._never_called_warned = False
        never_called.watch(self)
        logger.info("threelc: %r", self)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict:
        """The hyperparameters as a JSON-able dict (``ThreeLCState(**config)`` rebuilds them)."""
        return {"sparsity": self.sparsity, "collective": self.collective, "coalesce": self.coalesce,
                "header": self.header, "scale": self.scale,
                "block_size": self.block_size, "start_iter": self.start_iter, "min_numel": self.min_numel,
                "error_feedback": self.error_feedback, "stats_dir": self.stats_dir,
                "stats_every": self.stats_every, "stats_max_bytes": self.stats_max_bytes}

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"ThreeLCState({options})"

    def group(self):
        """The process group in use (the default group when none was given)."""
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def resolved_collective(self, world_size: int) -> str:
        """The collective in use: the configured one, or the plan's once decided (``"auto"``
        before the first compressed bucket at more than 2 ranks; see :mod:`threelc.hooks.plan`)."""
        if self._plan is not None:
            return self._plan.collective
        return collective_option(self.collective, world_size)

    def plan(self) -> dict | None:
        """The exchange plan (collective, coalesce, and why), or None before the first compressed bucket."""
        return None if self._plan is None else self._plan.as_dict()

    def record_bucket(self, numel: int, is_last: bool) -> None:
        """Count a bucket of the current step; the last one closes the step's shape."""
        self._step_numel += int(numel)
        self._step_buckets_seen += 1
        if is_last:
            self.step_buckets, self.step_values = self._step_buckets_seen, self._step_numel
            self._step_buckets_seen, self._step_numel = 0, 0

    def codec_options(self) -> dict:
        """Keyword arguments of :func:`threelc.compress` for this configuration."""
        return {"sparsity": self.sparsity, "block": self.resolved_block_size() if self.scale == "block" else None}

    def resolved_block_size(self) -> int:
        """Values per scale in use: ``block_size`` when given, else the paired optimizer's
        ``hook_block_size`` when it has one, else :data:`DEFAULT_BLOCK_SIZE`."""
        if self.block_size is not None:
            return self.block_size
        preferred = None if self.optimizer is None else self.optimizer.hook_block_size
        return DEFAULT_BLOCK_SIZE if preferred is None else preferred

    def fingerprint_text(self, world_size: int, iteration: int) -> str:
        """What every rank must agree on before compressed steps: format, options, iteration."""
        return (f"format={payload_format.VERSION} sparsity={np.float32(self.sparsity)!r} "
                f"collective={self.resolved_collective(world_size)} coalesce={self.coalesce} header={self.header} "
                f"plan={None if self._plan is None else (self._plan.collective, self._plan.coalesce, self._plan.header)} "
                f"scale={self.scale} "
                f"block_size={self.resolved_block_size()} start_iter={self.start_iter} min_numel={self.min_numel} "
                f"error_feedback={self.error_feedback} world_size={world_size} iteration={iteration} "
                f"optimizer={None if self.optimizer is None else self.optimizer.schedule_text()}")

    # ------------------------------------------------------------------ residuals
    def bind_parameters(self, module) -> None:
        """Learn the module's parameter names, so residuals follow parameters, not buckets.

        :func:`~threelc.hooks.register` calls this.  With names, a bucket whose layout changes
        (DDP's rebuild after iteration 1; DDP's initial layout in the first iteration after a
        restart) takes each parameter's residual from wherever it was, instead of starting from
        zero; checkpoints record the names.  Without names, residuals are keyed by bucket index
        and layout only.
        """
        self._parameter_names = {id(parameter): name for name, parameter in module.named_parameters()}

    def parameter_names(self, parameters, index: int, padding: int) -> tuple | None:
        """Names of a bucket's parameters (plus its padding), or None if any is unknown."""
        if not self._parameter_names:
            return None
        names = tuple(self._parameter_names.get(id(parameter)) for parameter in parameters)
        if None in names:
            return None
        return names + ((f"<padding of bucket {index}>",) if padding > 0 else ())

    def residual_for(self, index: int, layout: tuple, count: int, server_range: tuple | None = None,
                     names: tuple | None = None, world_size: int = 1, device=None) -> _BucketResidual:
        """The bucket's residuals, created on first use or when its layout changed.

        ``server_range`` is the ``(start, stop)`` of the shard this rank owns (scatter-reduce);
        None (allgather) folds a server residual left by scatter-reduce into the worker residual.
        ``device`` is where the codec wants them (default: host memory); an entry elsewhere (a
        loaded checkpoint, another codec) is moved there.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        entry = self._residuals.get(index)
        if (entry is None or entry.layout != layout
                or (names is not None and (entry.names != names or not self._holds_latest(entry)))):
            if names is not None:
                entry = self._migrated(layout, count, names, world_size, device)
            else:
                entry = self._unparked(index, entry, layout, count, device)
            self._residuals[index] = entry
        if entry.device != device:
            entry.to(device)
        if server_range is None:
            entry.fold_server(world_size)  # allgather after scatter-reduce (a plan's switch, a checkpoint)
        else:
            start, stop = server_range
            if entry.server is None or entry.server_start != start or entry.server.numel() != stop - start:
                entry.fold_server(world_size)
                entry.server = torch.zeros(stop - start, dtype=torch.float32, device=device)
                entry.server_start = start
        return entry

    def _holds_latest(self, entry: _BucketResidual) -> bool:
        """Whether no other entry took over one of this entry's parameters since."""
        return all(self._by_name.get(name, (None,))[0] is entry for name in entry.names)

    def _migrated(self, layout: tuple, count: int, names: tuple, world_size: int,
                  device: torch.device) -> _BucketResidual:
        """A new entry whose parameters bring their residuals from the entries that held them."""
        entry = _BucketResidual(layout, torch.zeros(count, dtype=torch.float32, device=device), names=names)
        offset = 0
        for name, size in zip(names, layout):
            source = self._by_name.get(name)
            if source is not None and source[2] == size:
                source_entry, source_offset, _ = source
                source_entry.fold_server(world_size)
                entry.worker[offset:offset + size] = source_entry.worker[source_offset:source_offset + size].to(device)
            self._by_name[name] = (entry, offset, size)
            offset += size
        return entry

    def _unparked(self, index: int, entry, layout: tuple, count: int, device: torch.device) -> _BucketResidual:
        """Without names: zero residuals for a new layout; the old ones wait for its return."""
        parked = self._parked.pop(index, None)
        if entry is not None:
            logger.info("threelc: bucket %d changed layout (%d -> %d values); its residuals are set aside",
                        index, entry.worker.numel(), count)
            self._parked[index] = entry
        if parked is not None and parked.layout == layout:
            return parked
        return _BucketResidual(layout, torch.zeros(count, dtype=torch.float32, device=device))

    def memory_bytes(self) -> int:
        """Bytes of every tensor the state holds (residuals, including any set aside).

        With error feedback: 4 bytes per compressed gradient value (the worker residual), plus
        4 / N per value for scatter-reduce's server residual of this rank's shard.
        """
        entries = [*self._residuals.values(), *self._parked.values()]
        return sum(tensor.numel() * tensor.element_size() for entry in entries for tensor in entry.tensors())

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """This rank's statistics: ``{"step": {...}, "total": {...}}``.

        Keys of both: step, rank, world_size, raw_bytes, sent_bytes, received_bytes, ratio,
        compressed, compress_s, decompress_s, comm_s (see :mod:`threelc.hooks.stats`).
        """
        self.wait()
        return self._stats.snapshot()

    # ------------------------------------------------------------------ worker
    def worker(self) -> BucketWorker:
        """The FIFO worker thread, started on first use (and again after unpickling)."""
        if self._worker is None or not self._worker.alive:
            self._worker = BucketWorker(codec_threads=self.codec_threads)
        return self._worker

    def wait(self) -> None:
        """Block until every bucket handed to the hook so far has been processed."""
        if self._worker is not None:
            self._worker.drain()

    def close(self) -> None:
        """Stop the worker thread (it restarts if the hook is called again)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Residuals (worker and server, including any set aside by a layout change), iteration
        count, cumulative statistics, the configuration, and the owner: this rank and the world
        size of the state's process group.

        Residuals differ between ranks: every rank saves and loads its own, and
        :meth:`load_state_dict` refuses another rank's (see :func:`merge_state_dicts` for a new
        world size).  Tensors are CPU float32 copies, so ``torch.save`` works on the result.
        """
        self.wait()
        rank, world_size = self._owner()
        return {"version": STATE_DICT_VERSION, "owner": {"rank": rank, "world_size": world_size},
                "config": self.config(), "iteration": self.iteration,
                "residuals": _export(self._residuals), "parked": _export(self._parked),
                "plan": self.plan(), "trial": None if self._trial is None else self._trial.as_dict(),
                "stats": self._stats.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (hyperparameters stay as constructed).

        Raises :class:`StateOwnerError` if the state dict belongs to another rank or world size
        (checked now when the process group exists, else on the hook's first call).  A dict from
        :func:`merge_state_dicts` loads on any rank.  Version 1 dicts, which have no owner
        record, load unchecked, with a warning.
        """
        self.wait()
        version = state_dict.get("version")
        if version not in (1, STATE_DICT_VERSION):
            raise ValueError(f"unsupported ThreeLCState state_dict version {version!r} "
                             f"(this version reads 1 and {STATE_DICT_VERSION})")
        if version == 1:
            logger.warning("threelc: loading a version 1 state dict: it does not record its rank or world size, "
                           "so nothing checks that it is this rank's own; save it again to get the check")
        owner = state_dict.get("owner") or {}
        self._saved_owner = None if owner.get("rank") is None else (int(owner["rank"]), int(owner["world_size"]))
        if dist.is_available() and dist.is_initialized():
            self.check_owner()
        saved = state_dict.get("config", {})
        changed = {key: (saved[key], value) for key, value in self.config().items()
                   if key in saved and saved[key] != value and not key.startswith("stats_")}
        if changed:
            logger.warning("threelc: loading a state saved with other options (saved, now): %s", changed)
        self.iteration = int(state_dict["iteration"])
        self._residuals = _import(state_dict["residuals"])
        self._parked = _import(state_dict.get("parked", {}))
        self._by_name = {}
        for entry in self._residuals.values():
            if entry.names is not None:
                offsets = np.concatenate([[0], np.cumsum(entry.layout, dtype=np.int64)])
                self._by_name.update({name: (entry, int(offset), int(size))
                                      for name, offset, size in zip(entry.names, offsets, entry.layout)})
        self._stats.load_state_dict(state_dict["stats"])
        saved_plan = state_dict.get("plan")
        self._plan = None if saved_plan is None else Plan(**saved_plan)
        saved_trial = state_dict.get("trial")
        self._trial = None if saved_trial is None else Trial.from_dict(saved_trial)
        self._slots = Slots()  # every rank loads, so every rank starts its slots afresh
        self._pending = []
        self._failure = None
        self._config_checked = False

    def _owner(self) -> tuple[int, int]:
        """(rank, world size) in the state's process group; (0, 1) without one."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        group = self.group()
        return dist.get_rank(group), dist.get_world_size(group)

    def check_owner(self) -> None:
        """Raise :class:`StateOwnerError` if the loaded state dict is another rank's or world size's.

        :meth:`load_state_dict` calls it when the process group exists, the hook on its first
        call otherwise (a state loaded before ``init_process_group``).
        """
        if self._saved_owner is None:
            return
        (saved_rank, saved_world_size), (rank, world_size) = self._saved_owner, self._owner()
        self._saved_owner = None
        if saved_world_size != world_size:
            raise StateOwnerError(
                f"threelc: this hook state was saved by rank {saved_rank} of {saved_world_size} ranks, but this run "
                f"has {world_size}.  Residuals are gradient mass not yet applied, so they are not dropped "
                f"silently: merge every rank's state dict with threelc.hooks.merge_state_dicts(...) and load the "
                f"result on every rank (the integrations do this with reshard=True), or resume with {saved_world_size} "
                f"ranks.")
        if saved_rank != rank:
            raise StateOwnerError(
                f"threelc: rank {rank} loaded the hook state of rank {saved_rank}: residuals differ between ranks, "
                f"so every rank must load its own (e.g. torch.save(state.state_dict(), f'threelc-rank{{rank}}.pt') "
                f"on every rank, not only on rank 0; threelc.integrations does this for Lightning, Accelerate and "
                f"the Hugging Face Trainer).")

    def __getstate__(self) -> dict:
        # The process group, the worker thread and its lock cannot be pickled; like PyTorch's
        # PowerSGDState, a pickled state uses the default group once unpickled.
        return {"config": self.config(), "state": self.state_dict(),
                "process": {"codec": self.codec}}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(process_group=None, **pickled["config"], **pickled.get("process", {}))
        self.load_state_dict(pickled["state"])


def merge_state_dicts(state_dicts: list) -> dict:
    """Merge every rank's state dict into one that any rank of any world size can load.

    For a new world size.  What the averaged gradient still owes is, per value,
    ``sum_r worker_r / N + sum_r server_r`` (a rank's worker residual reaches the mean divided by
    N, a server residual directly); folding each server residual into its rank's worker residual
    as ``N * server`` makes it ``sum_r worker_r / N``.  Every rank of the new run starts from that
    mean as its worker residual, so with N' ranks the mean owes ``N' * mean / N'``: the same
    gradient mass, none lost.  Summed in float64, stored as float32.  The statistics are rank 0's.

    Raises ValueError unless ``state_dicts`` holds exactly one version-2 dict per rank of one run
    (same world size, iteration, configuration and bucket layouts).
    """
    owners = [state_dict.get("owner") or {} for state_dict in state_dicts]
    world_size = len(state_dicts)
    if (world_size == 0 or any(state_dict.get("version") != STATE_DICT_VERSION for state_dict in state_dicts)
            or sorted(owner.get("rank", -1) for owner in owners) != list(range(world_size))
            or any(owner.get("world_size") != world_size for owner in owners)):
        raise ValueError(f"threelc: merge_state_dicts needs the version-{STATE_DICT_VERSION} state dicts of every rank "
                         f"of one run, got owners {owners}")
    state_dicts = sorted(state_dicts, key=lambda state_dict: state_dict["owner"]["rank"])
    first = state_dicts[0]
    for state_dict in state_dicts[1:]:
        if state_dict["iteration"] != first["iteration"] or state_dict["config"] != first["config"]:
            raise ValueError("threelc: merge_state_dicts got ranks at different iterations or configurations")
    merged = {key: _merged_residuals([state_dict[key] for state_dict in state_dicts]) for key in ("residuals", "parked")}
    return {**first, **merged, "owner": {"rank": None, "world_size": None, "merged_from": world_size}}


def _merged_residuals(per_rank: list) -> dict:
    """The mean over ranks of each bucket's worker residual with its server residual folded in."""
    world_size = len(per_rank)
    merged = {}
    for index, entry in per_rank[0].items():
        total = None
        for entries in per_rank:
            other = entries.get(index)
            if other is None or list(other["layout"]) != list(entry["layout"]) or other["names"] != entry["names"]:
                raise ValueError(f"threelc: merge_state_dicts: bucket {index} differs between ranks")
            worker = _float32_tensor(other["worker"]).double()
            if other["server"] is not None:
                server = _float32_tensor(other["server"]).double()
                start = int(other.get("server_start", 0))
                worker[start:start + server.numel()] += world_size * server
            total = worker if total is None else total + worker
        merged[index] = {**entry, "worker": (total / world_size).float(), "server": None, "server_start": 0}
    if any(set(entries) != set(merged) for entries in per_rank):
        raise ValueError("threelc: merge_state_dicts: the ranks hold residuals for different buckets")
    return merged


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _export(entries: dict) -> dict:
    return {index: {"layout": list(entry.layout),
                    "names": None if entry.names is None else list(entry.names),
                    "worker": _cpu_copy(entry.worker),
                    "server": None if entry.server is None else _cpu_copy(entry.server),
                    "server_start": entry.server_start}
            for index, entry in entries.items()}


def _import(saved: dict) -> dict:
    return {int(index): _BucketResidual(tuple(int(size) for size in entry["layout"]),
                                        _float32_tensor(entry["worker"]),
                                        None if entry["server"] is None else _float32_tensor(entry["server"]),
                                        int(entry.get("server_start", 0)),
                                        None if entry.get("names") is None else tuple(entry["names"]))
            for index, entry in saved.items()}


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU float32 copy that shares no memory with the residual."""
    return tensor.detach().to("cpu", copy=True).reshape(-1)


def _float32_tensor(value) -> torch.Tensor:
    """A loaded residual as a fresh CPU float32 tensor (moved to its codec's device on first use)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True).reshape(-1))


def default_codec_threads() -> int:
    """numba's threads shared out among the workers torchrun starts on this machine."""
    import numba  # the codec's own dependency; imported here to keep the reason local

    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, numba.config.NUMBA_NUM_THREADS // max(1, local_workers))


def fingerprint(text: str) -> int:
    """A stable signed 64-bit hash of ``text`` (the same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
