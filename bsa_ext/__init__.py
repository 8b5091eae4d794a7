"""bsa_ext: Block Sparse Attention for video diffusion transformers.

``flash_attn_bsa_3d`` is a drop-in for LongCat-Video's function; ``select_blocks`` and
``block_sparse_attention`` are its two halves; ``torch.ops.bsa.*`` are the registered ops.
See README.md and docs/ for the API, backends and presets.
"""

from ._version import __version__
from . import ops as _ops  # registers implementations, fakes and autograd on torch.ops.bsa
from .interface import block_sparse_attention, flash_attn_bsa_3d, select_blocks
from .layout import ChunkGeometry
from .ops import BackendUnavailableError, last_backend

__all__ = [
    "__version__",
    "flash_attn_bsa_3d",
    "select_blocks",
    "block_sparse_attention",
    "last_backend",
    "BackendUnavailableError",
    "ChunkGeometry",
]
