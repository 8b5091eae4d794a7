"""SPEC §6 workloads and video-like inputs for benchmarks and studies.

Random i.i.d. q and k pool to near-zero block means, so every key block scores about
the same and cdf selection keeps almost all of them: nothing like a real video. Here q
and k are one smooth random field over (T, H, W), trilinearly upsampled from a coarse
grid, plus independent token noise, RMS-normed: neighbouring chunks look alike, as in a
video latent, and block scores peak around each query block's neighbours.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Workload:
    name: str
    latent: Tuple[int, int, int]
    chunk: Tuple[int, int, int]
    sparsity: Optional[float]
    cdf_threshold: Optional[float] = None
    backward: bool = False
    heads: int = 32
    head_dim: int = 128
    batch: int = 1


WORKLOADS = {
    w.name: w
    for w in [
        Workload("W720s", (24, 44, 80), (4, 4, 4), 0.9375),
        Workload("W720", (48, 44, 80), (4, 4, 4), 0.9375),
        Workload("W720s-c128", (24, 44, 80), (4, 4, 8), 0.875),
        Workload("W720s-cdf", (24, 44, 80), (4, 4, 4), 0.875, 0.98),
        Workload("T16-train", (16, 44, 80), (4, 4, 4), 0.9375, backward=True),
    ]
}


def smooth_field(batch, heads, latent, head_dim, device, generator=None, coarse=(4, 8, 8)):
    """``[B, H, T*H*W, D]`` float32: unit-variance noise on a coarse grid, upsampled."""
    T, Hh, W = latent
    grid = tuple(max(2, -(-n // c)) for n, c in zip(latent, coarse))
    low = torch.randn(batch * heads, head_dim, *grid, device=device, generator=generator)
    smooth = F.interpolate(low, size=(T, Hh, W), mode="trilinear", align_corners=True)
    return smooth.reshape(batch, heads, head_dim, -1).transpose(-1, -2).contiguous()


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def video_like_qkv(batch, heads, latent, head_dim, dtype, device, seed=0, field=2.0, noise=1.0, qk_gain=1.5):
    """q and k share one smooth field per head (plus independent noise) and are RMS-normed
    per token like LongCat's q/k norms (``qk_gain`` plays the norm's learned weight), so a
    query block scores its spatio-temporal neighbours highest, like local video attention;
    v is smooth too. With the defaults, cdf 0.98 keeps 1 to 495 of 660 key blocks per row,
    5.5% on average, at latent (12, 44, 80) with 4x4x4 chunks: rows differ widely."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = smooth_field(batch, heads, latent, head_dim, device, gen) * field
    q = qk_gain * _rms_norm(base + noise * torch.randn(base.shape, device=device, generator=gen))
    k = qk_gain * _rms_norm(base + noise * torch.randn(base.shape, device=device, generator=gen))
    v = smooth_field(batch, heads, latent, head_dim, device, gen) + 0.5 * torch.randn(base.shape, device=device, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_inputs(w: Workload, dtype=torch.bfloat16, device="cuda", seed=0):
    return video_like_qkv(w.batch, w.heads, w.latent, w.head_dim, dtype, device, seed)


def measured_commit() -> str:
    """The commit a measurement ran: env ``BSA_COMMIT`` when set (a copied tree's git may
    name an older one), else git's short HEAD of this checkout, else ``"unknown"``."""
    if os.environ.get("BSA_COMMIT"):
        return os.environ["BSA_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_results(rows: List[Dict], out_dir: str, gpu: str) -> str:
    """Appends ``rows`` as JSON lines to ``out_dir/<gpu>.jsonl`` (SPEC §6); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", gpu) + ".jsonl")
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
