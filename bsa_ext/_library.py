"""Loads the compiled libraries: the op schemas (always) and the CUDA kernels (if built)."""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _find(stem: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(_HERE, stem + ".*so")) + glob.glob(os.path.join(_HERE, stem + ".*pyd")))
    return found[0] if found else None


def _load(stem: str) -> Optional[str]:
    """Load ``bsa_ext/<stem>.*.so`` into the dispatcher; return an error string or None."""
    path = _find(stem)
    if path is None:
        return (
            f"bsa_ext/{stem} is not built (in a source tree: `pip install --no-build-isolation -e .`; "
            "otherwise reinstall the package)"
        )
    try:
        torch.ops.load_library(path)
    except OSError as exc:  # a build for another torch ABI, a missing CUDA runtime, ...
        return f"loading {os.path.basename(path)} failed: {exc}"
    return None


def build_info() -> dict:
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except OSError:
        return {"cuda_built": False, "cuda_skip_reason": "no build record (not installed through setup.py)", "cuda_archs": []}


SCHEMA_LOAD_ERROR = _load("_C")
if SCHEMA_LOAD_ERROR is not None:
    raise ImportError(
        f"bsa_ext: the operator library could not be loaded: {SCHEMA_LOAD_ERROR}. "
        "Build it with `pip install --no-build-isolation -e .` (see README, Troubleshooting)."
    )

_info = build_info()
if _find("_cuda") is None:
    CUDA_LOAD_ERROR: Optional[str] = "CUDA kernels not built: " + str(
        _info.get("cuda_skip_reason") or "bsa_ext/_cuda library missing"
    )
else:
    CUDA_LOAD_ERROR = _load("_cuda")


def has_cuda_kernel(op_name: str) -> bool:
    if CUDA_LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bsa::{op_name}", "CUDA")
