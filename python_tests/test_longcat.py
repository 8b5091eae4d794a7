"""The LongCat integration against a stand-in of LongCat's attention layer (no network, no weights).

The stand-in (source below) keeps what matters to the integration from upstream's
``longcat_video/modules/attention.py`` and FastVideo's ``fastvideo/models/dits/longcat.py``:
a fused qkv projection, per-head RMS norm, ``[B, H, S, D]`` tensors, ``shape=(T, H, W)``,
``cp_split_hw``, the conditioning path (noise queries attend to every key: Sq != Sk),
the KV-cache path, and the call ``flash_attn_bsa_3d(q, k, v, latent_shape_q,
latent_shape_k, **self.bsa_params)`` through a module-level name. RoPE is left out:
it changes q and k, not how attention is dispatched. Its dense path can apply a token
mask, which the tests build from the reference selection: BSA must equal dense
attention under that mask.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

import bsa_ext
from bsa_ext import reference
from bsa_ext.integrations import longcat as lc
from bsa_ext.layout import ChunkGeometry
from bsa_ext.presets import BSAParamError, get_preset

UPSTREAM_BSA = '''
def flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, sparsity=0.875, cdf_threshold=None,
                      chunk_3d_shape_q=[4, 4, 8], chunk_3d_shape_k=[4, 4, 8]):
    raise RuntimeError("upstream BSA: its Triton kernels need a CUDA GPU")
'''

UPSTREAM_ATTENTION = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..block_sparse_attention.bsa_interface import flash_attn_bsa_3d


class RMSNorm_FP32(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # At least fp32, like upstream, but fp64 stays fp64 for the reference run.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(out.dtype)).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, enable_bsa=False, bsa_params=None, cp_split_hw=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.enable_bsa = enable_bsa
        self.bsa_params = bsa_params
        self.cp_split_hw = cp_split_hw if cp_split_hw is not None else [1, 1]
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm_FP32(self.head_dim)
        self.k_norm = RMSNorm_FP32(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.dense_mask_fn = None  # test hook: (q, k, latent_q, latent_k) -> bool mask [B, H, Sq, Sk]

    def _process_attn(self, q, k, v, shape):
        B, H, SQ, D = q.shape
        SKV = k.shape[2]
        _, Hs, Ws = shape
        assert Hs % self.cp_split_hw[0] == 0 and Ws % self.cp_split_hw[1] == 0
        Hs, Ws = Hs // self.cp_split_hw[0], Ws // self.cp_split_hw[1]
        latent_shape_q = (SQ // (Hs * Ws), Hs, Ws)
        latent_shape_k = (SKV // (Hs * Ws), Hs, Ws)
        if self.enable_bsa and shape[0] > 1:
            assert self.bsa_params is not None
            return flash_attn_bsa_3d(q, k, v, latent_shape_q, latent_shape_k, **self.bsa_params)
        mask = None if self.dense_mask_fn is None else self.dense_mask_fn(q, k, latent_shape_q, latent_shape_k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _qkv(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # strided views of the fused projection
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, shape=None, num_cond_latents=None, return_kv=False):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if return_kv:
            k_cache, v_cache = k.clone(), v.clone()
        if num_cond_latents is not None and num_cond_latents > 0:
            n_cond = num_cond_latents * (N // shape[0])
            x_cond = self._process_attn(q[:, :, :n_cond].contiguous(), k[:, :, :n_cond].contiguous(),
                                        v[:, :, :n_cond].contiguous(), shape)
            x_noise = self._process_attn(q[:, :, n_cond:].contiguous(), k, v, shape)
            out = torch.cat([x_cond, x_noise], dim=2)
        else:
            out = self._process_attn(q, k, v, shape)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, (k_cache, v_cache)) if return_kv else out

    def forward_with_kv_cache(self, x, shape=None, num_cond_latents=None, kv_cache=None):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        k_cache, v_cache = kv_cache
        if k_cache.shape[0] == 1:
            k_cache, v_cache = k_cache.repeat(B, 1, 1, 1), v_cache.repeat(B, 1, 1, 1)
        k_full = torch.cat([k_cache, k], dim=2).contiguous()
        v_full = torch.cat([v_cache, v], dim=2).contiguous()
        out = self._process_attn(q, k_full, v_full, shape)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
'''

UPSTREAM_DIT = '''
import torch.nn as nn

from .attention import Attention


class LongCatSingleStreamBlock(nn.Module):
    def __init__(self, dim, num_heads, enable_bsa=False, bsa_params=None, cp_split_hw=None):
        super().__init__()
        self.attn = Attention(dim, num_heads, enable_bsa=enable_bsa, bsa_params=bsa_params, cp_split_hw=cp_split_hw)
        self.ffn = nn.Linear(dim, dim)

    def forward(self, x, shape, num_cond_latents=None, return_kv=False, kv_cache=None):
        if kv_cache is not None:
            n_cond = kv_cache[0].shape[2] // (x.shape[1] // shape[0])
            return x + self.attn.forward_with_kv_cache(x, shape, n_cond, kv_cache), None
        out = self.attn(x, shape, num_cond_latents, return_kv)
        out, kv = out if return_kv else (out, None)
        x = x + out
        return x + self.ffn(x), kv


class LongCatVideoTransformer3DModel(nn.Module):
    def __init__(self, dim=64, num_heads=2, depth=2, enable_bsa=False, bsa_params=None, cp_split_hw=None):
        super().__init__()
        self.cp_split_hw = cp_split_hw if cp_split_hw is not None else [1, 1]
        self.blocks = nn.ModuleList(
            [LongCatSingleStreamBlock(dim, num_heads, enable_bsa, bsa_params, self.cp_split_hw) for _ in range(depth)]
        )

    def enable_bsa(self):
        for block in self.blocks:
            block.attn.enable_bsa = True

    def disable_bsa(self):
        for block in self.blocks:
            block.attn.enable_bsa = False

    def forward(self, x, shape, num_cond_latents=None, return_kv=False, kv_cache_dict=None):
        caches = {}
        for i, block in enumerate(self.blocks):
            kv_cache = None if kv_cache_dict is None else kv_cache_dict[i]
            x, caches[i] = block(x, shape, num_cond_latents, return_kv, kv_cache)
        return (x, caches) if return_kv else x
'''

FASTVIDEO_DIT = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvideo.third_party.longcat_video.block_sparse_attention.bsa_interface import flash_attn_bsa_3d


class LongCatSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, config):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.enable_bsa = getattr(config, "enable_bsa", False)
        self.bsa_params = getattr(config, "bsa_params", None)
        self.dense_mask_fn = None

    def forward(self, x, latent_shape):
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2).contiguous()
                   for f in (self.to_q, self.to_k, self.to_v))
        if self.enable_bsa and latent_shape[0] > 1:
            out = flash_attn_bsa_3d(q, k, v, latent_shape_q=latent_shape, latent_shape_k=latent_shape, **self.bsa_params)
        else:
            mask = None if self.dense_mask_fn is None else self.dense_mask_fn(q, k, latent_shape, latent_shape)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class LongCatTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, config):
        super().__init__()
        self.self_attn = LongCatSelfAttention(dim, num_heads, config)

    def forward(self, x, latent_shape):
        return x + self.self_attn(x, latent_shape)


class LongCatTransformer3DModel(nn.Module):
    def __init__(self, config, dim=64, num_heads=2, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList([LongCatTransformerBlock(dim, num_heads, config) for _ in range(depth)])

    def forward(self, x, latent_shape):
        for block in self.blocks:
            x = block(x, latent_shape)
        return x
'''

# name -> source (None: an empty package), in import order.
FAKE_MODULES = {
    "longcat_video": None,
    "longcat_video.block_sparse_attention": None,
    "longcat_video.block_sparse_attention.bsa_interface": UPSTREAM_BSA,
    "longcat_video.modules": None,
    "longcat_video.modules.attention": UPSTREAM_ATTENTION,
    "longcat_video.modules.longcat_video_dit": UPSTREAM_DIT,
    "fastvideo": None,
    "fastvideo.third_party": None,
    "fastvideo.third_party.longcat_video": None,
    "fastvideo.third_party.longcat_video.block_sparse_attention": None,
    "fastvideo.third_party.longcat_video.block_sparse_attention.bsa_interface": UPSTREAM_BSA,
    "fastvideo.models": None,
    "fastvideo.models.dits": None,
    "fastvideo.models.dits.longcat": FASTVIDEO_DIT,
}


def _forget_fakes():
    for name in list(sys.modules):
        if name.split(".")[0] in ("longcat_video", "fastvideo"):
            del sys.modules[name]


@pytest.fixture
def fakes():
    """Registers the stand-in packages in sys.modules, as if LongCat and FastVideo were imported."""
    _forget_fakes()
    for name, src in FAKE_MODULES.items():
        mod = types.ModuleType(name)
        parent, _, child = name.rpartition(".")
        if src is None:
            mod.__path__ = []
            mod.__package__ = name
        else:
            mod.__package__ = parent
        sys.modules[name] = mod
        if parent:
            setattr(sys.modules[parent], child, mod)
        if src is not None:
            exec(compile(src, f"<fake {name}>", "exec"), mod.__dict__)
    yield {name: sys.modules[name] for name in FAKE_MODULES}
    lc.uninstall()
    _forget_fakes()


@pytest.fixture
def fakes_on_disk(tmp_path, monkeypatch):
    """The same stand-ins as files on sys.path, not yet imported (for the import hook)."""
    _forget_fakes()
    for name, src in FAKE_MODULES.items():
        parts = name.split(".")
        if src is None:
            path = tmp_path.joinpath(*parts, "__init__.py")
        else:
            path = tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src or "")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    lc.uninstall()
    _forget_fakes()


# ------------------------------------------------------------------ install / uninstall
def test_install_rebinds_loaded_modules_idempotently_and_uninstall_restores(fakes):
    attn, bsa_if, fv = (
        fakes["longcat_video.modules.attention"],
        fakes["longcat_video.block_sparse_attention.bsa_interface"],
        fakes["fastvideo.models.dits.longcat"],
    )
    upstream = attn.flash_attn_bsa_3d
    assert upstream is bsa_if.flash_attn_bsa_3d
    patched = lc.install()
    assert set(patched) >= {
        "longcat_video.modules.attention",
        "longcat_video.block_sparse_attention.bsa_interface",
        "fastvideo.models.dits.longcat",
        "fastvideo.third_party.longcat_video.block_sparse_attention.bsa_interface",
    }
    for mod in (attn, bsa_if, fv):
        assert mod.flash_attn_bsa_3d is lc.flash_attn_bsa_3d
    assert lc.install() == []  # idempotent: nothing left to patch, nothing double-wrapped
    assert attn.flash_attn_bsa_3d is lc.flash_attn_bsa_3d
    restored = lc.uninstall()
    assert "longcat_video.modules.attention" in restored
    assert attn.flash_attn_bsa_3d is upstream and bsa_if.flash_attn_bsa_3d is upstream
    assert fv.flash_attn_bsa_3d is fakes["fastvideo.third_party.longcat_video.block_sparse_attention.bsa_interface"].flash_attn_bsa_3d
    assert not lc.is_installed() and lc.uninstall() == []


def test_install_patches_modules_imported_later_and_uninstall_stops(fakes_on_disk):
    lc.install()
    attn = importlib.import_module("longcat_video.modules.attention")
    fv = importlib.import_module("fastvideo.models.dits.longcat")
    assert attn.flash_attn_bsa_3d is lc.flash_attn_bsa_3d
    assert fv.flash_attn_bsa_3d is lc.flash_attn_bsa_3d
    lc.uninstall()
    assert attn.flash_attn_bsa_3d is sys.modules["longcat_video.block_sparse_attention.bsa_interface"].flash_attn_bsa_3d
    assert attn.flash_attn_bsa_3d is not lc.flash_attn_bsa_3d
    _forget_fakes()
    again = importlib.import_module("longcat_video.modules.attention")
    assert again.flash_attn_bsa_3d is not lc.flash_attn_bsa_3d  # the import hook is gone too


def test_install_covers_extra_module_names(fakes_on_disk):
    vendored = fakes_on_disk / "my_vendored_attention.py"
    vendored.write_text("def flash_attn_bsa_3d(*a, **k):\n    raise RuntimeError('vendored')\n")
    lc.install(modules=["my_vendored_attention"])
    try:
        mod = importlib.import_module("my_vendored_attention")
        assert mod.flash_attn_bsa_3d is lc.flash_attn_bsa_3d
    finally:
        lc.uninstall()
        sys.modules.pop("my_vendored_attention", None)


def test_install_rejects_bad_defaults():
    with pytest.raises(BSAParamError, match="backend"):
        lc.install(backend="tpu")
    with pytest.raises(BSAParamError, match="max_blocks"):
        lc.install(max_blocks=0)
    assert not lc.is_installed()


# ------------------------------------------------------------------ numerics against dense attention
def _reference_mask_fn(params, masks):
    """Dense-path hook: the token mask of the reference selection for these bsa_params.

    With ``masks`` empty it selects on the fp32 values it is given (what the BSA run selects
    on) and records each call's mask; otherwise it replays the recorded masks in call order.
    The fp32 run records and the fp64 run replays, so a near-tie between two key blocks can't
    make the two dense references attend to different blocks.
    """
    full = dict(bsa_ext.presets.default_bsa_params(), **params)
    recording = not masks
    replay = iter(list(masks))

    def fn(q, k, latent_q, latent_k):
        if not recording:
            return next(replay)
        gq = ChunkGeometry(tuple(latent_q), tuple(full["chunk_3d_shape_q"]))
        gk = ChunkGeometry(tuple(latent_k), tuple(full["chunk_3d_shape_k"]))
        idx, cnt = reference.select_blocks(q.float(), k.float(), gq, gk, full["sparsity"], full["cdf_threshold"], full.get("max_blocks"))
        masks.append(reference.dense_block_mask(idx, cnt, gq, gk))
        return masks[-1]

    return fn


def _run(model, dtype, params, call, bsa, masks=None):
    m = copy.deepcopy(model).to(dtype)
    if bsa:
        lc.enable_bsa(m, **params)
    else:
        lc.disable_bsa(m)
        hook = _reference_mask_fn(params, masks)
        for layer in lc.attention_layers(m):
            layer.dense_mask_fn = hook
    with torch.no_grad():
        return call(m, dtype)


def _assert_matches_dense(model, params, call):
    """FlashAttention's rule: BSA (fp32) vs the masked dense module in fp64 (ref) and fp32 (pt)."""
    masks = []  # the fp32 reference selects and records, the fp64 one replays
    pt = _run(model, torch.float32, params, call, bsa=False, masks=masks)
    ref = _run(model, torch.float64, params, call, bsa=False, masks=masks)
    out = _run(model, torch.float32, params, call, bsa=True)
    assert bsa_ext.last_backend() == "torch"
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (pt.double() - ref).abs().max().item() + 1e-5 * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"
    # The mask matters: dense attention without it must differ (else the test proves nothing).
    unmasked = copy.deepcopy(model).to(torch.float64)
    lc.disable_bsa(unmasked)
    with torch.no_grad():
        assert (call(unmasked, torch.float64) - ref).abs().max().item() > 10 * bound


def _scaled_dit(fakes, scale, cp_split_hw=None, **kw):
    dit_mod = fakes["longcat_video.modules.longcat_video_dit"]
    model = dit_mod.LongCatVideoTransformer3DModel(dim=64, num_heads=2, depth=2, cp_split_hw=cp_split_hw, **kw)
    with torch.no_grad():
        for layer in lc.attention_layers(model):
            # Larger q/k norms: realistic, peaky attention logits at x4 and x16.
            layer.q_norm.weight.fill_(scale**0.5)
            layer.k_norm.weight.fill_(scale**0.5)
    return model


PARAMS = {
    "topk": dict(sparsity=0.5, chunk_3d_shape_q=[2, 4, 4], chunk_3d_shape_k=[2, 4, 4]),
    "topk-q!=k": dict(sparsity=0.6, chunk_3d_shape_q=[1, 4, 4], chunk_3d_shape_k=[2, 2, 4]),
    "cdf": dict(sparsity=None, cdf_threshold=0.6, chunk_3d_shape_q=[2, 4, 4], chunk_3d_shape_k=[2, 4, 4]),
    "cdf+topk": dict(sparsity=0.75, cdf_threshold=0.5, chunk_3d_shape_q=[2, 4, 4], chunk_3d_shape_k=[2, 4, 4]),
}


@pytest.fixture(autouse=True)
def _routed():
    """Numerics tests go through install(); the fakes fixtures undo it."""
    yield
    lc.uninstall()


@pytest.mark.parametrize("scale", [1, 4, 16])
@pytest.mark.parametrize("latent", [(4, 8, 8), (5, 6, 10)], ids=["divisible", "odd"])
@pytest.mark.parametrize("mode", list(PARAMS))
def test_self_attention_matches_masked_dense(fakes, latent, mode, scale):
    lc.install()
    model = _scaled_dit(fakes, scale)
    x = torch.randn(1, latent[0] * latent[1] * latent[2], 64) * scale
    _assert_matches_dense(model, PARAMS[mode], lambda m, dt: m(x.to(dt), latent))


@pytest.mark.parametrize("scale", [1, 16])
def test_conditioning_path_noise_queries_attend_to_all_keys(fakes, scale):
    lc.install()
    model = _scaled_dit(fakes, scale)
    latent, n_cond = (6, 8, 8), 2  # cond block: Sq = Sk = 128; noise: Sq = 256, Sk = 384
    x = torch.randn(2, 6 * 64, 64) * scale
    _assert_matches_dense(model, PARAMS["topk"], lambda m, dt: m(x.to(dt), latent, num_cond_latents=n_cond))


@pytest.mark.parametrize("mode", ["topk", "cdf"])
def test_kv_cache_path(fakes, mode):
    lc.install()
    model = _scaled_dit(fakes, 4)
    cond = torch.randn(1, 2 * 64, 64) * 4
    noise = torch.randn(1, 4 * 64, 64) * 4

    def call(m, dt):
        _, caches = m(cond.to(dt), (2, 8, 8), return_kv=True)
        return m(noise.to(dt), (4, 8, 8), num_cond_latents=2, kv_cache_dict=caches)  # Sq = 256, Sk = 384

    _assert_matches_dense(model, PARAMS[mode], call)


def test_context_parallel_split_hw(fakes):
    """cp_split_hw=[1, 2]: after Ulysses' all-to-all the sequence is both ranks' (T, H, W/2)
    slabs one after the other, which the layer passes as latent (2T, H, W/2)."""
    lc.install()
    model = _scaled_dit(fakes, 1, cp_split_hw=[1, 2])
    x = torch.randn(1, 2 * 4 * 8 * 4, 64)
    _assert_matches_dense(model, PARAMS["topk"], lambda m, dt: m(x.to(dt), (4, 8, 8)))


def test_fastvideo_keyword_call(fakes):
    lc.install()
    fv = fakes["fastvideo.models.dits.longcat"]
    model = fv.LongCatTransformer3DModel(SimpleNamespace(enable_bsa=False, bsa_params=None))
    x = torch.randn(1, 5 * 6 * 10, 64)
    _assert_matches_dense(model, PARAMS["topk-q!=k"], lambda m, dt: m(x.to(dt), (5, 6, 10)))


def test_without_install_the_upstream_function_runs(fakes):
    model = _scaled_dit(fakes, 1)
    lc.enable_bsa(model, "720p-balanced")
    with pytest.raises(RuntimeError, match="upstream BSA"):
        model(torch.randn(1, 4 * 8 * 8, 64), (4, 8, 8))
    lc.install()
    assert model(torch.randn(1, 4 * 8 * 8, 64), (4, 8, 8)).shape == (1, 256, 64)


def test_single_frame_stays_dense(fakes):
    """Upstream skips BSA when T == 1 (images); the routed function is never called."""
    lc.install(backend="cuda")  # would raise on CPU if it were called
    model = _scaled_dit(fakes, 1)
    lc.enable_bsa(model, "720p-balanced")
    assert model(torch.randn(1, 64, 64), (1, 8, 8)).shape == (1, 64, 64)


def test_install_defaults_reach_the_call(fakes):
    lc.install(backend="cuda")
    model = _scaled_dit(fakes, 1)
    lc.enable_bsa(model, "720p-balanced")
    with pytest.raises(bsa_ext.BackendUnavailableError, match="cuda"):
        model(torch.randn(1, 4 * 8 * 8, 64), (4, 8, 8))
    lc.enable_bsa(model, backend="torch")  # bsa_params beat install()'s defaults
    assert model(torch.randn(1, 4 * 8 * 8, 64), (4, 8, 8)).shape == (1, 256, 64)


# ------------------------------------------------------------------ enable / disable / presets
def _layer_state(model):
    return [(m.enable_bsa, m.bsa_params) for m in lc.attention_layers(model)]


def test_enable_disable_and_presets(fakes):
    model = _scaled_dit(fakes, 1)
    assert len(lc.attention_layers(model)) == 2
    params = lc.enable_bsa(model, "720p-quality")
    assert params == dict(get_preset("720p-quality").bsa_params)
    assert all(on and p == params for on, p in _layer_state(model))
    assert lc.attention_layers(model)[0].bsa_params is not lc.attention_layers(model)[1].bsa_params
    assert lc.disable_bsa(model) == 2
    assert all(not on and p == params for on, p in _layer_state(model))  # params stay
    # No preset: the layers' current params are the base; keywords override single keys.
    again = lc.enable_bsa(model, sparsity=0.75)
    assert again == dict(params, sparsity=0.75)
    assert lc.apply_preset(model, "480p") is None and not any(on for on, _ in _layer_state(model))
    with pytest.raises(BSAParamError, match="turns BSA off"):
        lc.enable_bsa(model, "480p")
    with pytest.raises(BSAParamError, match="unknown name"):
        lc.enable_bsa(model, "720p-turbo")


def test_enable_uses_config_params_or_the_default_preset(fakes):
    dit = fakes["longcat_video.modules.longcat_video_dit"]
    released = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    model = dit.LongCatVideoTransformer3DModel(bsa_params=released)  # as built from config.json
    assert lc.enable_bsa(model) == dict(released, cdf_threshold=None)
    bare = dit.LongCatVideoTransformer3DModel(bsa_params=None)
    assert lc.enable_bsa(bare) == get_preset("720p-balanced").bsa_params


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity="0.9"), "sparsity"),
        (dict(cdf_threshold=0.0), "cdf_threshold"),
        (dict(chunk_3d_shape_q=[4, 4, 3]), "capacity"),
        (dict(chunk_3d_shape_k=[4, 4]), "chunk_3d_shape_k"),
        (dict(sparsity=None, cdf_threshold=None), "at least one"),
        (dict(block_size=64), "unknown key"),
    ],
)
def test_bad_params_change_nothing(fakes, bad, match):
    model = _scaled_dit(fakes, 1)
    before = _layer_state(model)
    with pytest.raises(BSAParamError, match=match):
        lc.enable_bsa(model, **bad)
    assert _layer_state(model) == before


def test_runtime_extras_warn_without_install(fakes):
    model = _scaled_dit(fakes, 1)
    with pytest.warns(RuntimeWarning, match="install"):
        lc.enable_bsa(model, max_blocks=2)
    lc.install()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lc.enable_bsa(model, max_blocks=2)["max_blocks"] == 2


def test_refinement_only_context_restores_state(fakes):
    model = _scaled_dit(fakes, 1)
    before = _layer_state(model)
    with lc.bsa_enabled(model, "720p-balanced") as params:
        assert params["sparsity"] == 0.9375
        assert all(on for on, _ in _layer_state(model))
    assert _layer_state(model) == before
    with pytest.raises(ZeroDivisionError):
        with lc.bsa_enabled(model, "720p-fast"):
            1 / 0
    assert _layer_state(model) == before


def test_model_without_bsa_attention_warns():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    with pytest.warns(RuntimeWarning, match="no BSA-capable attention"):
        assert lc.enable_bsa(plain, "720p-balanced") is None
    with pytest.warns(RuntimeWarning, match="no BSA-capable attention"):
        assert lc.disable_bsa(plain) == 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lc.enable_bsa(object())


# ------------------------------------------------------------------ pipeline helper
def test_configure_pipeline_precedence_and_log(fakes, caplog):
    model = _scaled_dit(fakes, 1)
    pipe = SimpleNamespace(dit=model)  # upstream's LongCatVideoPipeline keeps the DiT in .dit
    config = SimpleNamespace(
        enable_bsa=True,
        bsa_params={"sparsity": 0.875, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
        bsa_sparsity=0.96875,
        bsa_cdf_threshold=None,
        bsa_chunk_q=(2, 4, 4),
        bsa_chunk_k=None,
    )
    with caplog.at_level(logging.INFO, logger="bsa_ext"):
        params = lc.configure_pipeline(pipe, config)
    assert params == {"sparsity": 0.96875, "cdf_threshold": None, "chunk_3d_shape_q": [2, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    assert all(on and p == params for on, p in _layer_state(model))
    assert "BSA parameters in effect" in caplog.text and "0.96875" in caplog.text
    # FastVideo: FastVideoArgs.pipeline_config, pipeline.get_module("transformer"); no params: defaults.
    fv_pipe = SimpleNamespace(get_module=lambda name, default=None: model if name == "transformer" else default)
    args = SimpleNamespace(pipeline_config=SimpleNamespace(enable_bsa=True, bsa_params=None))
    assert lc.configure_pipeline(fv_pipe, args) == get_preset("720p-balanced").bsa_params
    assert lc.configure_pipeline(model, {"enable_bsa": True, "bsa_preset": "long-video"})["chunk_3d_shape_q"] == [8, 4, 4]
    assert lc.configure_pipeline(model, {"enable_bsa": False}) is None
    assert not any(on for on, _ in _layer_state(model))
    with pytest.raises(BSAParamError, match="sparsity"):
        lc.configure_pipeline(model, {"enable_bsa": True, "bsa_sparsity": 2.0})
