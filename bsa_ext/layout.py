"""Chunk geometry: how a THW-raster token sequence is partitioned into 3D blocks.

This is SPEC §1 in code. Every backend (PyTorch reference, Triton, CUDA) computes
token positions from the same four facts, so there is never a layout copy:

* latent ``(T, H, W)`` and chunk ``(t, h, w)``; grid ``Nt = ceil(T/t)`` etc.
* block id ``b = (it * Nh + ih) * Nw + iw``
* row ``r`` of a block (``0 <= r < t*h*w``) is ``(dt, dh, dw)`` with ``w`` fastest
* the token of (b, r) is ``((it*t+dt) * H + (ih*h+dh)) * W + (iw*w+dw)`` when each
  coordinate is inside the latent; otherwise the row is padding and takes no part
  in pooling, scores, softmax or outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Shape3 = Tuple[int, int, int]


@dataclass(frozen=True)
class ChunkGeometry:
    latent: Shape3  # (T, H, W)
    chunk: Shape3  # (t, h, w)

    @property
    def grid(self) -> Shape3:
        return tuple(-(-n // c) for n, c in zip(self.latent, self.chunk))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        nt, nh, nw = self.grid
        return nt * nh * nw

    @property
    def capacity(self) -> int:
        t, h, w = self.chunk
        return t * h * w

    @property
    def seq_len(self) -> int:
        T, H, W = self.latent
        return T * H * W

    @property
    def divisible(self) -> bool:
        return all(n % c == 0 for n, c in zip(self.latent, self.chunk))

    def as_ints(self) -> list:
        """The nine integers a kernel needs: T, H, W, t, h, w, Nt, Nh, Nw."""
        return [*self.latent, *self.chunk, *self.grid]

    def token_index(self, device=None) -> torch.Tensor:
        """int64 ``[num_blocks, capacity]``: token of each (block, row), -1 for padding."""
        T, H, W = self.latent
        t, h, w = self.chunk
        nt, nh, nw = self.grid
        b = torch.arange(self.num_blocks, device=device)
        r = torch.arange(self.capacity, device=device)
        it, ih, iw = b // (nh * nw), (b // nw) % nh, b % nw
        dt, dh, dw = r // (h * w), (r // w) % h, r % w
        tt = it[:, None] * t + dt[None, :]
        hh = ih[:, None] * h + dh[None, :]
        ww = iw[:, None] * w + dw[None, :]
        valid = (tt < T) & (hh < H) & (ww < W)
        tok = (tt * H + hh) * W + ww
        return torch.where(valid, tok, torch.full_like(tok, -1))

    def block_of_token(self, device=None) -> torch.Tensor:
        """int64 ``[seq_len]``: the block id of every token."""
        T, H, W = self.latent
        t, h, w = self.chunk
        _, nh, nw = self.grid
        s = torch.arange(self.seq_len, device=device)
        tt, hh, ww = s // (H * W), (s // W) % H, s % W
        return ((tt // t) * nh + hh // h) * nw + ww // w

    def valid_counts(self, device=None) -> torch.Tensor:
        """int64 ``[num_blocks]``: number of real tokens in each block."""
        return (self.token_index(device) >= 0).sum(-1)


def topk_count(num_key_blocks: int, sparsity: float) -> int:
    """LongCat's top-k width, clamped to at least one block (SPEC §2)."""
    return min(num_key_blocks, max(1, int((1 - sparsity) * num_key_blocks)))


def selection_width(
    num_key_blocks: int,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    max_blocks: Optional[int],
) -> int:
    """``Kmax``, the last dimension of ``indices`` (SPEC §2), known before any kernel runs."""
    width = num_key_blocks if cdf_threshold is not None else topk_count(num_key_blocks, sparsity)
    if max_blocks is not None:
        width = min(width, max_blocks)
    return width


def as_shape3(value: Sequence[int]) -> Shape3:
    return tuple(int(x) for x in value)  # type: ignore[return-value]


def attention_flops(batch: int, heads: int, sq: int, key_tokens_per_query: float, head_dim: int) -> float:
    """Forward FLOPs counted over computed blocks: 4 * B * H * Sq * keys * D (SPEC §6)."""
    return 4.0 * batch * heads * sq * key_tokens_per_query * head_dim


__all__ = [
    "ChunkGeometry",
    "topk_count",
    "selection_width",
    "as_shape3",
    "attention_flops",
]
