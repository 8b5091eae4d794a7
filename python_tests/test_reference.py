"""The reference is the definition of truth: check it against independent formulations."""

import math

import pytest
import torch
import torch.nn.functional as F

from bsa_ext import reference
from bsa_ext.layout import selection_width, topk_count

from helpers import dense_attention, geom, random_blocks

LATENTS = [((4, 8, 8), (2, 4, 4)), ((5, 6, 9), (4, 4, 4)), ((3, 5, 7), (2, 2, 4)), ((2, 3, 3), (4, 4, 4))]


@pytest.mark.parametrize("latent,chunk", LATENTS)
def test_partition_covers_every_token_once(latent, chunk):
    g = geom(latent, chunk)
    tok = g.token_index()
    valid = tok[tok >= 0]
    assert torch.equal(valid.sort().values, torch.arange(g.seq_len))
    # block_of_token agrees with token_index, and valid_counts counts real tokens.
    blocks = torch.arange(g.num_blocks)[:, None].expand_as(tok)[tok >= 0]
    assert torch.equal(g.block_of_token()[valid], blocks)
    assert int(g.valid_counts().sum()) == g.seq_len


def test_partition_matches_longcat_rearrange_when_divisible():
    T, H, W, t, h, w = 4, 8, 12, 2, 4, 4
    x = torch.arange(T * H * W)
    # LongCat's rearrange_THW_to_3d_block: (nt t nh h nw w) -> (nt nh nw) (t h w)
    blocks = x.view(T // t, t, H // h, h, W // w, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, t * h * w)
    assert torch.equal(geom((T, H, W), (t, h, w)).token_index(), blocks)


def test_pooling_excludes_padding():
    g = geom((5, 6, 9), (4, 4, 4))
    x = torch.randn(1, 2, g.seq_len, 8, dtype=torch.float64)
    pooled = reference.pool_blocks(x, g)
    tok = g.token_index()
    for b in [0, g.num_blocks - 1, 5]:
        rows = tok[b][tok[b] >= 0]
        torch.testing.assert_close(pooled[:, :, b], x[:, :, rows].mean(2))


@pytest.mark.parametrize("latent_q,chunk_q,latent_k,chunk_k", [
    ((4, 8, 8), (2, 4, 4), (4, 8, 8), (2, 4, 4)),
    ((5, 6, 9), (4, 4, 4), (3, 6, 10), (2, 4, 4)),  # Sq != Sk, q and k chunks differ, partial edges
    ((3, 5, 7), (2, 2, 4), (3, 5, 7), (2, 4, 2)),
])
def test_forward_matches_masked_sdpa(latent_q, chunk_q, latent_k, chunk_k):
    gq, gk = geom(latent_q, chunk_q), geom(latent_k, chunk_k)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, gq.seq_len, D, dtype=torch.float64)
    k = torch.randn(B, H, gk.seq_len, D, dtype=torch.float64) * 2
    v = torch.randn(B, H, gk.seq_len, D, dtype=torch.float64)
    kmax = min(3, gk.num_blocks)
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, kmax, "cpu", min_count=1)
    out, lse = reference.attention_forward(q, k, v, indices, counts, gq, gk, 0.3)
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-10, atol=1e-10)


def test_empty_rows_and_garbage_ids():
    gq = gk = geom((4, 8, 8), (2, 4, 4))
    q, k, v = (torch.randn(1, 2, gq.seq_len, 8, dtype=torch.float64) for _ in range(3))
    indices = torch.tensor([-5, 0, gk.num_blocks, 10**6], dtype=torch.int32).expand(1, 2, gq.num_blocks, 4).contiguous()
    counts = torch.full((1, 2, gq.num_blocks), 4, dtype=torch.int32)
    counts[0, 1, 3] = 0
    out, lse = reference.attention_forward(q, k, v, indices, counts, gq, gk)
    # Garbage ids are skipped: the same as listing block 0 alone.
    one = torch.zeros_like(indices[..., :1])
    out1, lse1 = reference.attention_forward(q, k, v, one, (counts > 0).int(), gq, gk)
    torch.testing.assert_close(out, out1)
    rows = gq.token_index()[3]
    assert torch.all(out[0, 1, rows] == 0) and torch.all(lse[0, 1, rows] == -math.inf)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_backward_matches_autograd_of_dense(scale):
    gq, gk = geom((3, 5, 7), (2, 2, 4)), geom((3, 4, 6), (2, 4, 2))
    B, H, D = 1, 2, 8
    q = (torch.randn(B, H, gq.seq_len, D, dtype=torch.float64) * scale).requires_grad_()
    k = (torch.randn(B, H, gk.seq_len, D, dtype=torch.float64) * scale).requires_grad_()
    v = torch.randn(B, H, gk.seq_len, D, dtype=torch.float64).requires_grad_()
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, 3, "cpu")
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    out = dense_attention(q, k, v, mask)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = reference.attention_backward(dout, q.detach(), k.detach(), v.detach(), indices, counts, gq, gk)
    for name, g, e in zip("qkv", got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_gradcheck_through_the_op():
    import bsa_ext

    gq = gk = geom((2, 4, 4), (1, 4, 4))
    q, k, v = (torch.randn(1, 1, gq.seq_len, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    indices, counts = random_blocks(1, 1, gq.num_blocks, gk.num_blocks, 2, "cpu", min_count=1)

    def g(q, k, v):
        return bsa_ext.block_sparse_attention(q, k, v, indices, counts, (2, 4, 4), (2, 4, 4), (1, 4, 4), (1, 4, 4), backend="torch")

    assert torch.autograd.gradcheck(g, (q, k, v))


# ------------------------------------------------------------------ selection
def _brute_force_select(scores, head_dim, sparsity, cdf, max_blocks):
    """Per row with Python lists: the SPEC §2 definitions, written out plainly."""
    nq, nk = scores.shape
    rows = []
    for i in range(nq):
        s = scores[i].tolist()
        order = sorted(range(nk), key=lambda j: (-s[j], j))
        count = 0
        if sparsity is not None:
            count = min(nk, max(1, int((1 - sparsity) * nk)))
        if cdf is not None:
            p = torch.softmax(scores[i] * head_dim**-0.5, 0).tolist()
            total, n = 0.0, 0
            for j in sorted(range(nk), key=lambda j: -p[j]):
                total += p[j]
                n += 1
                if total >= cdf:
                    break
            count = max(count, n)
        if max_blocks is not None:
            count = min(count, max_blocks)
        rows.append((order, count))
    return rows


@pytest.mark.parametrize("sparsity,cdf,max_blocks", [
    (0.5, None, None), (0.9375, None, None), (0.999, None, None), (0.0, None, None),
    (None, 0.5, None), (None, 0.98, None), (None, 1.0, None), (None, 1e-6, None),
    (0.875, 0.9, None), (0.5, 0.98, 3), (None, 0.99, 2),
])
def test_selection_semantics(sparsity, cdf, max_blocks):
    gq, gk = geom((4, 8, 8), (2, 4, 4)), geom((5, 6, 9), (2, 4, 4))
    q = torch.randn(1, 2, gq.seq_len, 16)
    k = torch.randn(1, 2, gk.seq_len, 16) * 3
    indices, counts = reference.select_blocks(q, k, gq, gk, sparsity, cdf, max_blocks)
    nk = gk.num_blocks
    assert indices.shape == (1, 2, gq.num_blocks, selection_width(nk, sparsity, cdf, max_blocks))
    assert indices.dtype == counts.dtype == torch.int32
    scores = reference.block_scores(q, k, gq, gk)
    for h in range(2):
        for i, (order, count) in enumerate(_brute_force_select(scores[0, h], 16, sparsity, cdf, max_blocks)):
            assert int(counts[0, h, i]) == count >= 1
            assert indices[0, h, i, :count].tolist() == order[:count]


def test_topk_clamps_to_one_block_and_ties_go_to_smaller_ids():
    assert topk_count(10, 0.99) == 1 and topk_count(16, 0.9375) == 1 and topk_count(7, 0.0) == 7
    gq = gk = geom((2, 4, 8), (2, 4, 4))  # 2 blocks each
    q = torch.ones(1, 1, gq.seq_len, 4)
    k = torch.ones(1, 1, gk.seq_len, 4)  # every key block scores the same
    indices, counts = reference.select_blocks(q, k, gq, gk, 0.5, None)
    assert indices[..., 0].tolist() == [[[0, 0]]] and counts.tolist() == [[[1, 1]]]


def test_cdf_reaches_threshold_and_keeps_at_least_one():
    gq, gk = geom((4, 8, 8), (2, 4, 4)), geom((4, 8, 8), (2, 4, 4))
    q, k = torch.randn(1, 1, gq.seq_len, 32) * 4, torch.randn(1, 1, gk.seq_len, 32) * 4
    scores = reference.block_scores(q, k, gq, gk)[0, 0]
    p = torch.softmax(scores * 32**-0.5, -1)
    for thr in [1e-9, 0.3, 0.9, 0.999]:
        indices, counts = reference.select_blocks(q, k, gq, gk, None, thr)
        for i in range(gq.num_blocks):
            n = int(counts[0, 0, i])
            kept = p[i, indices[0, 0, i, :n].long()]
            assert n >= 1 and kept.sum() >= thr - 1e-12
            if n > 1:  # one block fewer would not reach the threshold
                assert kept[:-1].sum() < thr
