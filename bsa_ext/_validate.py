"""Argument checks of SPEC §5: run before any kernel, each error names the argument,
what was expected and what came."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .capabilities import CAPABILITIES, KERNEL_CAPACITIES

# Every dtype some backend runs; which backend takes which is the capability table's business.
SUPPORTED_DTYPES = tuple(sorted({d for c in CAPABILITIES.values() for d in c.dtypes}, key=str))
from .layout import ChunkGeometry, as_shape3


def _shape3(name: str, value, axes: str) -> tuple:
    try:
        if any(not isinstance(x, numbers.Integral) or isinstance(x, bool) for x in value):
            raise TypeError
        shape = as_shape3(value)
    except TypeError:
        raise ValueError(f"{name}: expected three positive integers {axes}, got {value!r}") from None
    if len(shape) != 3 or any(x <= 0 for x in shape):
        raise ValueError(f"{name}: expected three positive integers, got {tuple(value)!r}")
    return shape


def geometry(latent_name: str, latent, chunk_name: str, chunk, seq_len: int, seq_name: str) -> ChunkGeometry:
    lat = _shape3(latent_name, latent, "(T, H, W)")
    ch = _shape3(chunk_name, chunk, "(t, h, w)")
    if math.prod(lat) != seq_len:
        raise ValueError(
            f"{latent_name}: product {lat[0]}*{lat[1]}*{lat[2]} = {math.prod(lat)} must equal the sequence "
            f"length of {seq_name} ({seq_len})"
        )
    cap = math.prod(ch)
    if cap not in KERNEL_CAPACITIES:
        raise ValueError(
            f"{chunk_name}: chunk capacity t*h*w = {cap} for {ch}; supported capacities: "
            f"{', '.join(map(str, KERNEL_CAPACITIES))}"
        )
    return ChunkGeometry(lat, ch)


def _is_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def qkv(q, k, v=None) -> None:
    """Shapes, dtypes, devices and strides of q [B,H,Sq,D], k/v [B,H,Sk,D]."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        _is_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, S, D], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name}: expected one of the dtypes [{names}], got {x.dtype}")
    B, H, _, D = q.shape
    for name, x in named[1:]:
        if (x.shape[0], x.shape[1], x.shape[3]) != (B, H, D):
            raise ValueError(
                f"{name}: expected shape [B={B}, H={H}, Sk, D={D}] matching q {tuple(q.shape)}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {x.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {x.dtype}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in named:
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name}: expected stride(-1) == 1 (contiguous head dim), got strides {x.stride()}")


def selection_params(sparsity: Optional[float], cdf_threshold: Optional[float], max_blocks: Optional[int]) -> None:
    if sparsity is None and cdf_threshold is None:
        raise ValueError("sparsity / cdf_threshold: expected at least one of them, got both None")
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity: expected a value in [0, 1), got {sparsity!r}")
    if cdf_threshold is not None and not (0.0 < cdf_threshold <= 1.0):
        raise ValueError(f"cdf_threshold: expected a value in (0, 1], got {cdf_threshold!r}")
    if max_blocks is not None and (not isinstance(max_blocks, numbers.Integral) or isinstance(max_blocks, bool) or max_blocks < 1):
        raise ValueError(f"max_blocks: expected a positive integer or None, got {max_blocks!r}")


def block_lists(indices, counts, q: torch.Tensor, geom_q: ChunkGeometry) -> None:
    _is_tensor("indices", indices)
    _is_tensor("counts", counts)
    B, H = q.shape[:2]
    nq = geom_q.num_blocks
    if indices.dtype != torch.int32:
        raise TypeError(f"indices: expected dtype torch.int32, got {indices.dtype}")
    if counts.dtype != torch.int32:
        raise TypeError(f"counts: expected dtype torch.int32, got {counts.dtype}")
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, nq):
        raise ValueError(f"indices: expected shape [B={B}, H={H}, Nq={nq}, Kmax], got {tuple(indices.shape)}")
    if tuple(counts.shape) != (B, H, nq):
        raise ValueError(f"counts: expected shape [B={B}, H={H}, Nq={nq}], got {tuple(counts.shape)}")
    for name, x in (("indices", indices), ("counts", counts)):
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {x.device}")


def saved_outputs(dout, out, lse, q) -> None:
    """The backward's forward results: ``dout``/``out`` like q, ``lse`` fp32 ``[B, H, Sq]``."""
    for name, x in (("dout", dout), ("out", out)):
        _is_tensor(name, x)
        if x.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {x.dtype}")
    _is_tensor("lse", lse)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse: expected shape {tuple(q.shape[:3])} ([B, H, Sq]), got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse: expected dtype torch.float32, got {lse.dtype}")
    for name, x in (("dout", dout), ("out", out), ("lse", lse)):
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {x.device}")


def check_block_values(indices, counts, num_key_blocks: int) -> None:
    """``validate=True``: out-of-range ids, counts and duplicate ids (synchronises the host)."""
    kmax = indices.shape[-1]
    if bool(((counts < 0) | (counts > kmax)).any()):
        raise ValueError(f"counts: expected values in [0, Kmax={kmax}], got min {int(counts.min())}, max {int(counts.max())}")
    live = torch.arange(kmax, device=indices.device) < counts[..., None]
    bad = live & ((indices < 0) | (indices >= num_key_blocks))
    if bool(bad.any()):
        b, h, i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"indices: expected block ids in [0, {num_key_blocks}) within counts, found {int(bad.sum())} outside, "
            f"the first indices[{b}, {h}, {i}, {j}] = {int(indices[b, h, i, j])}"
        )
    ids = torch.where(live, indices.long(), torch.full_like(indices, -1, dtype=torch.long) - torch.arange(kmax, device=indices.device))
    srt = ids.sort(-1).values
    dup = srt[..., 1:] == srt[..., :-1]
    if bool(dup.any()):
        b, h, i, j = (int(x) for x in dup.nonzero()[0])
        raise ValueError(
            f"indices: expected distinct block ids within counts of each query block, found duplicates, "
            f"the first: block {int(srt[b, h, i, j])} twice in indices[{b}, {h}, {i}, :]"
        )


def sm_scale(value: Optional[float], head_dim: int) -> float:
    if value is None:
        return head_dim**-0.5
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"sm_scale: expected a positive finite float or None, got {value!r}")
    return float(value)


def backend_name(value: str, env: Optional[str]) -> str:
    from .capabilities import BACKENDS

    choice = value if value != "auto" else (env or "auto")
    if choice not in ("auto",) + BACKENDS:
        source = "backend" if value != "auto" else "BSA_BACKEND"
        raise ValueError(f"{source}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {choice!r}")
    return choice

