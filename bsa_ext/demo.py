"""``python -m bsa_ext demo``: LongCat-shaped block sparse attention, checked and timed.

On a GPU it runs the W720s workload of SPEC §6 (B=1, 32 heads, D=128, bf16, latent
(24, 44, 80), chunks (4, 4, 4), sparsity 0.9375); on a CPU a small problem of the same
structure. It prints the backend that ran, the selected density, the error against
the fp64 reference (sampled query blocks and heads on the GPU) with the FlashAttention
tolerance bound, and the time against dense SDPA measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List

import torch
import torch.nn.functional as F

from . import flash_attn_bsa_3d, last_backend, select_blocks
from .layout import ChunkGeometry


def _time_ms(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _dense_rows(q, k, v, rows, key_mask, scale, upcast):
    """Masked dense attention of query ``rows`` of one head; ``upcast=False`` computes as the
    low-precision baseline of the tolerance rule (products in the input dtype)."""
    dt = torch.float64 if upcast else q.dtype
    s = (q[rows].to(dt) @ k.to(dt).T).float() * scale
    s = s.masked_fill(~key_mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p.to(dt) @ v.to(dt)


def check_sampled(q, k, v, out, indices, counts, gq: ChunkGeometry, gk: ChunkGeometry, heads, blocks):
    """max |out - ref| and the tolerance bound 2 * max |pt - ref| + floor over sampled rows."""
    scale = q.shape[-1] ** -0.5
    qtok, kblock = gq.token_index(q.device), gk.block_of_token(q.device)
    err = bound = 0.0
    for h in heads:
        for i in blocks:
            rows = qtok[i][qtok[i] >= 0]
            n = int(counts[0, h, i])
            chosen = torch.zeros(gk.num_blocks + 1, dtype=torch.bool, device=q.device)
            chosen[indices[0, h, i, :n].long()] = True
            key_mask = chosen[kblock]
            ref = _dense_rows(q[0, h], k[0, h], v[0, h], rows, key_mask, scale, True)
            pt = _dense_rows(q[0, h], k[0, h], v[0, h], rows, key_mask, scale, False)
            err = max(err, (out[0, h, rows].double() - ref).abs().max().item())
            bound = max(bound, 2 * (pt.double() - ref).abs().max().item() + 1e-5)
    return err, bound


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsa_ext demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="auto (default), cuda, triton or torch")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--frames", type=int, default=None, help="latent T (default: 24 on GPU, 4 on CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if gpu:
        B, H, D, dtype = 1, 32, 128, torch.bfloat16
        latent = (args.frames or 24, 44, 80)
    else:
        B, H, D, dtype = 1, 4, 64, torch.float32
        latent = (args.frames or 4, 16, 20)
    chunk, sparsity = (4, 4, 4), 0.9375 if gpu else 0.75
    gq = gk = ChunkGeometry(latent, chunk)
    S = gq.seq_len
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"bsa_ext demo on {where}: B={B} H={H} D={D} {str(dtype).replace('torch.', '')} latent {latent} "
          f"(S={S}) chunks {chunk} sparsity {sparsity}")

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=gen) for _ in range(3))

    run = lambda: flash_attn_bsa_3d(q, k, v, latent, latent, sparsity, None, chunk, chunk, backend=args.backend)  # noqa: E731
    out = run()
    used = f"select: {last_backend('select')}, forward: {last_backend('forward')}"
    indices, counts = select_blocks(q, k, latent, latent, chunk, chunk, sparsity, backend=args.backend)
    density = counts.double().mean().item() / gk.num_blocks

    if gpu:  # the fp64 reference of every row would take minutes: spot-check rows instead
        heads = [0, H // 2, H - 1]
        picks = torch.randint(0, gq.num_blocks, (6,), generator=torch.Generator().manual_seed(1)).tolist()
        blocks = sorted({0, gq.num_blocks - 1, *picks})
        checked = f"{len(heads)} heads x {len(blocks)} query blocks"
    else:
        heads, blocks = list(range(H)), list(range(gq.num_blocks))
        checked = "every row"
    err, bound = check_sampled(q, k, v, out, indices, counts, gq, gk, heads, blocks)

    t_bsa = _time_ms(run, device)
    rows = [("bsa_ext flash_attn_bsa_3d", t_bsa)]
    if gpu:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("dense SDPA (cuDNN)", SDPBackend.CUDNN_ATTENTION), ("dense SDPA (flash)", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    rows.append((name, _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)))
            except RuntimeError as exc:  # backend not built into this torch
                print(f"  ({name} unavailable: {str(exc).splitlines()[0]})")
    else:
        rows.append(("dense SDPA", _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)))

    print(f"backends: {used}")
    print(f"selected density: {density:.4f} ({counts.double().mean().item():.1f} of {gk.num_blocks} key blocks per query block)")
    verdict = "within" if err <= bound else "OUTSIDE"
    print(f"error vs fp64 reference ({checked}): max |out - ref| = {err:.3e}, bound {bound:.3e} ({verdict} the tolerance rule)")
    print(f"\n{'':28s}{'ms':>10s}{'x bsa_ext':>12s}")
    for name, ms in rows:
        print(f"{name:28s}{ms:10.2f}{ms / t_bsa:11.2f}x")
    print("(x bsa_ext = that row's time over bsa_ext's, measured in this process)")
    return 0 if err <= bound else 1
