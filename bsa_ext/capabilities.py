"""The one table of what each backend can run.

The dispatcher (``backend="auto"``), the error messages, the tests and
``python -m bsa_ext info`` all read ``CAPABILITIES``; nothing else states which
dtypes, head dims or chunk capacities a backend supports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")  # the order "auto" tries
OPS = ("select", "forward", "backward")
CUDA_OP_NAMES = {"select": "cuda_select_blocks", "forward": "cuda_forward", "backward": "cuda_backward"}


@dataclass(frozen=True)
class Capability:
    backend: str
    op: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    head_dims: Optional[Tuple[int, ...]]  # None: any
    capacities: Optional[Tuple[int, ...]]  # chunk capacity t*h*w; None: any
    min_compute_capability: Optional[Tuple[int, int]] = None
    max_key_blocks: Optional[int] = None
    max_query_blocks: Optional[int] = None
    # CUDA kernels copy 16-byte pieces of rows (cp.async, TMA): every row and base pointer of
    # q, k, v (and out, dout) must be that aligned.
    row_alignment_bytes: Optional[int] = None
    # CUDA kernels put batch * heads on the grid's y dimension.
    max_batch_heads: Optional[int] = None


# Chunk capacities the public API accepts (SPEC §1). The reference could take any, but
# keeping every backend to the kernels' set means a config that runs on CPU runs on GPU.
KERNEL_CAPACITIES = (16, 32, 64, 128, 256)

_HALF = (torch.float16, torch.bfloat16)
_ALL_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_HEAD_DIMS = (32, 64, 96, 128, 256)  # 96 runs on a zero-padded 128-wide tile
_CUDA_LIMITS = dict(row_alignment_bytes=16, max_batch_heads=65535)  # csrc/bindings_cuda.cpp checks both

CAPABILITIES: Dict[Tuple[str, str], Capability] = {
    (c.backend, c.op): c
    for c in [
        Capability("cuda", "select", ("cuda",), _HALF, (64, 128), (64, 128), (8, 0), 4096, **_CUDA_LIMITS),
        Capability("cuda", "forward", ("cuda",), _HALF, (64, 128), (64, 128), (8, 0), **_CUDA_LIMITS),
        # The inverse index of the CUDA backward sorts each key block's list with one shared-memory
        # counter per query block (csrc/include/bsa/api.h: kInvertMaxQueryBlocks).
        Capability("cuda", "backward", ("cuda",), _HALF, (64, 128), (64, 128), (8, 0), max_query_blocks=48 * 1024,
                   **_CUDA_LIMITS),
        Capability("triton", "select", ("cuda",), _HALF, _TRITON_HEAD_DIMS, KERNEL_CAPACITIES, (8, 0)),
        Capability("triton", "forward", ("cuda",), _HALF, _TRITON_HEAD_DIMS, KERNEL_CAPACITIES, (8, 0)),
        Capability("triton", "backward", ("cuda",), _HALF, _TRITON_HEAD_DIMS, KERNEL_CAPACITIES, (8, 0)),
        Capability("torch", "select", ("cpu", "cuda"), _ALL_FLOAT, None, KERNEL_CAPACITIES),
        Capability("torch", "forward", ("cpu", "cuda"), _ALL_FLOAT, None, KERNEL_CAPACITIES),
        Capability("torch", "backward", ("cpu", "cuda"), _ALL_FLOAT, None, KERNEL_CAPACITIES),
    ]
}



def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_unavailable_reason(backend: str, op: str, device: torch.device, explicit: bool = True) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` at all (before looking at inputs).

    Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs only when asked for by name:
    "auto" never picks it for CPU tensors.
    """
    if backend == "torch":
        return None
    too_old = _compute_capability_reason(backend, op, device)
    if too_old is not None:
        return too_old
    if backend == "triton":
        interpreter = device.type == "cpu" and explicit and _triton_interpreting()
        if device.type != "cuda" and not interpreter:
            return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 and backend='triton'), got {device.type} tensors"
        try:
            from . import triton as triton_backend
        except ImportError as exc:
            return f"the Triton backend failed to import: {exc}"
        return triton_backend.AVAILABLE_REASON
    if backend == "cuda":
        from . import _library

        if _library.CUDA_LOAD_ERROR is not None:
            return _library.CUDA_LOAD_ERROR
        if not _library.has_cuda_kernel(CUDA_OP_NAMES[op]):
            return f"this build has no CUDA kernel for {op} yet"
        if device.type != "cuda":
            return f"CUDA kernels need CUDA tensors, got {device.type} tensors"
        return _arch_not_built_reason(device, _library.build_info().get("cuda_archs", []))
    raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def _compute_capability_reason(backend: str, op: str, device: torch.device) -> Optional[str]:
    need = CAPABILITIES[(backend, op)].min_compute_capability
    if need is None or device.type != "cuda":
        return None
    cc = torch.cuda.get_device_capability(device)
    if cc < need:
        return f"GPU is sm_{cc[0]}{cc[1]}, needs sm_{need[0]}{need[1]} or newer"
    return None


def _alignment_reasons(tensors: Dict[str, torch.Tensor], align: int) -> List[str]:
    reasons = []
    for name, t in tensors.items():
        size = t.element_size()
        bad = [d for d in range(t.dim() - 1) if t.size(d) > 1 and (t.stride(d) * size) % align]
        if bad:
            reasons.append(f"{name}: stride({bad[0]}) = {t.stride(bad[0])} elements is not a multiple of {align} bytes")
        elif t.data_ptr() % align:
            reasons.append(f"{name}: data pointer is not {align}-byte aligned")
    return reasons


def _arch_not_built_reason(device: torch.device, archs: List[str]) -> Optional[str]:
    """None when the build holds machine code this GPU runs (no PTX is embedded).

    SASS for sm_XY runs on sm_XZ with Z >= Y; an arch-specific target (90a) only on itself.
    """
    if not archs:  # no build record (e.g. a library copied by hand): nothing to judge by
        return None
    major, minor = torch.cuda.get_device_capability(device)
    for arch in archs:
        digits = arch.rstrip("af")
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        exact = arch != digits
        if a_major == major and (a_minor == minor if exact else a_minor <= minor):
            return None
    return f"this build has no machine code for sm_{major}{minor} (built for {', '.join('sm_' + a for a in archs)}; rebuild with BSA_CUDA_ARCHS)"


def _fmt(values) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


def not_supported_reasons(
    backend: str,
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    capacities: Tuple[int, ...],
    num_key_blocks: int,
    num_query_blocks: int = 0,
    explicit: bool = True,
    batch_heads: int = 0,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
) -> List[str]:
    """Every reason ``backend`` cannot run ``op`` on these inputs (empty: it can).

    ``tensors`` names the inputs whose layout the kernels read in place (q, k, v, ...)."""
    reason = backend_unavailable_reason(backend, op, device, explicit)
    if reason is not None:
        return [reason]
    cap = CAPABILITIES[(backend, op)]
    reasons = []
    if device.type not in cap.devices and not (backend == "triton" and explicit and _triton_interpreting()):
        reasons.append(f"device {device.type} not in [{_fmt(cap.devices)}]")
    if dtype not in cap.dtypes:
        reasons.append(f"dtype {_fmt([dtype])} not in [{_fmt(cap.dtypes)}]")
    if cap.head_dims is not None and head_dim not in cap.head_dims:
        reasons.append(f"head dim {head_dim} not in [{_fmt(cap.head_dims)}]")
    if cap.capacities is not None:
        for c in sorted(set(capacities)):
            if c not in cap.capacities:
                reasons.append(f"chunk capacity {c} not in [{_fmt(cap.capacities)}]")
    if cap.max_key_blocks is not None and num_key_blocks > cap.max_key_blocks:
        reasons.append(f"{num_key_blocks} key blocks > {cap.max_key_blocks}")
    if cap.max_query_blocks is not None and num_query_blocks > cap.max_query_blocks:
        reasons.append(f"{num_query_blocks} query blocks > {cap.max_query_blocks}")
    if cap.max_batch_heads is not None and batch_heads > cap.max_batch_heads:
        reasons.append(f"batch * heads = {batch_heads} > {cap.max_batch_heads}")
    if cap.row_alignment_bytes is not None and tensors:
        reasons.extend(_alignment_reasons(tensors, cap.row_alignment_bytes))
    return reasons
