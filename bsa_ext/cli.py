"""Command line: ``info`` (what this install can run), ``demo``, ``config``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

USAGE = """usage: python -m bsa_ext COMMAND [ARGS]

commands:
  info     version, compiled CUDA archs, and which backend runs each op here (and why not)
  demo     LongCat-shaped block sparse attention: backend, density, error, time vs dense SDPA
  config   inspect or edit a LongCat transformer config.json (python -m bsa_ext config -h)
  bench    presets study: speed and error per preset (python -m bsa_ext bench -h)
"""


def info() -> int:
    from . import __version__, _library
    from .capabilities import BACKENDS, CAPABILITIES, OPS, backend_unavailable_reason

    build = _library.build_info()
    print(f"bsa_ext {__version__}  (torch {torch.__version__}, built against {build.get('built_with_torch', '?')})")
    if build.get("cuda_built"):
        print(f"CUDA kernels: built for sm_{', sm_'.join(build['cuda_archs'])} with CUDA {build.get('cuda_version')}")
        families: dict = {}
        for name in build.get("cuda_kernels", []):  # e.g. fwd_sm80_bf16_hdim128_q64_k64
            parts = name.split("_")
            cut = next((i for i, p in enumerate(parts) if p in ("fp16", "bf16") or p.startswith("hdim")), len(parts))
            families.setdefault("_".join(parts[:cut]), []).append("_".join(parts[cut:]))
        for family, variants in families.items():
            configs = sorted(v for v in variants if v)
            what = f"{len(configs)} instantiations ({', '.join(configs)})" if configs else "one for all configurations"
            print(f"  {family}: {what}")
    else:
        print(f"CUDA kernels: not built ({build.get('cuda_skip_reason')})")
    if _library.CUDA_LOAD_ERROR is not None and build.get("cuda_built"):
        print(f"CUDA kernels: failed to load: {_library.CUDA_LOAD_ERROR}")
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        device = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]})")
    else:
        device = torch.device("cpu")
        print("GPU: none (CPU tensors run on the torch backend)")
    print(f"\nbackends on {device.type} tensors ('auto' tries them in this order):")
    for backend in BACKENDS:
        for op in OPS:
            reason = backend_unavailable_reason(backend, op, device, explicit=False)
            cap = CAPABILITIES[(backend, op)]
            limits = [
                "/".join(str(d).replace("torch.", "") for d in cap.dtypes),
                "head dims " + ("any" if cap.head_dims is None else "/".join(map(str, cap.head_dims))),
                "chunk capacities " + ("any" if cap.capacities is None else "/".join(map(str, cap.capacities))),
            ]
            if cap.max_key_blocks is not None:
                limits.append(f"<= {cap.max_key_blocks} key blocks")
            if cap.max_query_blocks is not None:
                limits.append(f"<= {cap.max_query_blocks} query blocks")
            if cap.max_batch_heads is not None:
                limits.append(f"batch*heads <= {cap.max_batch_heads}")
            if cap.row_alignment_bytes is not None:
                limits.append(f"rows {cap.row_alignment_bytes}-byte aligned")
            if cap.min_compute_capability is not None:
                limits.append("sm_%d%d+" % cap.min_compute_capability)
            what = ", ".join(limits)
            state = "available" if reason is None else f"unavailable: {reason}"
            print(f"  {backend:7s} {op:9s} {state}\n  {'':17s}{what}")
    return 0


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        argparse.ArgumentParser(prog="python -m bsa_ext info").parse_args(rest)
        return info()
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "config":
        from .config_tool import main as config_main

        return config_main(rest)
    if command == "bench":
        from .tuning import main as bench_main

        return bench_main(rest)
    print(f"python -m bsa_ext: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
