#!/usr/bin/env bash
# One device call for the Hopper forward: sm90 tests, compute-sanitizer on tiny shapes (the
# sm90 kernel is the default there), then timings of the sm90 and sm80 kernels and dense
# cuDNN SDPA in one process, on the SPEC workloads with video-like inputs.
# Usage (repo root, built .so files present): OUT=/dir bash benchmarks/profile_sm90.sh [tests|sanitize|time|ncu]...
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/bsa_out}; mkdir -p "$OUT"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
STEPS=${*:-tests sanitize time}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"

for step in $STEPS; do
case $step in
tests)
  timeout 110 python3 -m pytest python_tests/test_cuda_sm90.py -q --maxfail=8 --tb=short -p no:cacheprovider > "$OUT/sm90_tests.log" 2>&1
  tail -n 25 "$OUT/sm90_tests.log" ;;
sanitize)
  timeout 50 "$CS" --tool memcheck --kernel-name kns=sm90 python3 tools/device/sanitize_small.py > "$OUT/sm90_memcheck.log" 2>&1
  timeout 40 "$CS" --tool synccheck --kernel-name kns=sm90 python3 tools/device/sanitize_small.py > "$OUT/sm90_synccheck.log" 2>&1
  tail -n 2 "$OUT/sm90_memcheck.log" "$OUT/sm90_synccheck.log" ;;
time)
  timeout 110 python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/sm90_timing.log"
import json, os, sys, time
import torch, triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
import bsa_ext  # noqa: F401
from bsa_ext.layout import ChunkGeometry, topk_count
from bsa_ext.workloads import WORKLOADS, make_inputs

out_dir = sys.argv[1]
gpu = torch.cuda.get_device_name()
rows = []

def bench(fn, rep=60):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")

def forward_ms(args, impl):
    os.environ["BSA_DISABLE_SM90"] = "1" if impl == "sm80" else "0"
    fn = lambda: torch.ops.bsa.cuda_forward(*args)  # noqa: E731
    fn()
    return bench(fn)

# BSA_TIME_WORKLOADS picks workloads; BSA_TIME_BASELINES=0 times the sm90 kernel alone.
names = os.environ.get("BSA_TIME_WORKLOADS", "W720s W720s-c128 W720").split()
baselines = os.environ.get("BSA_TIME_BASELINES", "1") != "0"
for name in names:
    w = WORKLOADS[name]
    g = ChunkGeometry(w.latent, w.chunk)
    q, k, v = make_inputs(w)
    K = topk_count(g.num_blocks, w.sparsity)
    gi = g.as_ints()
    idx, cnt = torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, K, -1.0, K)
    flops = 4.0 * w.batch * w.heads * g.seq_len * K * g.capacity * w.head_dim
    variants = [("video", idx)]
    if name == "W720s":  # uniform random ids: no locality between neighbouring query blocks
        rnd = torch.rand(w.batch, w.heads, g.num_blocks, g.num_blocks, device="cuda").argsort(-1)[..., :K]
        variants.append(("random", rnd.to(torch.int32).contiguous()))
    for label, ids in variants:
        args = (q, k, v, ids, cnt, gi, gi, w.head_dim**-0.5)
        for impl in ("sm90", "sm80") if baselines else ("sm90",):
            ms = forward_ms(args, impl)
            rows.append((name, label, impl, ms, flops / ms / 1e9))
        os.environ["BSA_DISABLE_SM90"] = "0"
        o90, l90 = torch.ops.bsa.cuda_forward(*args)
        os.environ["BSA_DISABLE_SM90"] = "1"
        o80, l80 = torch.ops.bsa.cuda_forward(*args)
        print(f"{name}/{label}: max|sm90-sm80| out {(o90.float()-o80.float()).abs().max().item():.3e} "
              f"lse {(l90-l80).abs().max().item():.3e}, nan {torch.isnan(o90).any().item()}")
        del o90, l90, o80, l80
    if baselines and name in ("W720s", "W720s-c128"):
        dense = 4.0 * w.batch * w.heads * g.seq_len * g.seq_len * w.head_dim
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), rep=5)
        rows.append((name, "dense", "dense_cudnn", ms, dense / ms / 1e9))
    del q, k, v, idx, cnt
    torch.cuda.empty_cache()

os.environ.pop("BSA_DISABLE_SM90", None)
print(f"GPU: {gpu}")
print(f"{'workload':<12} {'indices':<8} {'impl':<12} {'ms':>9} {'TFLOP/s':>8}")
with open(os.path.join(out_dir, "sm90_timings.jsonl"), "a") as f:
    for name, label, impl, ms, tf in rows:
        print(f"{name:<12} {label:<8} {impl:<12} {ms:9.3f} {tf:8.1f}")
        f.write(json.dumps({"workload": name, "indices": label, "op": "forward", "impl": impl, "ms": ms,
                            "tflops": tf, "gpu": gpu, "date": time.strftime("%Y-%m-%d")}) + "\n")
PY
  ;;
ncu)
  # L2 hit rate and tensor-pipe utilisation of one W720s sm90 forward launch.
  timeout 200 ncu --kernel-name regex:forward_kernel --launch-count 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
    python3 - <<'PY' > "$OUT/sm90_ncu.log" 2>&1
import torch
import bsa_ext  # noqa: F401
from bsa_ext.layout import ChunkGeometry, topk_count
from bsa_ext.workloads import WORKLOADS, make_inputs
w = WORKLOADS["W720s"]
g = ChunkGeometry(w.latent, w.chunk)
q, k, v = make_inputs(w)
K = topk_count(g.num_blocks, w.sparsity)
idx, cnt = torch.ops.bsa.cuda_select_blocks(q, k, g.as_ints(), g.as_ints(), K, -1.0, K)
torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, g.as_ints(), g.as_ints(), w.head_dim**-0.5)
torch.cuda.synchronize()
PY
  grep -vE "^==PROF==|^ *-+ *-+" "$OUT/sm90_ncu.log" | tail -n 75 ;;
esac
done
true
