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

    def compress(self, values, segments, residual=None) -> tuple:
        """Add ``residual`` (the worker's, if any) to ``values`` and compress; send the raw values
        instead if they are smaller.

        Returns ``(payload, nonfinite, kept)``.  ``nonfinite``: whether the input held NaN or Inf,
        as the encoder saw it (the size header tells every rank; the payload's own flag is read
        back from bytes that could have been damaged since).  ``kept``: where the new residual
        waits for :meth:`feedback`.  A codec that can (the numba codec, wherever no raw fallback
        is possible) reads ``values`` and ``residual`` and replaces ``values`` by
        ``values + residual - decompress(payload)`` in the encoding pass: ``kept`` is True and
        feedback copies it.  Otherwise ``values`` become ``values + residual``, and feedback
        decodes the payload.  After non-finite input, ``values`` are unspecified either way (the
        hook makes them NaN).

        Error feedback happens outside, once every rank's payload is known to be finite, so a
        step that AMP skips leaves the residual as it was without a backup copy of it.
        """
        if self.per_bucket_scale:
            segments = None
        if residual is not None and self._can_keep_residual(values, segments):
            return self._flagged(self._compress_keeping_residual(values, segments, residual), True)
        if residual is not None:
            self.add(values, residual)
        payload = self._compress(values, segments)
        if self.nbytes(payload) > payload_format.HEADER_SIZE + 4 * self.numel(values):
            # Only tiny inputs get here.  (A non-finite payload is a bare header and never does.)
            payload = self._compress_raw(values)
        return self._flagged(payload, False)

    def _flagged(self, payload, kept: bool) -> tuple:
        return payload, self.flagged_nonfinite(payload), kept

    def _can_keep_residual(self, values, segments) -> bool:
        """Whether :meth:`_compress_keeping_residual` applies (never: the torch codec)."""
        return False

    def feedback(self, values, payload, residual, kept: bool = False) -> None:
        """Error feedback after a step: ``residual = values - decompress(payload)``.

        ``values`` are what was compressed (gradient plus old residual), or with ``kept`` (see
        :meth:`compress`) already the difference, which is copied.  The result is the residual
        the codec's own in-place update would have left, bit for bit: ``q * scale`` and
        ``v - q * scale`` are exact in float32 (docs/FORMAT.md).
        """
        if kept:
            self.copy(residual, values)
        else:
            self._subtract_decoded(values, payload, residual)

    def _subtract_decoded(self, values, payload, residual) -> None:
        """``residual = values - decompress(payload)``."""
        self.decompress(payload, residual)
        self.subtract_from(values, residual)

    def flagged_nonfinite(self, payload) -> bool:
        """Whether a payload this process just made says its input held NaN or Inf."""
        return bool(int(payload[_FLAGS_OFFSET]) & payload_format.FLAG_NONFINITE)


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

    def _can_keep_residual(self, values, segments) -> bool:
        # values + residual is never formed, so the raw fallback must be impossible beforehand.
        sizes = [values.size] if segments is None else segments
        return payload_format.max_ternary_size(sizes, self.block or 0) <= payload_format.HEADER_SIZE + 4 * values.size

    def _compress(self, values, segments):
        with CODEC_LOCK:
            return threelc.compress(values, segments=segments, nonfinite="flag", sparsity=self.sparsity,
                                    block=self.block)

    def _compress_keeping_residual(self, values, segments, residual):
        with CODEC_LOCK:
            return threelc.compress(values, segments=segments, nonfinite="flag", sparsity=self.sparsity,
                                    block=self.block, residual=residual, residual_out=values)

    def _compress_raw(self, values):
        with CODEC_LOCK:
            return threelc.compress_raw(np.ascontiguousarray(values, dtype=np.float32))

    def decompress(self, payload, out) -> None:
        threelc.decompress(payload, out=out)

    def decompress_add(self, payload, out) -> None:
        threelc.decompress_add(payload, out)

    def _subtract_decoded(self, values, payload, residual) -> None:
        """``residual = values - decompress(payload)`` in one pass over memory (the same bits)."""
        threelc.decompress_residual(payload, values, residual)

    @staticmethod
    def nbytes(payload) -> int:
        return int(payload.size)

    @staticmethod
    def numel(values) -> int:
        return int(values.size)

    def zeros(self, count: int):
        return np.zeros(count, dtype=np.float32)

    @staticmethod
    def add(destination, source) -> None:
        np.add(destination, source, out=destination)

    @staticmethod
    def copy(destination, source) -> None:
        np.copyto(destination, source)

    @staticmethod
    def subtract_from(minuend, destination) -> None:
        np.subtract(minuend, destination, out=destination)

    @staticmethod
    def fill_nan(values) -> None:
        values[...] = np.nan

    def text_payload(self, text: str):
        """``text`` as a uint8 payload-like array (an error report in place of a payload)."""
        return np.frombuffer(text.encode(), dtype=np.uint8).copy()

    @staticmethod
    def payload_text(payload) -> str:
        return payload.tobytes().decode(errors="replace")

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

    def _compress(self, values, segments):
        return device_codec.compress_tensor(values, segments=segments, nonfinite="flag", sparsity=self.sparsity,
                                            block=self.block)

    def _compress_raw(self, values):
        return device_codec.compress_raw_tensor(values.contiguous())

    def decompress(self, payload, out) -> None:
        device_codec.decompress_tensor(payload, out=out)

    def decompress_add(self, payload, out) -> None:
        device_codec.decompress_add_tensor(payload, out)

    @staticmethod
    def nbytes(payload) -> int:
        return int(payload.numel())

    @staticmethod
    def numel(values) -> int:
        return int(values.numel())

    def zeros(self, count: int):
        return torch.zeros(count, dtype=torch.float32, device=self.device)

    @staticmethod
    def add(destination, source) -> None:
        destination.add_(source)

    @staticmethod
    def copy(destination, source) -> None:
        destination.copy_(source)

    @staticmethod
    def subtract_from(minuend, destination) -> None:
        torch.sub(minuend, destination, out=destination)

    @staticmethod
    def fill_nan(values) -> None:
        values.fill_(float("nan"))

    def text_payload(self, text: str):
        """``text`` as a uint8 tensor on the codec's device (an error report in place of a payload)."""
        return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(self.device)

    @staticmethod
    def payload_text(payload) -> str:
        return bytes(payload.cpu().numpy()).decode(errors="replace")

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
