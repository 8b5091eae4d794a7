"""A tiny LongCat-style DiT for the examples (random weights, runs on CPU).

Its attention layer is shaped like upstream's ``longcat_video/modules/attention.py``:
fused qkv, per-head RMS norm, ``[B, H, S, D]``, and a module-level
``flash_attn_bsa_3d`` called with ``**self.bsa_params`` when ``enable_bsa`` is set.
Here that name starts as a placeholder, as if upstream's Triton-only kernel were
there; ``bsa_ext.integrations.longcat.install(modules=["_toy_longcat"])`` rebinds it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, **bsa_params):
    raise RuntimeError("upstream's BSA kernel is not available here: call bsa_ext.integrations.longcat.install()")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, enable_bsa=False, bsa_params=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.enable_bsa, self.bsa_params = enable_bsa, bsa_params
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, shape):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.enable_bsa and shape[0] > 1:
            out = flash_attn_bsa_3d(q, k, v, shape, shape, **self.bsa_params)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, **bsa):
        super().__init__()
        self.attn = Attention(dim, num_heads, **bsa)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, shape):
        x = x + self.attn(x, shape)
        return x + self.ffn(x)


class ToyDiT(nn.Module):
    """Stands in for ``LongCatVideoTransformer3DModel``: ``blocks[i].attn`` are the attention layers."""

    def __init__(self, dim=128, num_heads=2, depth=2, enable_bsa=False, bsa_params=None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, enable_bsa=enable_bsa, bsa_params=bsa_params) for _ in range(depth)])

    def forward(self, x, shape):
        for block in self.blocks:
            x = block(x, shape)
        return x
