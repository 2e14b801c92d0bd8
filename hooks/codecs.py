"""The two codecs the hook can run, behind one small interface.

The hook's collective algorithms (:func:`threelc.hooks.hook._allgather_mean` and
``_scatter_reduce_mean``) are written once against this interface:

* :class:`NumbaCodec` works on float32 numpy arrays in host memory (the numba kernels of
  :mod:`threelc.codec`); payloads are uint8 numpy arrays.
* :class:`TorchCodec` works on float32 torch tensors on the bucket's device (the vectorized
  torch codec of :mod:`threelc.hooks.device_codec`); payloads are uint8 tensors on that device.

Both produce the same payload bytes and the same float32 results, bit for bit, so ranks may even
use different codecs.  Residuals are kept by the state as float32 torch tensors; :meth:`array`
gives the codec's own view of one (``Tensor.numpy()`` shares the memory of a CPU tensor).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

import threelc
from threelc import format as payload_format

from . import device_codec
from .worker import CODEC_LOCK

__all__ = ["NumbaCodec", "TorchCodec", "CODECS", "for_bucket"]

#: The values of ThreeLCState's ``codec`` option.
CODECS = ("auto", "numba", "torch")

# Byte offset of the flags field in the payload header (magic 3 bytes, version, encoding, flags).
_FLAGS_OFFSET = 5


class _Codec:
    """What both codecs share: options, the raw fallback rule."""

    name = ""

    def __init__(self, sparsity: float, block: int | None, per_bucket_scale: bool, device: torch.device):
        self.sparsity = sparsity
        self.block = block
        self.per_bucket_scale = per_bucket_scale
        self.device = device  # where values, residuals and payloads live

    def compress(self, values, residual, backup, segments):
        """Compress with error feedback; send the raw values instead if they are smaller.

        ``residual`` (updated in place) and ``backup`` (its value before this step) are both
        given or both None.  A non-finite input gives a flagged header and leaves the residual
        unchanged.
        """
        if self.per_bucket_scale:
            segments = None
        payload = self._compress(values, residual, segments)
        if self.nbytes(payload) > payload_format.HEADER_SIZE + 4 * self.numel(values):
            # Only tiny inputs get here.  Raw values carry v = x + residual exactly: nothing is
            # left to feed back.  (A non-finite payload is a bare header and never gets here.)
            sent = values if residual is None else values + backup
            payload = self._compress_raw(sent)
            if residual is not None:
                residual[...] = 0.0
        return payload


class NumbaCodec(_Codec):
    """The numba codec on float32 numpy arrays in host memory."""

    name = "numba"

    def work_copy(self, buffer: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """A float32 CPU tensor of the bucket's values and whether it is the bucket itself."""
        if buffer.device.type == "cpu" and buffer.dtype == torch.float32:
            return buffer.detach(), True
        return buffer.detach().to(device="cpu", dtype=torch.float32), False

    def array(self, tensor: torch.Tensor | None):
        """The codec's view of a CPU float32 tensor (shared memory)."""
        return None if tensor is None else tensor.numpy().reshape(-1)

    def lock(self):
        return CODEC_LOCK

    def _compress(self, values, residual, segments):
        with CODEC_LOCK:
            return threelc.compress(values, residual=residual, segments=segments, nonfinite="flag",
                                    sparsity=self.sparsity, block=self.block)

    def _compress_raw(self, values):
        with CODEC_LOCK:
            return threelc.compress_raw(np.ascontiguousarray(values, dtype=np.float32))

    def decompress(self, payload, out) -> None:
        threelc.decompress(payload, out=out)

    def decompress_add(self, payload, out) -> None:
        threelc.decompress_add(payload, out)

    def any_nonfinite(self, payloads) -> bool:
        return any(threelc.payload_info(payload).nonfinite for payload in payloads)

    @staticmethod
    def nbytes(payload) -> int:
        return int(payload.size)

    @staticmethod
    def numel(values) -> int:
        return int(values.size)

    def zeros(self, count: int):
        return np.zeros(count, dtype=np.float32)

    @staticmethod
    def copy(destination, source) -> None:
        np.copyto(destination, source)

    @staticmethod
    def divide(values, divisor: int) -> None:
        np.divide(values, np.float32(divisor), out=values)


class TorchCodec(_Codec):
    """The torch codec (:mod:`threelc.hooks.device_codec`) on float32 tensors on one device."""

    name = "torch"

    def work_copy(self, buffer: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """A float32 tensor of the bucket's values on its device; whether it is the bucket itself."""
        if buffer.dtype == torch.float32:
            return buffer.detach(), True
        return buffer.detach().to(dtype=torch.float32), False

    def array(self, tensor: torch.Tensor | None):
        return None if tensor is None else tensor.view(-1)

    def lock(self):
        # The torch codec runs no numba kernels; nothing to serialise.
        return contextlib.nullcontext()

    def _compress(self, values, residual, segments):
        return device_codec.compress_tensor(values, residual=residual, segments=segments, nonfinite="flag",
                                            sparsity=self.sparsity, block=self.block)

    def _compress_raw(self, values):
        return device_codec.compress_raw_tensor(values.contiguous())

    def decompress(self, payload, out) -> None:
        device_codec.decompress_tensor(payload, out=out)

    def decompress_add(self, payload, out) -> None:
        device_codec.decompress_add_tensor(payload, out)

    def any_nonfinite(self, payloads) -> bool:
        # One host synchronisation for all payloads: the flags byte of each header.  Payloads are
        # never shorter than a header (the decoder has validated the received ones already).
        flags = torch.stack([payload[_FLAGS_OFFSET] for payload in payloads]).cpu()
        return bool((flags & payload_format.FLAG_NONFINITE).any())

    @staticmethod
    def nbytes(payload) -> int:
        return int(payload.numel())

    @staticmethod
    def numel(values) -> int:
        return int(values.numel())

    def zeros(self, count: int):
        return torch.zeros(count, dtype=torch.float32, device=self.device)

    @staticmethod
    def copy(destination, source) -> None:
        destination.copy_(source)

    @staticmethod
    def divide(values, divisor: int) -> None:
        # A float32 0-d tensor on the values' device (made by a fill, no host copy): the division
        # then rounds exactly like numpy's float32 division.  A Python or CPU scalar divisor would
        # let CUDA multiply by its reciprocal instead, which can differ in the last bit when N is not a
        # power of two.
        values.div_(torch.full((), divisor, dtype=torch.float32, device=values.device))


def resolve(codec: str, device: torch.device) -> str:
    """``"auto"``: the torch codec for CUDA buckets, the numba codec otherwise."""
    if codec != "auto":
        return codec
    return "torch" if torch.device(device).type == "cuda" else "numba"


def for_bucket(state, buffer: torch.Tensor) -> _Codec:
    """The codec the state's ``codec`` option picks for a bucket, configured from the state."""
    options = state.codec_options()
    name = resolve(state.codec, buffer.device)
    if name == "torch":
        return TorchCodec(options["sparsity"], options["block"], state.scale == "bucket", buffer.device)
    return NumbaCodec(options["sparsity"], options["block"], state.scale == "bucket", torch.device("cpu"))
