"""The collectives the 3LC hook issues, on payloads of uneven sizes.

Payloads are uint8 numpy arrays (the numba codec, host memory) or uint8 torch tensors (the torch
codec, on the bucket's device); received payloads come back in the same kind, and tensors on
the same device as the ones sent.  Tensors already on the backend's device (``comm_device``)
cross no host copy: they are concatenated with ``torch.cat`` and the received buffer is split
into views.

Compressed payloads have data-dependent sizes and cannot be summed by an allreduce.  gloo has no
allgatherv, so every exchange here is two collectives: a fixed-size exchange of a small int64
header (payload sizes, plus a fingerprint that every rank checks), then an ``all_to_all_single``
with exact split sizes.  No padding crosses the wire, and a rank never sends to itself, so the byte
counts in :mod:`threelc.hooks.stats` are what the network carries.

Both collectives are ``all_to_all_single``, the header too: gloo's ``all_gather`` is a ring of
N - 1 dependent hops, so on a link with one-way delay d it costs ~2 (N - 1) d, while an all-to-all
posts every send at once and costs one round trip, ~2 d (measured with the emulator's delay line,
4 nodes, 20 ms: 124 ms against 42 ms per header; docs/LAUNCH.md).  The bytes are the same.

Every function is blocking and must be called in the same order on every rank; the hook
guarantees that by calling them from one FIFO worker thread per state (see
:mod:`threelc.hooks.worker`).

Payloads never are empty (a header alone is 48 bytes), but an exchange in which some or all
split sizes are zero is still well defined and does not hang.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .stats import HookStats

__all__ = ["comm_device", "exchange_header", "exchange_payloads", "allgather_payload", "allreduce_mean",
           "concat_payloads", "split_payload", "future_for", "shard_bounds", "segments_in_range"]


def comm_device(group, bucket_device: torch.device) -> torch.device:
    """The device whose tensors the group's backend moves: host memory wherever it can.

    gloo and MPI move CPU tensors, so payloads stay on the host; a CUDA-only backend such as NCCL
    needs the payloads copied to the bucket's device first.
    """
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or bucket_device.type == "cpu":
        return torch.device("cpu")
    return bucket_device


def exchange_header(values, group, device: torch.device, stats: HookStats) -> np.ndarray:
    """All-gather one int64 vector of the same length from every rank; returns ``[world, len]``.

    One all-to-all that sends the vector to every rank (one round trip; see the module docstring).
    """
    local = torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device)
    world_size = dist.get_world_size(group)
    gathered = torch.empty(world_size * local.numel(), dtype=torch.int64, device=device)
    with stats.timer("comm_s"):
        dist.all_to_all_single(gathered, local.repeat(world_size), group=group)
    nbytes = (world_size - 1) * local.numel() * 8
    stats.add_traffic(nbytes, nbytes)
    return gathered.cpu().numpy().reshape(world_size, local.numel())


def concat_payloads(payloads: list, empty):
    """One payload of the given payloads' bytes in order (``empty``: a zero-length one of the same kind)."""
    if not payloads:
        return empty
    if isinstance(empty, torch.Tensor):
        return torch.cat(payloads)
    return np.concatenate(payloads)


def split_payload(payload, sizes) -> list:
    """The consecutive pieces of ``payload`` with the given sizes (views)."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=offsets[1:])
    return [payload[int(offsets[i]):int(offsets[i + 1])] for i in range(len(sizes))]


def future_for(tensor: torch.Tensor) -> torch.futures.Future:
    """An empty future for a hook's result; a CUDA tensor's future records its device."""
    return torch.futures.Future(devices=[tensor.device]) if tensor.is_cuda else torch.futures.Future()


def _nbytes(payload) -> int:
    return int(payload.numel()) if isinstance(payload, torch.Tensor) else int(payload.size)


def exchange_payloads(outgoing, receive_sizes, group, device: torch.device, stats: HookStats) -> list:
    """Send ``outgoing[j]`` to rank j and receive ``receive_sizes[i]`` bytes from each rank i.

    ``outgoing[rank]`` and ``receive_sizes[rank]`` must be empty/zero: a rank keeps its own
    payload.  ``outgoing`` holds uint8 numpy arrays or uint8 tensors (all on one device).
    Returns the received payloads, indexed by source rank: numpy arrays for numpy input, else
    tensors on the device of the tensors sent (views of one receive buffer).
    """
    send_sizes = [_nbytes(payload) for payload in outgoing]
    receive_sizes = [int(size) for size in receive_sizes]
    tensors = bool(outgoing) and isinstance(outgoing[0], torch.Tensor)
    if tensors:
        payload_device = outgoing[0].device
        send = torch.cat(list(outgoing)).to(device)
    else:
        send = torch.from_numpy(np.concatenate(outgoing) if outgoing else np.zeros(0, np.uint8)).to(device)
    receive = torch.empty(sum(receive_sizes), dtype=torch.uint8, device=device)
    with stats.timer("comm_s"):
        dist.all_to_all_single(receive, send, output_split_sizes=receive_sizes, input_split_sizes=send_sizes,
                               group=group)
    stats.add_traffic(sum(send_sizes), sum(receive_sizes))
    if tensors:
        return list(torch.split(receive.to(payload_device), receive_sizes))
    return split_payload(receive.cpu().numpy(), receive_sizes)


def allgather_payload(payload, sizes, group, device: torch.device, stats: HookStats) -> list:
    """Every rank's payload, in rank order (this rank's own payload at its index).

    ``payload`` is a uint8 numpy array or tensor; the others come back in the same kind.

    ``sizes`` are the payload sizes of all ranks if already exchanged (with other header
    fields), or ``None`` to exchange them here.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if sizes is None:
        sizes = exchange_header([_nbytes(payload)], group, device, stats)[:, 0]
    receive_sizes = np.array(sizes, dtype=np.int64)
    receive_sizes[rank] = 0
    empty = payload[:0]
    outgoing = [empty if j == rank else payload for j in range(world_size)]
    received = exchange_payloads(outgoing, receive_sizes, group, device, stats)
    received[rank] = payload
    return received


def allreduce_mean(tensor: torch.Tensor, group, stats: HookStats) -> torch.Tensor:
    """Average ``tensor`` in place over the group with a plain allreduce (DDP's default hook)."""
    world_size = dist.get_world_size(group)
    # Divide first, as DDP's default hook does, so fp16 sums do not overflow.
    tensor.div_(world_size)
    with stats.timer("comm_s"):
        dist.all_reduce(tensor, group=group)
    stats.add_allreduce(tensor.numel() * tensor.element_size(), world_size)
    return tensor


def shard_bounds(count: int, world_size: int) -> np.ndarray:
    """Start offsets (length world_size + 1) of the contiguous shards rank j owns in scatter-reduce.

    Shard sizes differ by at most one value; with fewer values than ranks some shards are empty.
    """
    return (np.arange(world_size + 1, dtype=np.int64) * count) // world_size


def segments_in_range(segment_sizes, start: int, stop: int) -> list:
    """Sizes of the pieces of consecutive segments that fall inside ``[start, stop)``.

    Pieces of zero length are dropped, so a shard inside one parameter is one segment.
    """
    ends = np.cumsum(np.asarray(segment_sizes, dtype=np.int64))
    starts = ends - np.asarray(segment_sizes, dtype=np.int64)
    lower = np.maximum(starts, start)
    upper = np.minimum(ends, stop)
    pieces = upper - lower
    return [int(size) for size in pieces[pieces > 0]]
