"""Basic use: bsa_ext.flash_attn_bsa_3d on [B, H, S, D] tensors, checked against dense attention.

    python examples/basic_usage.py                 # CPU, small latent
    python examples/basic_usage.py --device cuda --latent 24,44,80 --heads 32 --head-dim 128
"""

import argparse

import torch
import torch.nn.functional as F

import bsa_ext
from bsa_ext import reference
from bsa_ext.layout import ChunkGeometry


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", default="8,12,20", help="T,H,W of the video latent (need not divide by the chunks)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    latent = tuple(int(x) for x in args.latent.split(","))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    S = latent[0] * latent[1] * latent[2]
    q, k, v = (torch.randn(1, args.heads, S, args.head_dim, device=args.device, dtype=dtype) for _ in range(3))

    # LongCat's call, with its released refinement parameters.
    params = dict(sparsity=0.9375, chunk_3d_shape_q=(4, 4, 4), chunk_3d_shape_k=(4, 4, 4))
    out = bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, **params)
    print(f"out {tuple(out.shape)} {out.dtype}, backend: {bsa_ext.last_backend()}")

    # The same attention, dense, under the token mask of the selected blocks.
    geom = ChunkGeometry(latent, (4, 4, 4))
    indices, counts = bsa_ext.select_blocks(q, k, latent, latent, (4, 4, 4), (4, 4, 4), 0.9375)
    print(f"{geom.num_blocks} key blocks, each query block keeps {int(counts[0, 0, 0])}")
    if S <= 8192:
        mask = reference.dense_block_mask(indices, counts, geom, geom)
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        print(f"max |bsa - masked dense| = {(out.float() - dense).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
