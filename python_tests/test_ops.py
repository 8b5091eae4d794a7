"""torch.ops.bsa.*: opcheck, torch.compile, autograd end to end, backend bookkeeping."""

import pytest
import torch

import bsa_ext
from bsa_ext import reference

from helpers import assert_close_rule, dense_attention, geom, make_qkv, random_blocks

LAT_Q, LAT_K, CH_Q, CH_K = [4, 8, 8], [3, 8, 10], [2, 4, 4], [2, 4, 2]


def _op_args(device, dtype, backend, requires_grad=False):
    gq, gk = geom(LAT_Q, CH_Q), geom(LAT_K, CH_K)
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 16, dtype, device)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 3, device)
    return q, k, v, indices, counts, gq, gk


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cpu(requires_grad):
    q, k, v, indices, counts, gq, gk = _op_args("cpu", torch.float64, "torch", requires_grad)
    geo = [LAT_Q, LAT_K, CH_Q, CH_K]
    torch.library.opcheck(torch.ops.bsa.select_blocks, (q, k, *geo, 0.5, None, None, "torch"))
    torch.library.opcheck(torch.ops.bsa.select_blocks, (q, k, *geo, 0.5, 0.9, 4, "torch"))
    torch.library.opcheck(torch.ops.bsa.forward, (q, k, v, indices, counts, *geo, 0.25, "torch"))
    out, lse = torch.ops.bsa.forward(q.detach(), k.detach(), v.detach(), indices, counts, *geo, 0.25, "torch")
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.bsa.backward, (dout, q.detach(), k.detach(), v.detach(), out, lse, indices, counts, *geo, 0.25, "torch"))


class TinyAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return bsa_ext.flash_attn_bsa_3d(q, k, v, LAT_Q, LAT_K, 0.5, None, CH_Q, CH_K, backend="torch")


def test_torch_compile_fullgraph_cpu():
    q, k, v, *_ = _op_args("cpu", torch.float32, "torch")
    eager = TinyAttention()(q, k, v)
    compiled = torch.compile(TinyAttention(), fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_autograd_end_to_end_matches_dense_reference(scale):
    q, k, v, *_ = _op_args("cpu", torch.float64, "torch", requires_grad=True)
    with torch.no_grad():
        q.mul_(scale), k.mul_(scale)
    out = bsa_ext.flash_attn_bsa_3d(q, k, v, LAT_Q, LAT_K, 0.5, None, CH_Q, CH_K)
    assert bsa_ext.last_backend("forward") == "torch"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert bsa_ext.last_backend("backward") == "torch"
    gq, gk = geom(LAT_Q, CH_Q), geom(LAT_K, CH_K)
    indices, counts = reference.select_blocks(q.detach(), k.detach(), gq, gk, 0.5, None)
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = dense_attention(qd, kd, vd, mask)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout)):
        torch.testing.assert_close(g, r)


def test_low_precision_torch_backend_follows_tolerance_rule():
    q, k, v, indices, counts, gq, gk = _op_args("cpu", torch.float32, "torch")
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = bsa_ext.block_sparse_attention(q, k, v, indices, counts, LAT_Q, LAT_K, CH_Q, CH_K, backend="torch")
    assert out.dtype == torch.bfloat16
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    assert_close_rule(out, dense_attention(q, k, v, mask), dense_attention(q, k, v, mask, upcast=False))


def test_lse_is_not_differentiable_and_returned():
    q, k, v, indices, counts, *_ = _op_args("cpu", torch.float64, "torch", requires_grad=True)
    out, lse = bsa_ext.block_sparse_attention(q, k, v, indices, counts, LAT_Q, LAT_K, CH_Q, CH_K, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and not lse.requires_grad
    assert out.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_opcheck_cuda(backend):
    from bsa_ext.ops import resolve_backend

    geo = [LAT_Q, LAT_K, [4, 4, 4], [2, 4, 8]]
    gq, gk = geom(LAT_Q, geo[2]), geom(LAT_K, geo[3])
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.float16, "cuda")
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 2, "cuda")
    ran = []
    for op, fn, args in [
        ("select", torch.ops.bsa.select_blocks, (q, k, *geo, 0.5, None, None, backend)),
        ("forward", torch.ops.bsa.forward, (q, k, v, indices, counts, *geo, 0.125, backend)),
    ]:
        try:
            resolve_backend(backend, op, q, gq, gk)
        except bsa_ext.BackendUnavailableError:
            continue
        torch.library.opcheck(fn, args)
        ran.append(op)
    if not ran:
        pytest.skip(f"backend {backend} runs neither op on this machine")


@pytest.mark.parametrize("cc,archs,runs", [
    ((8, 0), ["80", "90a"], True), ((8, 6), ["80"], True), ((9, 0), ["90a"], True),
    ((8, 0), ["90a"], False), ((10, 0), ["80", "90a"], False), ((9, 0), ["80"], False),
])
def test_cuda_backend_needs_machine_code_for_the_gpu(cc, archs, runs, monkeypatch):
    """No PTX is embedded, so "auto" must not pick CUDA kernels the GPU cannot run."""
    from bsa_ext.capabilities import _arch_not_built_reason

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    reason = _arch_not_built_reason(torch.device("cuda"), archs)
    assert (reason is None) == runs
    if not runs:
        assert f"sm_{cc[0]}{cc[1]}" in reason and "BSA_CUDA_ARCHS" in reason


@pytest.mark.parametrize("sparsity,cdf,max_blocks", [(0.75, None, None), (None, 0.9, None), (0.5, 0.95, 4)])
def test_select_pooled_torch_equals_select_blocks(sparsity, cdf, max_blocks):
    from bsa_ext import ops

    gq, gk = geom((5, 6, 9), (4, 4, 4)), geom((4, 8, 12), (4, 4, 8))
    q, k, _ = make_qkv(2, 2, gq.seq_len, gk.seq_len, 32, torch.float64, "cpu", scale=3.0)
    qp, kp = reference.pool_blocks(q, gq), reference.pool_blocks(k, gk)
    got = ops.select_pooled(qp, kp, q, gq, gk, sparsity, cdf, max_blocks, "torch")
    want = reference.select_blocks(q, k, gq, gk, sparsity, cdf, max_blocks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bsa_ext.last_backend("select") == "torch"
    # An explicit backend that cannot run raises and names why; nothing falls back.
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run bsa select"):
        ops.select_pooled(qp, kp, q, gq, gk, sparsity, cdf, max_blocks, "cuda")
    with pytest.raises(ValueError, match="sparsity"):
        ops.select_pooled(qp, kp, q, gq, gk, 1.5, None, None, "torch")
