"""The adaptive (cdf) mode: each query block keeps key blocks until their block-level
softmax mass reaches cdf_threshold, so busy regions keep more blocks than flat ones."""

import torch

import bsa_ext
from bsa_ext.layout import ChunkGeometry
from bsa_ext.tuning import make_inputs, mass_kept


def main():
    latent, chunk = (8, 16, 16), (4, 4, 4)
    geom = ChunkGeometry(latent, chunk)
    q, k, v = make_inputs(2, latent, 64, torch.float32, "cpu")  # video-like: smooth field + noise
    print(f"{geom.num_blocks} key blocks per head")
    for label, sparsity, cdf in [("top-k 0.875", 0.875, None), ("cdf 0.9", None, 0.9), ("cdf 0.98", None, 0.98),
                                 ("0.875 + cdf 0.98", 0.875, 0.98)]:
        idx, cnt = bsa_ext.select_blocks(q, k, latent, latent, chunk, chunk, sparsity, cdf)
        mass = mass_kept(q, k, idx, cnt, geom, geom, rows=256, seed=0)
        c = cnt.float()
        print(f"{label:<18} blocks kept per query block: min {int(c.min())}, mean {c.mean():.1f}, max {int(c.max())}; "
              f"attention mass kept {mass:.3f}")
    # In a model: longcat.enable_bsa(model, "720p-adaptive") or
    # longcat.enable_bsa(model, sparsity=None, cdf_threshold=0.95)  (pure cdf mode)
    out = bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, sparsity=None, cdf_threshold=0.95,
                                    chunk_3d_shape_q=chunk, chunk_3d_shape_k=chunk)
    print("pure cdf output:", tuple(out.shape))


if __name__ == "__main__":
    main()
