"""Named BSA settings for LongCat-Video and the validation of ``bsa_params``.

The presets live in ``bsa_ext/data/presets.json`` (package data); their measured speed
and error are in ``docs/presets.md`` (regenerate with
``python -m bsa_ext bench --write-docs docs/presets.md``).
``bsa_params`` is LongCat's dict: the keyword arguments its attention layer passes to
``flash_attn_bsa_3d``; every check here follows SPEC §1-2.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .capabilities import BACKENDS, KERNEL_CAPACITIES

# LongCat's bsa_params keys: what upstream's flash_attn_bsa_3d accepts.
PARAM_KEYS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")
# bsa_ext's keyword-only extras: valid at runtime once install() routes calls here.
RUNTIME_KEYS = ("max_blocks", "backend")


class BSAParamError(ValueError):
    """A ``bsa_params`` value or preset name that SPEC does not allow."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    use: str
    enable_bsa: bool
    bsa_params: Optional[Dict[str, Any]]  # None: leave the model's params as they are

    def params(self) -> Optional[Dict[str, Any]]:
        """A fresh copy of the preset's ``bsa_params`` (callers may mutate it)."""
        return None if self.bsa_params is None else json.loads(json.dumps(self.bsa_params))


def default_bsa_params() -> Dict[str, Any]:
    """The defaults of ``flash_attn_bsa_3d``: what a missing key means."""
    from .interface import flash_attn_bsa_3d  # the signature is the one source of these defaults

    sig = inspect.signature(flash_attn_bsa_3d)
    out = {}
    for key in PARAM_KEYS:
        value = sig.parameters[key].default
        out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(x) -> str:
    return f"{type(x).__name__} {x!r}"


def _chunk(key: str, value) -> List[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise BSAParamError(f"{key}: expected a list of three positive integers [t, h, w], got {_describe(value)}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value):
        raise BSAParamError(f"{key}: expected three positive integers [t, h, w], got {list(value)!r}")
    cap = math.prod(value)
    if cap not in KERNEL_CAPACITIES:
        raise BSAParamError(
            f"{key}: chunk capacity t*h*w = {cap} for {list(value)}; supported capacities: "
            f"{', '.join(map(str, KERNEL_CAPACITIES))}"
        )
    return [int(x) for x in value]


def validate_bsa_params(params: Mapping[str, Any], *, allow_runtime: bool = False, fill_defaults: bool = False) -> Dict[str, Any]:
    """Check ``bsa_params`` against SPEC and return a normalised copy.

    ``allow_runtime`` admits bsa_ext's extras (``max_blocks``, ``backend``), which
    upstream's function would reject; ``fill_defaults`` adds the keys that are missing
    with ``flash_attn_bsa_3d``'s defaults, giving the parameters a call really uses.
    """
    if not isinstance(params, Mapping):
        raise BSAParamError(f"bsa_params: expected a dict (JSON object), got {_describe(params)}")
    allowed = PARAM_KEYS + (RUNTIME_KEYS if allow_runtime else ())
    unknown = [k for k in params if k not in allowed]
    if unknown:
        hint = "" if allow_runtime or not set(unknown) & set(RUNTIME_KEYS) else " (runtime-only: pass it to enable_bsa after install())"
        raise BSAParamError(f"bsa_params: unknown key {unknown[0]!r}{hint}; known keys: {', '.join(allowed)}")
    merged = dict(default_bsa_params()) if fill_defaults else {}
    merged.update(params)
    out: Dict[str, Any] = {}
    for key, value in merged.items():
        if key == "sparsity":
            if value is not None and not (_is_real(value) and 0.0 <= value < 1.0):
                raise BSAParamError(f"sparsity: expected a number in [0, 1) or null, got {_describe(value)}")
            out[key] = None if value is None else float(value)
        elif key == "cdf_threshold":
            if value is not None and not (_is_real(value) and 0.0 < value <= 1.0):
                raise BSAParamError(f"cdf_threshold: expected a number in (0, 1] or null, got {_describe(value)}")
            out[key] = None if value is None else float(value)
        elif key in ("chunk_3d_shape_q", "chunk_3d_shape_k"):
            out[key] = _chunk(key, value)
        elif key == "max_blocks":
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise BSAParamError(f"max_blocks: expected a positive integer or null, got {_describe(value)}")
            out[key] = value
        elif key == "backend":
            if value not in ("auto",) + BACKENDS:
                raise BSAParamError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {_describe(value)}")
            out[key] = value
    # A missing sparsity means the function default (0.875), so only an explicit null counts.
    sparsity = merged.get("sparsity", default_bsa_params()["sparsity"])
    if sparsity is None and merged.get("cdf_threshold") is None:
        raise BSAParamError("sparsity / cdf_threshold: expected at least one of them, got both null")
    return out


@lru_cache(maxsize=1)
def _catalogue() -> Tuple[str, Dict[str, Preset]]:
    text = resources.files("bsa_ext").joinpath("data/presets.json").read_text(encoding="utf-8")
    data = json.loads(text)
    presets = {}
    for name, entry in data["presets"].items():
        params = entry.get("bsa_params")
        if params is not None:
            params = validate_bsa_params(params)
        presets[name] = Preset(name, entry["description"], entry["use"], bool(entry["enable_bsa"]), params)
    if data["default"] not in presets:
        raise RuntimeError(f"bsa_ext/data/presets.json: default preset {data['default']!r} is not defined")
    return data["default"], presets


def _load() -> Dict[str, Preset]:
    return _catalogue()[1]


def preset_names() -> List[str]:
    return list(_load())


def default_preset_name() -> str:
    """The preset matching LongCat's released refinement config."""
    return _catalogue()[0]


def get_preset(name: str) -> Preset:
    presets = _load()
    if name not in presets:
        raise BSAParamError(f"preset: unknown name {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


def match_preset(enable_bsa: bool, bsa_params: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The name of the preset these settings equal (defaults filled in), if any."""
    try:
        full = validate_bsa_params(bsa_params, fill_defaults=True) if bsa_params is not None else None
    except BSAParamError:
        return None
    for preset in _load().values():
        if preset.enable_bsa != bool(enable_bsa):
            continue
        if not preset.enable_bsa:
            return preset.name
        if full is not None and validate_bsa_params(preset.bsa_params, fill_defaults=True) == full:
            return preset.name
    return None


def describe_presets() -> str:
    """A plain-text table of the presets (for the CLI)."""
    rows = []
    for p in _load().values():
        if p.enable_bsa:
            bp = p.bsa_params
            sparsity = "-" if bp.get("sparsity") is None else f"{bp['sparsity']:g}"
            cdf = "-" if bp.get("cdf_threshold") is None else f"{bp['cdf_threshold']:g}"
            chunk_q, chunk_k = ("x".join(map(str, bp[key])) for key in ("chunk_3d_shape_q", "chunk_3d_shape_k"))
            chunk = chunk_q if chunk_q == chunk_k else f"{chunk_q}/{chunk_k}"
            rows.append((p.name, "on", sparsity, cdf, chunk, p.use))
        else:
            rows.append((p.name, "off", "-", "-", "-", p.use))
    head = ("preset", "bsa", "sparsity", "cdf", "chunk q/k", "use")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head] + rows)


__all__ = [
    "PARAM_KEYS",
    "RUNTIME_KEYS",
    "BSAParamError",
    "Preset",
    "default_bsa_params",
    "validate_bsa_params",
    "preset_names",
    "default_preset_name",
    "get_preset",
    "match_preset",
    "describe_presets",
]
