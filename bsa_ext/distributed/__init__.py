"""Multi-GPU BSA on torch.distributed (NCCL on GPU, gloo on CPU); see docs/distributed.md.

* ``ulysses``: LongCat's head-parallel layout (``cp_split_hw``) with chunk partitions
  identical to the single-GPU run.
* ``sparse_cp``: sequence shards by chunk-rows; selection from all-gathered pooled keys,
  then only the selected key/value chunks travel.
"""

from .sparse_cp import (
    ChunkShards,
    dense_ring_bytes,
    pool_local,
    sparse_cp_attention,
    sparse_cp_flash_attn_bsa_3d,
    sparse_cp_select,
)
from .ulysses import (
    thw_to_ulysses,
    tile_of_rank,
    ulysses_attention,
    ulysses_chunks_match,
    ulysses_flash_attn_bsa_3d,
    ulysses_latent_shape,
    ulysses_partition_mismatch,
    ulysses_to_thw,
    ulysses_token_order,
)

__all__ = [
    "ChunkShards",
    "dense_ring_bytes",
    "pool_local",
    "sparse_cp_attention",
    "sparse_cp_flash_attn_bsa_3d",
    "sparse_cp_select",
    "thw_to_ulysses",
    "tile_of_rank",
    "ulysses_attention",
    "ulysses_chunks_match",
    "ulysses_flash_attn_bsa_3d",
    "ulysses_latent_shape",
    "ulysses_partition_mismatch",
    "ulysses_to_thw",
    "ulysses_token_order",
]
