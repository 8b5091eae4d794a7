"""``python -m bsa_ext bench``: the preset tuning study (speed and error per preset).

For each preset of ``bsa_ext/data/presets.json`` on LongCat's 720p refinement shape
(latent ``(T, 44, 80)``, 32 heads, head dim 128, bf16; ``long-video`` on twice the
frames) it measures:

* ``ms``: ``flash_attn_bsa_3d`` (selection + attention), median of
  ``triton.testing.do_bench``, and dense SDPA (cuDNN and flash backends) in the same
  process; ``speedup`` is the faster dense time over the BSA time;
* ``rel_err``: ``||o_bsa - o_dense|| / ||o_dense||`` (Frobenius) over the first
  ``--error-heads`` heads, the dense output computed in fp32 from the same inputs;
  ``dense_bf16_err`` is the same measure for dense bf16 SDPA: the precision floor;
* ``mass_kept``: the mean, over sampled query tokens, of the dense softmax mass that
  falls in the key blocks the selection kept (1.0 = nothing lost);
* ``blocks_kept``: the mean fraction of key blocks kept per query block.

Inputs (no weights are involved): q and k share one smooth random field over
(T, H, W) (a coarse random grid, trilinearly upsampled, twice the amplitude of the
noise), each with its own token noise, then RMS-normalised per token as LongCat's
``q_norm`` / ``k_norm`` do, times 1.5 for the norms' learned weight; v is an independent
smooth field (``bsa_ext.workloads.video_like_qkv``). Neighbouring chunks look
alike and attention is local, as in a video latent; the numbers are indicative of the
trade-off between presets, not of a specific video.

Writes ``tuning.json``, ``tuning.md`` (the table) and ``tuning.png`` (speedup vs
error; needs matplotlib) to ``--out``; ``--write-docs FILE`` replaces the table
between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in FILE. Without a GPU it
runs a tiny CPU version of the same study (fp32, PyTorch backend) in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import interface
from .layout import ChunkGeometry
from .workloads import measured_commit, video_like_qkv
from .presets import get_preset, preset_names, validate_bsa_params

DOCS_BEGIN = "<!-- bench:begin -->"
DOCS_END = "<!-- bench:end -->"


def make_inputs(heads: int, latent, head_dim: int, dtype, device, seed: int = 0):
    """Video-like q, k, v ``[1, heads, T*H*W, head_dim]`` (``bsa_ext.workloads``)."""
    return video_like_qkv(1, heads, latent, head_dim, dtype, device, seed)


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def dense_times(q, k, v, timer) -> Dict[str, Optional[float]]:
    """Dense SDPA ms per backend (None where a backend cannot run these inputs)."""
    if q.device.type != "cuda":
        return {"dense_sdpa": timer(lambda: F.scaled_dot_product_attention(q, k, v))}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("dense_cudnn", SDPBackend.CUDNN_ATTENTION), ("dense_flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out[name] = timer(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError:
            out[name] = None
    return out


def _dense_fp32(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((out.float() - ref).flatten()) / torch.linalg.vector_norm(ref.flatten())).item()


def mass_kept(q, k, indices, counts, geom_q: ChunkGeometry, geom_k: ChunkGeometry, rows: int, seed: int) -> float:
    """Mean dense softmax mass inside the kept key blocks, over ``rows`` sampled query tokens per head."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sq = q.shape[2]
    pick = torch.randperm(sq, generator=gen)[: min(rows, sq)].to(q.device)
    qblock = geom_q.block_of_token(q.device)[pick]  # [n]
    kblock = geom_k.block_of_token(q.device)  # [Sk]
    nk, kmax = geom_k.num_blocks, indices.shape[-1]
    scale = q.shape[-1] ** -0.5
    masses = []
    for h in range(q.shape[1]):
        ids = indices[0, h].long()  # [Nq, Kmax]
        live = torch.arange(kmax, device=q.device) < counts[0, h, :, None]
        kept = torch.zeros(ids.shape[0], nk + 1, dtype=torch.bool, device=q.device)
        kept.scatter_(1, torch.where(live, ids, torch.full_like(ids, nk)), True)
        p = torch.softmax((q[0, h, pick].float() @ k[0, h].float().T) * scale, dim=-1)  # [n, Sk]
        masses.append((p * kept[qblock][:, kblock]).sum(-1).mean().item())
    return sum(masses) / len(masses)


def study(args) -> Dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tiny = device.type == "cpu"
    if tiny:
        latent, long_latent, heads, head_dim, dtype, backend = (8, 8, 16), (16, 8, 16), 2, 64, torch.float32, "torch"
        error_heads, rows = heads, 256
    else:
        latent, long_latent = (args.frames, 44, 80), (2 * args.frames, 44, 80)
        heads, head_dim, dtype, backend = args.heads, args.head_dim, torch.bfloat16, args.backend
        error_heads, rows = min(args.error_heads, heads), args.mass_rows
    timer = _timer(device, args.reps)
    names = args.presets.split(",") if args.presets else preset_names()
    inputs: Dict[tuple, Any] = {}
    results = []
    for name in names:
        preset = get_preset(name)
        lat = long_latent if name == "long-video" else latent
        if lat not in inputs:
            q, k, v = make_inputs(heads, lat, head_dim, dtype, device, args.seed)
            dense = dense_times(q, k, v, timer)
            ref = _dense_fp32(q[:, :error_heads], k[:, :error_heads], v[:, :error_heads])
            floor = rel_err(F.scaled_dot_product_attention(q[:, :error_heads], k[:, :error_heads], v[:, :error_heads]), ref)
            inputs[lat] = (q, k, v, dense, ref, floor)
        q, k, v, dense, ref, floor = inputs[lat]
        dense_best = min(t for t in dense.values() if t is not None)
        row: Dict[str, Any] = {
            "preset": name,
            "latent": list(lat),
            "enable_bsa": preset.enable_bsa,
            **dense,
            "dense_bf16_err" if not tiny else "dense_lowp_err": floor,
        }
        if not preset.enable_bsa:
            row.update(ms=dense_best, speedup=1.0, rel_err=0.0, mass_kept=1.0, blocks_kept=1.0, backend="dense")
            results.append(row)
            continue
        params = validate_bsa_params(preset.params(), fill_defaults=True)
        call = lambda: interface.flash_attn_bsa_3d(q, k, v, lat, lat, **params, backend=backend)  # noqa: E731
        out = call()
        from .ops import last_backend

        used = last_backend()
        ms = timer(call)
        gq = ChunkGeometry(lat, tuple(params["chunk_3d_shape_q"]))
        gk = ChunkGeometry(lat, tuple(params["chunk_3d_shape_k"]))
        qe, ke = q[:, :error_heads], k[:, :error_heads]
        idx, cnt = interface.select_blocks(
            qe, ke, lat, lat, params["chunk_3d_shape_q"], params["chunk_3d_shape_k"],
            params["sparsity"], params["cdf_threshold"], backend=backend,
        )
        row.update(
            chunk=params["chunk_3d_shape_q"],
            sparsity=params["sparsity"],
            cdf_threshold=params["cdf_threshold"],
            ms=ms,
            speedup=dense_best / ms,
            rel_err=rel_err(out[:, :error_heads], ref),
            mass_kept=mass_kept(qe, ke, idx, cnt, gq, gk, rows, args.seed),
            blocks_kept=cnt.float().mean().item() / gk.num_blocks,
            backend=used,
        )
        results.append(row)
        print(f"  {name}: {ms:.2f} ms, x{row['speedup']:.2f}, rel_err {row['rel_err']:.4f}, mass {row['mass_kept']:.3f}", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny study)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "commit": measured_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
        "heads": heads,
        "head_dim": head_dim,
        "error_heads": error_heads,
        "mass_rows": rows,
        "inputs": "video-like: shared smooth field + token noise, RMS-normalised q/k (bsa_ext.tuning docstring)",
        "rows": results,
    }


def table(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    dense_keys = [k for k in ("dense_cudnn", "dense_flash", "dense_sdpa") if any(r.get(k) is not None for r in rows)]
    head = ["preset", "latent", "sparsity", "cdf", "chunk", "ms", *[f"{k} ms" for k in dense_keys], "speedup", "rel. error", "mass kept", "blocks kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        on = r["enable_bsa"]
        cells = [
            r["preset"] + ("" if on else " (BSA off)"),
            "x".join(map(str, r["latent"])),
            fmt(r.get("sparsity"), "g") if on else "-",
            fmt(r.get("cdf_threshold"), "g") if on else "-",
            "x".join(map(str, r["chunk"])) if on else "-",
            f"{r['ms']:.2f}",
            *[fmt(r.get(k), ".2f") for k in dense_keys],
            f"{r['speedup']:.2f}x",
            f"{r['rel_err']:.4f}",
            f"{r['mass_kept']:.3f}",
            f"{100 * r['blocks_kept']:.1f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    meta = (
        f"Measured on {report['gpu']}, torch {report['torch']}, commit {report['commit']}, {report['date']}; "
        f"B=1, H={report['heads']}, D={report['head_dim']}, {report['dtype']}; error over {report['error_heads']} heads, "
        f"mass over {report['mass_rows']} sampled queries per head. Regenerate: `python -m bsa_ext bench`."
    )
    return "\n".join(lines) + "\n\n" + meta + "\n"


def plot(report: Dict[str, Any], path: str) -> Optional[str]:
    """Speedup vs error (and vs attention mass kept); returns why not, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not importable ({exc}); wrote the table only"
    rows = [r for r in report["rows"] if r["enable_bsa"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        ax1.scatter(r["speedup"], r["rel_err"], s=40)
        ax1.annotate(r["preset"], (r["speedup"], r["rel_err"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax2.scatter(r["speedup"], r["mass_kept"], s=40)
        ax2.annotate(r["preset"], (r["speedup"], r["mass_kept"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    floor_key = "dense_bf16_err" if any("dense_bf16_err" in r for r in report["rows"]) else "dense_lowp_err"
    floor = report["rows"][0].get(floor_key)
    if floor:
        ax1.axhline(floor, color="grey", ls="--", lw=0.8, label=f"dense {report['dtype']} vs fp32")
        ax1.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_xlabel("speedup over dense SDPA")
    ax1.set_ylabel("output relative error vs dense")
    ax2.set_xlabel("speedup over dense SDPA")
    ax2.set_ylabel("attention mass kept")
    fig.suptitle(f"bsa_ext presets, {report['gpu']}, H={report['heads']} D={report['head_dim']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_docs(path: str, text: str) -> None:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start, end = doc.find(DOCS_BEGIN), doc.find(DOCS_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {DOCS_BEGIN} ... {DOCS_END} markers to replace")
    doc = doc[: start + len(DOCS_BEGIN)] + "\n" + text + doc[end:]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bsa_ext bench", description="Speed and error of every BSA preset vs dense attention.")
    p.add_argument("--presets", help="comma-separated preset names (default: all)")
    p.add_argument("--frames", type=int, default=24, help="latent frames T of the 720p shape (T, 44, 80); long-video uses 2T")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backend", default="auto", help="bsa_ext backend for the BSA runs")
    p.add_argument("--error-heads", type=int, default=4, help="heads over which error and mass are measured")
    p.add_argument("--mass-rows", type=int, default=512, help="sampled query tokens per head for the mass kept")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the tiny CPU study even where a GPU exists")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "tuning"), help="output directory")
    p.add_argument("--write-docs", metavar="FILE", help="replace the table between the bench markers in FILE")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m bsa_ext bench``."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.presets:
        unknown = [n for n in args.presets.split(",") if n not in preset_names()]
        if unknown:
            print(f"bsa_ext bench: error: unknown preset {unknown[0]!r}; known: {', '.join(preset_names())}", file=sys.stderr)
            return 2
    if not torch.cuda.is_available() and not args.tiny:
        print("bsa_ext bench: no CUDA GPU; running the tiny CPU study (fp32, PyTorch backend)", flush=True)
    report = study(args)
    os.makedirs(args.out, exist_ok=True)
    text = table(report)
    with open(os.path.join(args.out, "tuning.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "tuning.md"), "w", encoding="utf-8") as f:
        f.write(text)
    why_not = plot(report, os.path.join(args.out, "tuning.png"))
    if why_not:
        print(f"bsa_ext bench: {why_not}")
    if args.write_docs:
        write_docs(args.write_docs, text)
    print(f"wrote {args.out}/tuning.json, tuning.md" + ("" if why_not else ", tuning.png"))
    print()
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
