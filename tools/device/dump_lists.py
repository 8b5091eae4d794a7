"""Writes the CUDA selection of the benchmark's W720s inputs as raw int32 [H, Nq, K] (the
lists fwd_phases.cu reads with BSA_LISTS=path). Usage: python3 tools/device/dump_lists.py PATH"""
import sys

import torch

import bsa_ext
from bsa_ext.workloads import WORKLOADS, make_inputs

w = WORKLOADS["W720s"]
q, k, _ = make_inputs(w)
indices, counts = bsa_ext.select_blocks(q, k, w.latent, w.latent, w.chunk, w.chunk, w.sparsity, None, backend="cuda")
assert int(counts.min()) == int(counts.max()) == indices.shape[-1], "top-k lists of one length"
indices[0].contiguous().cpu().numpy().tofile(sys.argv[1])
print(f"wrote {tuple(indices[0].shape)} ids to {sys.argv[1]}")
