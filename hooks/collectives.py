"""The collectives the 3LC hook issues, on payloads of uneven sizes.

Payloads are uint8 numpy arrays (the numba codec, host memory) or uint8 torch tensors (the torch
codec, on the bucket's device); received payloads come back in the same kind, and tensors on
the same device as the ones sent.  Tensors already on the backend's device (``comm_device``)
cross no host copy: they are concatenated with ``torch.cat`` and the received buffer is split
into views.

Compressed payloads have data-dependent sizes and cannot be summed by an allreduce.  gloo has no
allgatherv, so a receiver must learn a payload's size before the collective that carries it.
:func:`exchange_framed` does it in one or two ``all_to_all_single`` calls: every message opens
with the sender's *frame* (the bytes it sends each rank, plus a small int64 header of the
caller's: bucket fingerprints, flags, per-shard sizes) and carries as much of its payload as
fits a *slot* of a size every rank agreed on beforehand, padded with zeros; whatever outgrew its
slot follows in a second all-to-all with exact split sizes.  Every rank reads every sender's
frame, so every rank knows whether the second collective runs.  With no slots (``None``) the
first collective carries the frames alone: a header exchange, then the payloads with exact sizes,
no padding.  A rank never sends payload to itself, so the byte counts in
:mod:`threelc.hooks.stats` are what the network carries, padding included.

Every collective here is ``all_to_all_single``, the header too: gloo's ``all_gather`` is a ring of
N - 1 dependent hops, so on a link with one-way delay d it costs ~2 (N - 1) d, while an all-to-all
posts every send at once and costs one round trip, ~2 d (measured with the emulator's delay line,
4 nodes, 20 ms: 124 ms against 42 ms per header; docs/LAUNCH.md).  The bytes are the same.

Every function is blocking and must be called in the same order on every rank; the hook
guarantees that by calling them from one FIFO worker thread per state (see
:mod:`threelc.hooks.worker`).

Payloads never are empty (a payload's own header alone is 48 bytes), but an exchange in which
some or all payloads are empty is still well defined and does not hang.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .stats import HookStats

__all__ = ["comm_device", "exchange_header", "exchange_framed", "exchange_payloads", "allreduce_mean",
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
    local = np.asarray(values, dtype=np.int64).reshape(-1)
    world_size = dist.get_world_size(group)
    gathered = torch.empty(world_size * local.size, dtype=torch.int64, device=device)
    with stats.timer("comm_s"):
        dist.all_to_all_single(gathered, torch.from_numpy(np.tile(local, world_size)).to(device), group=group)
    nbytes = (world_size - 1) * local.size * 8
    stats.add_traffic(nbytes, nbytes)
    return gathered.cpu().numpy().reshape(world_size, local.size)


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


def exchange_framed(header, outgoing, slots, group, device: torch.device, stats: HookStats) -> tuple:
    """Send ``outgoing[j]`` to rank j, and this rank's ``header`` to every rank (see the module docstring).

    ``header`` is an int64 vector of the same length on every rank; ``outgoing`` holds one uint8
    numpy array or uint8 tensor (all on one device) per rank, ``outgoing[rank]`` empty.
    ``slots[i, j]`` (the same ``[world, world]`` matrix on every rank, or None for zeros) is how
    many payload bytes the message from rank i to rank j carries in the first collective.

    Returns ``(headers, sizes, received)``: every rank's header (``[world, len]``), the payload
    bytes every rank sent every rank (``sizes[i, j]``: i to j; the matrix a caller's next slots
    are made from) and the payloads this rank received, by source rank, in the kind sent
    (``received[rank]`` is empty).
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if slots is None or not np.any(slots):
        # Headers ahead: the frames alone (one small all-to-all), then the payloads, exact sizes.
        sizes = np.array([_nbytes(payload) for payload in outgoing], np.int64)
        frames = exchange_header(np.concatenate([sizes, np.asarray(header, np.int64)]), group, device, stats)
        sent = frames[:, :world_size].copy()
        received = (exchange_payloads(outgoing, sent[:, rank], group, device, stats) if sent.any()
                    else [payload[:0] for payload in outgoing])
        received[rank] = outgoing[rank][:0]
        return frames[:, world_size:], sent, received
    slots = np.asarray(slots, np.int64)
    tensors = isinstance(outgoing[0], torch.Tensor)
    payload_device = outgoing[0].device if tensors else torch.device("cpu")
    pieces = [payload if tensors else torch.from_numpy(payload) for payload in outgoing]
    sizes = [int(piece.numel()) for piece in pieces]
    frame = torch.from_numpy(np.concatenate([np.asarray(sizes, np.int64), np.asarray(header, np.int64)]))
    frame = frame.view(torch.uint8).to(payload_device)
    frame_bytes = frame.numel()

    # First collective: to each rank, the frame and the head of its payload, padded to the slot.
    send = []
    for peer, piece in enumerate(pieces):
        head = piece[:int(slots[rank, peer])]
        padding = torch.zeros(int(slots[rank, peer]) - head.numel(), dtype=torch.uint8, device=payload_device)
        send += [frame, head, padding]
    receive_sizes = [frame_bytes + int(slots[source, rank]) for source in range(world_size)]
    receive = torch.empty(sum(receive_sizes), dtype=torch.uint8, device=device)
    with stats.timer("comm_s"):
        dist.all_to_all_single(receive, torch.cat(send).to(device), output_split_sizes=receive_sizes,
                               input_split_sizes=[frame_bytes + int(slots[rank, peer]) for peer in range(world_size)],
                               group=group)
    messages = list(torch.split(receive.to(payload_device), receive_sizes))
    # (cloned: a frame behind an odd-sized slot is not aligned for an int64 view)
    frames = np.stack([message[:frame_bytes].cpu().clone().view(torch.int64).numpy() for message in messages])
    sent = frames[:, :world_size].copy()  # sent[i, j]: payload bytes from rank i to rank j
    heads = [message[frame_bytes:frame_bytes + min(int(sent[source, rank]), int(slots[source, rank]))]
             for source, message in enumerate(messages)]
    peers = np.arange(world_size) != rank
    stats.add_traffic(int((frame_bytes + slots[rank, peers]).sum()), int((frame_bytes + slots[peers, rank]).sum()))

    # Second collective, only when some payload outgrew its slot (every rank sees the same frames).
    overflow = np.maximum(sent - slots, 0)
    if overflow.any():
        tails = exchange_payloads([piece[int(slots[rank, peer]):] for peer, piece in enumerate(pieces)],
                                  overflow[:, rank], group, device, stats)
        heads = [torch.cat([head, tail]) if overflow[source, rank] else head for head, tail, source
                 in zip(heads, tails, range(world_size))]
    received = heads if tensors else [head.numpy() for head in heads]
    received[rank] = outgoing[rank][:0]
    return frames[:, world_size:], sent, received


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
