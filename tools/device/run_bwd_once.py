"""Runs the CUDA select + forward + backward of one SPEC workload twice (a target for ncu).

    ncu --kernel-name regex:bwd python tools/device/run_bwd_once.py [T16-train]
"""

import sys

import torch

import bsa_ext
from bsa_ext.workloads import WORKLOADS, make_inputs

w = WORKLOADS[sys.argv[1] if len(sys.argv) > 1 else "T16-train"]
q, k, v = make_inputs(w)
g = w.latent, w.latent, w.chunk, w.chunk
indices, counts = bsa_ext.select_blocks(q, k, *g, w.sparsity, w.cdf_threshold, backend="cuda")
out, lse = torch.ops.bsa.forward(q, k, v, indices, counts, *g, 128**-0.5, "cuda")
dout = torch.randn_like(out)
for _ in range(2):
    torch.ops.bsa.backward(dout, q, k, v, out, lse, indices, counts, *g, 128**-0.5, "cuda")
torch.cuda.synchronize()
