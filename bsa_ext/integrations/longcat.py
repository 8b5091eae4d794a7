"""LongCat-Video and FastVideo's LongCat DiT on bsa_ext, in one line.

Upstream's attention layer (``longcat_video/modules/attention.py``) does
``from ..block_sparse_attention.bsa_interface import flash_attn_bsa_3d`` and, when its
``enable_bsa`` attribute is true, calls
``flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, **self.bsa_params)`` with
``[B, H, S, D]`` tensors; FastVideo's ``fastvideo/models/dits/longcat.py`` calls the same
function by keyword. So:

* ``install()`` rebinds that name, in every module that holds it now and in those
  imported later, to bsa_ext's implementation; ``uninstall()`` puts the originals back.
* ``enable_bsa(model, preset=None, **params)`` / ``disable_bsa(model)`` set
  ``enable_bsa`` and ``bsa_params`` on every attention layer of a DiT;
  ``bsa_enabled(...)`` does it for a ``with`` block (e.g. the 720p refinement only).
* ``configure_pipeline(pipeline, config)`` mirrors FastVideo's ``initialize_pipeline``:
  it reads ``enable_bsa`` / ``bsa_params`` and the ``bsa_*`` override fields.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
import threading
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

from .. import interface
from ..presets import RUNTIME_KEYS, BSAParamError, default_preset_name, get_preset, validate_bsa_params

log = logging.getLogger(__name__)

FUNCTION_NAME = "flash_attn_bsa_3d"

# Every module known to hold LongCat's function: its definition and the layers importing it.
LONGCAT_MODULES = (
    "longcat_video.block_sparse_attention.bsa_interface",
    "longcat_video.modules.attention",
    "longcat_video.modules.avatar.attention",
    "fastvideo.third_party.longcat_video.block_sparse_attention.bsa_interface",
    "fastvideo.third_party.longcat_video.modules.attention",
    "fastvideo.third_party.longcat_video.modules.avatar.attention",
    "fastvideo.models.dits.longcat",
)

_lock = threading.RLock()


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.targets: tuple = ()
        self.originals: Dict[str, Any] = {}  # module name -> the object install() replaced
        self.defaults: Dict[str, Any] = {}  # backend / max_blocks given to install()
        self.finder: Optional[_PatchingFinder] = None


_state = _State()


def flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, *args, **params):
    """LongCat's ``flash_attn_bsa_3d`` on bsa_ext (what ``install()`` binds).

    Same arguments as upstream; ``backend`` and ``max_blocks`` given to ``install()``
    apply unless the call (i.e. ``bsa_params``) sets them.
    """
    for key, value in _state.defaults.items():
        params.setdefault(key, value)
    return interface.flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, *args, **params)


def _inherited_original(name: str):
    """The original of the patched module closest in the package tree to ``name``.

    A module imported after install() may have copied our function from a patched
    ``bsa_interface`` (``from .. import flash_attn_bsa_3d``); uninstall() must give it
    that module's original back.
    """
    parts = name.split(".")
    best, best_len = None, 0
    for other, original in _state.originals.items():
        common = 0
        for a, b in zip(parts, other.split(".")):
            if a != b:
                break
            common += 1
        if common > best_len:
            best, best_len = original, common
    return best


def _patch(module) -> bool:
    """Rebind the function in one module; True when it was rebound now."""
    current = getattr(module, FUNCTION_NAME, None)
    if current is flash_attn_bsa_3d and module.__name__ not in _state.originals:
        inherited = _inherited_original(module.__name__)
        if inherited is not None:
            _state.originals[module.__name__] = inherited
        return False
    if current is None or current is flash_attn_bsa_3d:
        return False
    _state.originals.setdefault(module.__name__, current)
    setattr(module, FUNCTION_NAME, flash_attn_bsa_3d)
    log.debug("bsa_ext: %s.%s now runs on bsa_ext", module.__name__, FUNCTION_NAME)
    return True


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then rebinds the function in the fresh module."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        with _lock:
            if _state.installed:
                _patch(module)

    def __getattr__(self, name):
        # get_source, is_package, resource readers: whatever the real loader offers.
        return getattr(self._loader, name)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the target modules so that later imports are patched too."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _state.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install(*, backend: Optional[str] = None, max_blocks: Optional[int] = None, modules: Iterable[str] = ()) -> List[str]:
    """Route LongCat's ``flash_attn_bsa_3d`` to bsa_ext, now and for later imports.

    ``backend`` / ``max_blocks`` become defaults of every routed call; ``modules`` adds
    names of modules (e.g. a vendored copy of LongCat) that hold the function.
    Idempotent: a second call only updates those defaults. Returns the modules
    patched by this call.
    """
    defaults = validate_bsa_params(
        {k: v for k, v in (("backend", backend), ("max_blocks", max_blocks)) if v is not None}, allow_runtime=True
    )
    with _lock:
        _state.defaults = defaults
        _state.targets = tuple(dict.fromkeys(LONGCAT_MODULES + tuple(modules)))
        if _state.finder is None:
            _state.finder = _PatchingFinder()
            sys.meta_path.insert(0, _state.finder)
        _state.installed = True
        patched = [name for name in _state.targets if name in sys.modules and _patch(sys.modules[name])]
    if patched:
        log.info("bsa_ext: LongCat's flash_attn_bsa_3d now runs on bsa_ext in %s", ", ".join(patched))
    return patched


def uninstall() -> List[str]:
    """Undo ``install()``: restore every rebound name and stop patching new imports."""
    restored = []
    with _lock:
        if _state.finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(_state.finder)
            _state.finder = None
        for name, original in _state.originals.items():
            module = sys.modules.get(name)
            # Leave a name alone that someone rebound after us.
            if module is not None and getattr(module, FUNCTION_NAME, None) is flash_attn_bsa_3d:
                setattr(module, FUNCTION_NAME, original)
                restored.append(name)
        _state.originals.clear()
        _state.defaults = {}
        _state.installed = False
    return restored


def is_installed() -> bool:
    return _state.installed


# ------------------------------------------------------------------ models
def _transformer(model):
    """The DiT inside a model or pipeline (upstream: ``pipe.dit``; FastVideo: ``get_module``)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    if hasattr(model, "get_module"):
        found = model.get_module("transformer", None)
        if found is not None:
            return found
    for attr in ("dit", "transformer"):
        found = getattr(model, attr, None)
        if isinstance(found, torch.nn.Module):
            return found
    raise TypeError(
        f"model: expected a torch.nn.Module or a pipeline with .dit / .transformer / get_module('transformer'), "
        f"got {type(model).__name__}"
    )


def attention_layers(model) -> List[Any]:
    """Every attention layer that can run BSA: a bool ``enable_bsa`` and a ``bsa_params`` attribute.

    (The DiT's own ``enable_bsa`` is a method, so it is not counted.)
    """
    return [
        m for m in _transformer(model).modules() if isinstance(getattr(m, "enable_bsa", None), bool) and hasattr(m, "bsa_params")
    ]


def _layers_or_warn(model, action: str) -> List[Any]:
    layers = attention_layers(model)
    if not layers:
        warnings.warn(
            f"bsa_ext: {type(_transformer(model)).__name__} has no BSA-capable attention layer (no module with a bool "
            f"'enable_bsa' and a 'bsa_params' attribute); {action} did nothing",
            RuntimeWarning,
            stacklevel=3,
        )
    return layers


def _effective_params(layers, preset: Optional[str], params: Mapping[str, Any]) -> Dict[str, Any]:
    if preset is not None:
        chosen = get_preset(preset)
        if not chosen.enable_bsa:
            raise BSAParamError(
                f"preset: {preset!r} turns BSA off; use disable_bsa(model) or apply_preset(model, {preset!r})"
            )
        base = chosen.params()
    else:
        # LongCat keeps the config.json params on every layer; start from them when present.
        current = next((m.bsa_params for m in layers if isinstance(m.bsa_params, Mapping)), None)
        base = dict(current) if current is not None else get_preset(default_preset_name()).params()
    base.update(params)
    return validate_bsa_params(base, allow_runtime=True, fill_defaults=True)


def enable_bsa(model, preset: Optional[str] = None, **params) -> Optional[Dict[str, Any]]:
    """Turn BSA on in every attention layer of ``model`` and return the params in effect.

    The params are the preset's (if given), else the model's current ``bsa_params``,
    else the default preset's; keyword ``params`` override single keys. Everything is
    validated before any layer changes. Returns None (with a warning) when the model
    has no BSA-capable attention layer.
    """
    layers = _layers_or_warn(model, "enable_bsa")
    if not layers:
        return None
    effective = _effective_params(layers, preset, params)
    extras = sorted(set(effective) & set(RUNTIME_KEYS))
    if extras and not is_installed():
        warnings.warn(
            f"bsa_ext: {', '.join(extras)} reach bsa_ext only through install(); upstream's flash_attn_bsa_3d "
            f"rejects them",
            RuntimeWarning,
            stacklevel=2,
        )
    for layer in layers:
        layer.bsa_params = dict(effective)  # one copy per layer, as if each had read config.json
        layer.enable_bsa = True
    log.info("bsa_ext: BSA on in %d attention layers with %s", len(layers), effective)
    return effective


def disable_bsa(model) -> int:
    """Turn BSA off in every attention layer (their ``bsa_params`` stay); returns how many."""
    layers = _layers_or_warn(model, "disable_bsa")
    for layer in layers:
        layer.enable_bsa = False
    if layers:
        log.info("bsa_ext: BSA off in %d attention layers", len(layers))
    return len(layers)


def apply_preset(model, name: str) -> Optional[Dict[str, Any]]:
    """Apply a preset, including the BSA-off ones (returns None for those)."""
    if get_preset(name).enable_bsa:
        return enable_bsa(model, name)
    disable_bsa(model)
    return None


@contextlib.contextmanager
def bsa_enabled(model, preset: Optional[str] = None, **params) -> Iterator[Optional[Dict[str, Any]]]:
    """BSA on inside the ``with`` block only; every layer's previous state comes back after.

    ``with bsa_enabled(pipe.dit, "720p-balanced"): pipe.generate_refine(...)``
    """
    saved = [(m, m.enable_bsa, m.bsa_params) for m in attention_layers(model)]
    try:
        yield enable_bsa(model, preset, **params)
    finally:
        for layer, was_enabled, old_params in saved:
            layer.enable_bsa = was_enabled
            layer.bsa_params = old_params


# ------------------------------------------------------------------ pipelines
# FastVideo's pipeline-config override fields and the bsa_params key each one sets.
OVERRIDE_FIELDS = {
    "bsa_sparsity": "sparsity",
    "bsa_cdf_threshold": "cdf_threshold",
    "bsa_chunk_q": "chunk_3d_shape_q",
    "bsa_chunk_k": "chunk_3d_shape_k",
}


def _field(config, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def configure_pipeline(pipeline, config, *, logger: Optional[logging.Logger] = None) -> Optional[Dict[str, Any]]:
    """Enable or disable BSA on a pipeline's DiT from a config object, like FastVideo's ``initialize_pipeline``.

    ``config`` is a dict or an object (a FastVideoArgs is read through its
    ``pipeline_config``) with ``enable_bsa``, optional ``bsa_params``, optional
    ``bsa_preset`` (bsa_ext's) and the override fields ``bsa_sparsity``,
    ``bsa_cdf_threshold``, ``bsa_chunk_q``, ``bsa_chunk_k``. Precedence: overrides >
    ``bsa_params`` > preset > the default preset. Logs and returns the params in
    effect (None when BSA ends up off).
    """
    logger = logger or log
    if _field(config, "pipeline_config") is not None:
        config = _field(config, "pipeline_config")
    if not _field(config, "enable_bsa", False):
        disable_bsa(pipeline)
        logger.info("bsa_ext: BSA disabled by the pipeline config")
        return None
    preset = _field(config, "bsa_preset")
    params = get_preset(preset or default_preset_name()).params()
    if params is None:
        raise BSAParamError(f"bsa_preset: {preset!r} turns BSA off, but the config sets enable_bsa")
    bsa_params = _field(config, "bsa_params")
    if bsa_params is not None:
        if not isinstance(bsa_params, Mapping):
            raise BSAParamError(f"bsa_params: expected a dict, got {type(bsa_params).__name__}")
        params.update(bsa_params)
    for field, key in OVERRIDE_FIELDS.items():
        value = _field(config, field)
        if value is not None:
            params[key] = list(value) if isinstance(value, (tuple, list)) else value
    effective = enable_bsa(pipeline, **params)
    if effective is not None:
        logger.info("bsa_ext: BSA parameters in effect: %s", effective)
    return effective


__all__ = [
    "LONGCAT_MODULES",
    "flash_attn_bsa_3d",
    "install",
    "uninstall",
    "is_installed",
    "attention_layers",
    "enable_bsa",
    "disable_bsa",
    "apply_preset",
    "bsa_enabled",
    "configure_pipeline",
    "OVERRIDE_FIELDS",
]
