"""threelc: 3LC gradient compression (Lim, Andersen, Kaminsky, MLSys 2019) for PyTorch DDP.

The codec (this package's top level) needs only numpy and numba::

    payload = threelc.compress(x, sparsity=1.5, residual=r)   # uint8 array
    y = threelc.decompress(payload)                             # float32 array

The DDP communication hook lives in :mod:`threelc.hooks`; launch tools in :mod:`threelc.launch`.
"""

from .codec import NonFiniteError, compress, compress_raw, decompress, decompress_add, decompress_residual, payload_info
from .format import DEFAULT_CHUNK, FormatError, Header

__version__ = "0.1.0"

__all__ = [
    "compress",
    "compress_raw",
    "decompress",
    "decompress_add",
    "decompress_residual",
    "payload_info",
    "FormatError",
    "NonFiniteError",
    "Header",
    "DEFAULT_CHUNK",
    "__version__",
]
