"""Gradient errors of every GPU backward against the fp64 reference, per selection mode and scale.

    python tools/device/bwd_errors.py
For video-like inputs (latent (8, 12, 20), chunks (4, 4, 4), 4 heads, D = 128, bf16) scaled
x1, x4, x16, in top-k, cdf and cdf+top-k selection, prints max |g - ref| of dq, dk, dv and
its ratio to the tolerance rule's bound (2 * max |pt - ref| + 1e-5 * max |ref|; <= 1 passes)
for the CUDA kernels (sm90 and sm80 families) and the Triton path on identical block lists.
"""

import os
import sys

import torch

import bsa_ext
from bsa_ext import reference
from bsa_ext.layout import ChunkGeometry
from bsa_ext.workloads import video_like_qkv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python_tests"))
from helpers import low_precision_attention  # noqa: E402

MODES = {"topk": (0.75, None), "cdf": (None, 0.9), "cdf+topk": (0.75, 0.9)}


def run(backend, q, k, v, dout, indices, counts, g):
    out, lse = torch.ops.bsa.forward(q, k, v, indices, counts, g.latent, g.latent, g.chunk, g.chunk, 128**-0.5, backend)
    return torch.ops.bsa.backward(dout, q, k, v, out, lse, indices, counts, g.latent, g.latent, g.chunk, g.chunk,
                                  128**-0.5, backend)


def main():
    g = ChunkGeometry((8, 12, 20), (4, 4, 4))
    sm90 = torch.cuda.get_device_capability()[0] == 9
    impls = (["cuda-sm90"] if sm90 else []) + ["cuda-sm80", "triton"]
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'mode':10s}{'scale':>6s} {'impl':10s}" + "".join(f"{n + ' err':>11s}{'/bound':>8s}" for n in ("dq", "dk", "dv")))
    for mode, (sparsity, cdf) in MODES.items():
        for scale in (1.0, 4.0, 16.0):
            q, k, v = video_like_qkv(1, 4, g.latent, 128, torch.bfloat16, "cuda", seed=3)
            q, k = q * (scale / 1.5), k * (scale / 1.5)
            dout = torch.randn_like(q)
            indices, counts = bsa_ext.select_blocks(q, k, g.latent, g.latent, g.chunk, g.chunk, sparsity, cdf)
            refs = reference.attention_backward(dout, q, k, v, indices, counts, g, g, 128**-0.5)
            pts = low_precision_attention(q, k, v, indices, counts, g, g, 128**-0.5, dout=dout)
            for impl in impls:
                os.environ["BSA_DISABLE_SM90"] = "1" if impl == "cuda-sm80" else "0"
                grads = run(impl.split("-")[0], q, k, v, dout, indices, counts, g)
                cells = []
                for got, ref, pt in zip(grads, refs, pts):
                    err = (got.double() - ref).abs().max().item()
                    bound = 2 * (pt.double() - ref).abs().max().item() + 1e-5 * max(1.0, ref.abs().max().item())
                    cells.append(f"{err:11.3e}{err / bound:8.2f}")
                print(f"{mode:10s}{scale:6.0f} {impl:10s}" + "".join(cells))
    os.environ.pop("BSA_DISABLE_SM90", None)


if __name__ == "__main__":
    main()
