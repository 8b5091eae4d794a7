"""Per-kernel GPU time of the CUDA backward at T16-train (or another SPEC workload).

    python tools/device/profile_bwd.py [T16-train] [--sm80]
    ncu --kernel-name regex:"^(dq_kernel|dkdv_kernel)$" python tools/device/profile_bwd.py --no-profile
Runs select + forward once, then profiles five backward calls and prints the CUDA time per
kernel (inverse index, delta, dq, dk/dv) averaged per call, then the whole op call and the
autograd path timed by do_bench (a gap to the kernel total would be host time). ``--no-profile`` stops after two
plain backward calls: a target for ncu, whose profiling and torch's cannot share CUPTI.
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import bsa_ext
from bsa_ext.workloads import WORKLOADS, make_inputs


def main(argv):
    name = next((a for a in argv if not a.startswith("--")), "T16-train")
    if "--sm80" in argv:
        os.environ["BSA_DISABLE_SM90"] = "1"
    w = WORKLOADS[name]
    q, k, v = make_inputs(w)
    g = w.latent, w.latent, w.chunk, w.chunk
    indices, counts = bsa_ext.select_blocks(q, k, *g, w.sparsity, w.cdf_threshold, backend="cuda")
    out, lse = torch.ops.bsa.forward(q, k, v, indices, counts, *g, 128**-0.5, "cuda")
    dout = torch.randn_like(out)

    def bwd():
        return torch.ops.bsa.backward(dout, q, k, v, out, lse, indices, counts, *g, 128**-0.5, "cuda")

    for _ in range(2):
        bwd()
    torch.cuda.synchronize()
    if "--no-profile" in argv:
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            bwd()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5 / 1000) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    print(f"{name} backward on {torch.cuda.get_device_name()} ({'sm80' if '--sm80' in argv else 'default'} family)")
    for key, ms in rows[:12]:
        print(f"  {ms:8.3f} ms  {key[:110]}")
    print(f"  {sum(ms for _, ms in rows):8.3f} ms  total")
    # The same call timed whole, and through autograd as bench_bsa.py times it: a gap to the
    # kernel total above is host time or work between the kernels.
    import triton.testing

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    og = bsa_ext.block_sparse_attention(qg, kg, vg, indices, counts, *g, backend="cuda")
    whole = triton.testing.do_bench(bwd, return_mode="median")
    grad = triton.testing.do_bench(
        lambda: torch.autograd.grad(og, (qg, kg, vg), dout, retain_graph=True), return_mode="median"
    )
    print(f"  {whole:8.3f} ms  whole op call (do_bench)\n  {grad:8.3f} ms  torch.autograd.grad (do_bench)")


if __name__ == "__main__":
    main(sys.argv[1:])
