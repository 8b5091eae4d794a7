"""SPEC §5: bad input raises before any kernel runs, naming the argument, expectation and value."""

import pytest
import torch

import bsa_ext
from bsa_ext import BackendUnavailableError

LAT = (4, 8, 8)
S = 4 * 8 * 8
CH = (2, 4, 4)


def qkv(dtype=torch.float32, D=16, Sq=S, Sk=S):
    return torch.randn(1, 2, Sq, D, dtype=dtype), torch.randn(1, 2, Sk, D, dtype=dtype), torch.randn(1, 2, Sk, D, dtype=dtype)


def call(q, k, v, **kw):
    args = dict(latent_shape_q=LAT, latent_shape_k=LAT, sparsity=0.5, chunk_3d_shape_q=CH, chunk_3d_shape_k=CH)
    args.update(kw)
    return bsa_ext.flash_attn_bsa_3d(q, k, v, **args)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(latent_shape_q=(4, 8, 9)), ValueError, r"latent_shape_q: product 4\*8\*9 = 288 must equal .* \(256\)"),
    (dict(latent_shape_k=(2, 8, 8)), ValueError, r"latent_shape_k: product"),
    (dict(latent_shape_q=(4, 8)), ValueError, r"latent_shape_q: expected three positive integers"),
    (dict(chunk_3d_shape_q=(3, 3, 3)), ValueError, r"chunk_3d_shape_q: chunk capacity t\*h\*w = 27 .*16, 32, 64, 128, 256"),
    (dict(chunk_3d_shape_k=(0, 4, 4)), ValueError, r"chunk_3d_shape_k: expected three positive integers"),
    (dict(sparsity=1.0), ValueError, r"sparsity: expected a value in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), ValueError, r"sparsity: expected"),
    (dict(sparsity=None, cdf_threshold=None), ValueError, r"at least one of them"),
    (dict(sparsity=None, cdf_threshold=0.0), ValueError, r"cdf_threshold: expected a value in \(0, 1\], got 0.0"),
    (dict(sparsity=None, cdf_threshold=1.5), ValueError, r"cdf_threshold"),
    (dict(max_blocks=0), ValueError, r"max_blocks: expected a positive integer"),
    (dict(max_blocks=2.0), ValueError, r"max_blocks: expected a positive integer or None, got 2.0"),
    (dict(latent_shape_q=(4.5, 8, 8)), ValueError, r"latent_shape_q: expected three positive integers"),
    (dict(backend="fast"), ValueError, r"backend: expected one of 'auto', 'cuda', 'triton', 'torch'; got 'fast'"),
])
def test_bad_arguments(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(*qkv(), **kw)


def test_shape_dtype_device_stride_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected shape \[B=1, H=2, Sk, D=16\]"):
        call(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"v: expected the shape of k"):
        call(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        call(q[0], k, v)
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float16"):
        call(q, k.half(), v)
    with pytest.raises(TypeError, match=r"q: expected one of the dtypes \[.*float16.*\], got torch.int32"):
        call(q.int(), k.int(), v.int())
    f8 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match=r"q: expected one of the dtypes .* got torch.float8_e4m3fn"):
        call(q.to(f8), k.to(f8), v.to(f8))
    with pytest.raises(ValueError, match=r"q: expected stride\(-1\) == 1"):
        call(torch.randn(1, 2, 16, S).transpose(-1, -2), k, v)
    with pytest.raises(ValueError, match=r"expected device"):
        call(q, k.to("meta"), v.to("meta"))


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    q, k, v = qkv(torch.float16)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot run bsa select: .*"):
        call(q, k, v, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' cannot run bsa select: .*(CUDA|Triton)"):
        call(q, k, v, backend="triton")


def test_env_backend_is_validated_and_used(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("BSA_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"BSA_BACKEND: expected one of"):
        call(q, k, v)
    monkeypatch.setenv("BSA_BACKEND", "torch")
    call(q, k, v)
    assert bsa_ext.last_backend() == "torch" and bsa_ext.last_backend("select") == "torch"


def test_block_list_errors_and_validate():
    q, k, v = qkv()
    g = bsa_ext.ChunkGeometry(LAT, CH)
    nb = g.num_blocks
    idx = torch.zeros(1, 2, nb, 2, dtype=torch.int32)
    cnt = torch.ones(1, 2, nb, dtype=torch.int32)
    attn = lambda i, c, **kw: bsa_ext.block_sparse_attention(q, k, v, i, c, LAT, LAT, CH, CH, **kw)  # noqa: E731
    with pytest.raises(TypeError, match=r"indices: expected dtype torch.int32, got torch.int64"):
        attn(idx.long(), cnt)
    with pytest.raises(ValueError, match=rf"indices: expected shape \[B=1, H=2, Nq={nb}, Kmax\]"):
        attn(idx[:, :, 1:], cnt)
    with pytest.raises(ValueError, match=r"counts: expected shape"):
        attn(idx, cnt[..., 1:])
    bad = idx.clone()
    bad[0, 0, 0, 0] = nb
    attn(bad, cnt)  # skipped without validate
    with pytest.raises(ValueError, match=rf"indices: expected block ids in \[0, {nb}\) within counts, found 1 outside, "
                       rf"the first indices\[0, 0, 0, 0\] = {nb}"):
        attn(bad, cnt, validate=True)
    with pytest.raises(ValueError, match=r"counts: expected values in \[0, Kmax=2\]"):
        attn(idx, cnt * 3, validate=True)
    with pytest.raises(ValueError, match=r"duplicates, the first: block 0 twice in indices\[0, 0, 0, :\]"):
        attn(idx, cnt * 2, validate=True)
    with pytest.raises(ValueError, match=r"sm_scale: expected a positive finite float"):
        attn(idx, cnt, sm_scale=float("nan"))


def test_validate_checks_shapes_before_values():
    q, k, v = qkv()
    g = bsa_ext.ChunkGeometry(LAT, CH)
    idx = torch.zeros(1, 2, g.num_blocks, 2, dtype=torch.int32)
    cnt = torch.ones(1, 2, g.num_blocks, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices: expected shape"):
        bsa_ext.block_sparse_attention(q, k, v, idx[:, :, :2], cnt, LAT, LAT, CH, CH, validate=True)


def test_ops_check_their_own_arguments():
    """The registered ops are public too: the same checks hold when they are called directly."""
    q, k, v = qkv()
    g = bsa_ext.ChunkGeometry(LAT, CH)
    idx = torch.zeros(1, 2, g.num_blocks, 2, dtype=torch.int32)
    cnt = torch.ones(1, 2, g.num_blocks, dtype=torch.int32)
    geo = [list(LAT), list(LAT), list(CH), list(CH)]
    with pytest.raises(ValueError, match=r"sm_scale: expected a positive finite float"):
        torch.ops.bsa.forward(q, k, v, idx, cnt, *geo, float("nan"), "torch")
    out, lse = torch.ops.bsa.forward(q, k, v, idx, cnt, *geo, 0.25, "torch")
    dout = torch.randn_like(out)
    bwd = lambda o, l, d=dout: torch.ops.bsa.backward(d, q, k, v, o, l, idx, cnt, *geo, 0.25, "torch")  # noqa: E731
    with pytest.raises(ValueError, match=r"lse: expected shape \(1, 2, 256\) \(\[B, H, Sq\]\), got \(1, 2, 3\)"):
        bwd(out, lse[:, :, :3])
    with pytest.raises(TypeError, match=r"lse: expected dtype torch.float32, got torch.float64"):
        bwd(out, lse.double())
    with pytest.raises(TypeError, match=r"out: expected dtype torch.float32 \(the dtype of q\), got torch.float16"):
        bwd(out.half(), lse)
    with pytest.raises(ValueError, match=r"dout: expected the shape of q"):
        bwd(out, lse, dout[:, :1])


def test_capability_limits_on_block_counts_are_reasons(monkeypatch):
    """The table's block-count limits become reasons (for errors, auto and `info`) on any device."""
    from bsa_ext import capabilities

    monkeypatch.setattr(capabilities, "backend_unavailable_reason", lambda *a, **k: None)
    cpu = torch.device("cpu")
    args = (cpu, torch.bfloat16, 128, (64, 64))
    cap_q = capabilities.CAPABILITIES[("cuda", "backward")].max_query_blocks
    cap_k = capabilities.CAPABILITIES[("cuda", "select")].max_key_blocks
    reasons = capabilities.not_supported_reasons("cuda", "backward", *args, 10, num_query_blocks=cap_q + 1)
    assert f"{cap_q + 1} query blocks > {cap_q}" in reasons
    assert not [r for r in capabilities.not_supported_reasons("cuda", "backward", *args, 10, num_query_blocks=cap_q)
                if "blocks" in r]
    reasons = capabilities.not_supported_reasons("cuda", "select", *args, cap_k + 1)
    assert f"{cap_k + 1} key blocks > {cap_k}" in reasons


def test_backward_query_block_limit_matches_the_kernel_header():
    """capabilities.py restates api.h's kInvertMaxQueryBlocks (errors, auto and `info` read the
    table without loading the library); the two statements must agree."""
    import math
    import pathlib
    import re

    from bsa_ext import capabilities

    header = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include" / "bsa" / "api.h"
    found = re.search(r"kInvertMaxQueryBlocks\s*=\s*([0-9 *]+);", header.read_text())
    assert found, "kInvertMaxQueryBlocks not found in api.h"
    limit = math.prod(int(x) for x in found.group(1).split("*"))
    assert capabilities.CAPABILITIES[("cuda", "backward")].max_query_blocks == limit


def test_capability_layout_limits_are_reasons(monkeypatch):
    """Rows the CUDA kernels cannot copy in 16-byte pieces, and batch * heads past the grid, are
    reasons like any other: "auto" then picks another backend instead of failing in the binding."""
    from bsa_ext import capabilities

    monkeypatch.setattr(capabilities, "backend_unavailable_reason", lambda *a, **k: None)
    args = (torch.device("cpu"), torch.bfloat16, 128, (64, 64), 10, 10)

    def reasons(backend, op, **kw):  # on CPU tensors: leave out the device reason
        return [r for r in capabilities.not_supported_reasons(backend, op, *args, **kw) if not r.startswith("device")]

    base = torch.zeros(1, 2, 64, 136, dtype=torch.bfloat16)
    aligned, strided = base[..., :128], torch.zeros(1, 2, 64, 132, dtype=torch.bfloat16)[..., :128]
    shifted = base.flatten()[1:1 + 2 * 64 * 128].view(1, 2, 64, 128)
    assert not reasons("cuda", "forward", tensors={"q": aligned})
    assert reasons("cuda", "forward", tensors={"q": aligned, "k": strided}) == [
        "k: stride(2) = 132 elements is not a multiple of 16 bytes"]
    assert reasons("cuda", "backward", tensors={"dout": shifted}) == ["dout: data pointer is not 16-byte aligned"]
    assert not reasons("triton", "forward", tensors={"k": strided, "dout": shifted})
    limit = capabilities.CAPABILITIES[("cuda", "select")].max_batch_heads
    assert reasons("cuda", "select", batch_heads=limit + 1) == [f"batch * heads = {limit + 1} > {limit}"]
    assert not reasons("cuda", "select", batch_heads=limit)


def test_old_gpus_are_refused_before_inputs(monkeypatch):
    """A GPU below a backend's minimum is a device-level reason, so `info` reports it too."""
    from bsa_ext import capabilities

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    for backend in ("cuda", "triton"):
        reason = capabilities.backend_unavailable_reason(backend, "forward", torch.device("cuda"), explicit=False)
        assert reason == "GPU is sm_75, needs sm_80 or newer"
    assert capabilities.backend_unavailable_reason("torch", "forward", torch.device("cuda")) is None
