"""GPU fast paths (utils/kernels): the Triton attention kernel equals the PyTorch executor on the same selection,
the fused selection keeps the same keys as utils.methods.dhsa.select.dhsa_select, the block-aligned path and FlexAttention agree.

Where the checks run:
  * on CUDA (test_cuda_*): bf16/fp16, head dims 64/128/256, several GQA ratios;
  * on the CPU under Triton's interpreter (TRITON_INTERPRET=1), small shapes, in a subprocess started by
    test_kernels_under_triton_interpreter (the interpreter must be switched on before Triton is imported);
  * the dispatch (CPU tensors never reach the kernels; kernels.disabled()) everywhere.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import triton
except ImportError:  # the compile check is skipped (needs_triton)
    triton = None

from utils import kernels
from utils.attention import sparse_attention
from utils.methods.dhsa.boundaries import as_boundary_list, fixed_size_ends
from utils.config import DHSAOptions
import utils.methods.dhsa.select as dhsa_select_module
from utils.methods.dhsa.select import dhsa_attention, dhsa_select
from utils.selection import Selection, block_selection_to_tokens, blocks_from_token_selection, full_selection

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 subprocess")
cuda_only = pytest.mark.skipif(not CUDA or INTERPRETER, reason="needs a CUDA GPU")


def fix_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter keeps bf16 as raw uint16 and multiplies those integers in tl.dot; widen bf16
    operands to fp32 first (exact: a bf16 value is the top half of an fp32)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "widens_bf16", False):
        return

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if INTERPRETER:
    from utils.kernels._interpreter import fix_interpreter
    fix_interpreter()
    fix_interpreter_bf16_dot()


def rand(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def per_chunk_counts(key_index, ends):
    """Kept keys per chunk: key_index [..., K] (-1 = unused), ends [Nc] -> [..., Nc]."""
    chunk = torch.searchsorted(ends, key_index.clamp(min=0), right=True)
    chunk = torch.where(key_index >= 0, chunk, ends.numel())
    counts = torch.zeros(key_index.shape[:-1] + (ends.numel() + 1,), dtype=torch.long, device=key_index.device)
    counts.scatter_add_(-1, chunk, torch.ones_like(chunk))
    return counts[..., :-1]


# ---------------------------------------------------------------------------------------------- checks

def check_kernel_matches_executor(device, dtype, B, Hq, Hkv, L, D, T, budget, softcap=None, per_query_head=False,
                                  tol=None, config=None):
    """Kernel output (into a NaN-poisoned buffer) vs the PyTorch executor in fp32 on the same selection."""
    from utils.kernels.sparse_prefill import sparse_prefill

    q, k, v = (rand(B, h, L, D, device=device, dtype=dtype, seed=i) for i, h in enumerate((Hq, Hkv, Hkv)))
    ends = as_boundary_list(fixed_size_ends(L, 7), B, L, device=device)
    with kernels.disabled():
        sel = dhsa_select(q.float(), k.float(), budget=budget, boundaries=ends,  # one list per KV head (GQA group)
                          options=DHSAOptions(query_chunk=T, sink_tokens=4, local_tokens=8, head_pooling="mean",
                                              dense_tail=0, token_rescore=0))  # the kernel is called on the lists alone
        if per_query_head:  # one list per query head (e.g. baselines that select per head)
            sel = Selection(sel.key_index.repeat_interleave(Hq // Hkv, 1), T, sel.q_offset)
        ref = sparse_attention(q.float(), k.float(), v.float(), sel, softcap=softcap)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, sel.key_index, kernels.selection_counts(sel.key_index), query_chunk=T,
                   q_offset=sel.q_offset, softcap=softcap, out=out, config=config)
    assert torch.isfinite(out).all(), "kernel left outputs unwritten"
    err = rel(out, ref)
    assert err < (tol or (1e-5 if dtype == torch.float32 else 1e-2)), err


def check_fused_selection(device, B, Hq, Hkv, L, T, budget, bounds, sink, local, share_heads=False):
    from utils.methods.dhsa.fused import dhsa_select_fused

    q, k = rand(B, Hq, L, 16, device=device, seed=1), rand(B, Hkv, L, 16, device=device, seed=2)
    ends = as_boundary_list(bounds or fixed_size_ends(L, 7, device=device), B, L, device=device)
    options = DHSAOptions(query_chunk=T, sink_tokens=sink, local_tokens=local, share_heads=share_heads,
                          head_pooling="mean", token_rescore=0)  # the fused kernel scores summed GQA queries
    with kernels.disabled():
        ref = dhsa_select(q, k, budget=budget, boundaries=ends, options=options)
    got = dhsa_select_fused(q, k, budget=budget, boundaries=ends, options=options)
    assert got.key_index.shape == ref.key_index.shape
    assert torch.equal(got.counts.long(), (ref.key_index >= 0).sum(-1))
    idx = got.key_index
    assert ((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all(), "lists must be ascending, -1 last"
    # Same keys up to which keys of the one partly kept chunk are taken: same count in every chunk.
    for b in range(B):
        assert torch.equal(per_chunk_counts(idx[b], ends[b]), per_chunk_counts(ref.key_index[b], ends[b]))


def random_candidates(H, n_tiles, W, L, T, q_offset, sink, local, budget, device, seed=0):
    """[H, n_tiles, W] ascending candidate lists as pick_keys writes them: each tile's sinks and local window (of
    `budget`), then visible keys between them at random, -1 after."""
    from utils.methods.dhsa.scores import forced_key_counts

    g = torch.Generator().manual_seed(seed)
    tile_end = q_offset + torch.clamp(torch.arange(1, n_tiles + 1) * T, max=L - q_offset)
    s, l = forced_key_counts(torch.clamp(tile_end, max=budget), sink, local)
    cand = torch.full((H, n_tiles, W), -1, dtype=torch.long)
    for t in range(n_tiles):
        end, st, lt = int(tile_end[t]), int(s[t]), int(l[t])
        middle = torch.arange(st, end - lt)
        for h in range(H):
            pick = middle[torch.randperm(middle.numel(), generator=g)[:max(0, W - st - lt)]]
            keys = torch.cat([torch.arange(st), pick, torch.arange(end - lt, end)]).sort().values
            cand[h, t, :keys.numel()] = keys
    return cand.to(device), s.to(device), l.to(device), tile_end.to(device)


def check_fused_rescoring(device, dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local, config=None):
    """rescore_candidates vs the PyTorch path's _rescore_tokens on the same candidates: the same kept keys (fp32:
    all; 16-bit logits: 97% of them), ascending, within the budget, forced keys kept, causal."""
    from utils.methods.dhsa.fused_rescore import rescore_candidates
    from utils.methods.dhsa.select import _rescore_tokens

    q, k = rand(Hq, Lq, D, device=device, dtype=dtype, seed=11), rand(H, Lk, D, device=device, dtype=dtype, seed=12)
    q_offset, n_tiles = Lk - Lq, math.ceil(Lq / T)
    cand, s, l, tile_end = random_candidates(H, n_tiles, W, Lk, T, q_offset, sink, local, budget, device)
    got, counts = rescore_candidates(q, k, cand, budget=budget, query_chunk=T, q_offset=q_offset, sink_tokens=sink,
                                     local_tokens=local, rescore_queries=R, config=config)
    end = tile_end[None, :, None]
    forced = (cand >= 0) & ((cand < s[None, :, None]) | (cand >= end - l[None, :, None]))
    top = torch.where(forced, float("inf"), 0.0).masked_fill_(cand < 0, float("-inf"))
    best, idx = _rescore_tokens(q.float(), k.float(), top, cand, 0, T, q_offset, min(budget, W), R)
    ref = torch.where(best == float("-inf"), Lk, idx).sort(-1).values
    ref = torch.where(ref == Lk, -1, ref)
    assert got.shape == ref.shape
    assert torch.equal(counts.long(), (ref >= 0).sum(-1)), "kept counts differ"
    assert ((got[..., 1:] > got[..., :-1]) | (got[..., 1:] < 0)).all(), "lists must be ascending, -1 last"
    assert ((got < end) | (got < 0)).all(), "a key after the tile's last query"
    kept = lambda x: torch.zeros(x.shape[:-1] + (Lk + 1,), dtype=torch.bool, device=device).scatter_(  # noqa: E731
        -1, x % (Lk + 1), True)[..., :Lk]
    assert (kept(got) >= kept(cand.masked_fill(~forced, -1))).all(), "a sink or local key was dropped"
    agree = (kept(got) & kept(ref)).sum() / kept(ref).sum()
    assert agree >= (1.0 if dtype == torch.float32 else 0.97), agree


def check_fused_selection_with_rescoring(device, dtype, B, Hq, Hkv, L, D, T, budget, rescore, R, share=False,
                                         window=0):
    """dhsa_select_fused with token rescoring vs the PyTorch path (kernels off), head_pooling "mean": the same
    kept keys up to rounding of the scores (fp32: 99%), the same counts, ascending lists. Chunks of 8 keys, sinks
    and window of 8, W - 16 a multiple of 8: the candidates are whole chunks, so no tie-break inside a partly
    kept chunk (where the two paths may take different keys) reaches the rescoring."""
    from utils.methods.dhsa.fused import dhsa_select_fused

    q, k = rand(B, Hq, L, D, device=device, dtype=dtype, seed=13), rand(B, Hkv, L, D, device=device, dtype=dtype,
                                                                        seed=14)
    ends = as_boundary_list(fixed_size_ends(L, 8, device=device), B, L, device=device)
    options = DHSAOptions(query_chunk=T, sink_tokens=8, local_tokens=8, head_pooling="mean", token_rescore=rescore,
                          rescore_queries=R, share_heads=share, dense_tail=0, rescore_window=window)
    with kernels.disabled():
        ref = dhsa_select(q.float(), k.float(), budget=budget, boundaries=ends, options=options)
    got = dhsa_select_fused(q, k, budget=budget, boundaries=ends, options=options)
    assert got.key_index.shape == ref.key_index.shape
    idx = got.key_index
    assert torch.equal(got.counts.long(), (idx >= 0).sum(-1))
    assert torch.equal(got.counts.long(), (ref.key_index >= 0).sum(-1))
    assert ((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all(), "lists must be ascending, -1 last"
    kept = torch.zeros(idx.shape[:-1] + (L + 1,), dtype=torch.bool, device=device).scatter_(-1, idx % (L + 1), True)
    ref_kept = torch.zeros_like(kept).scatter_(-1, ref.key_index % (L + 1), True)
    agree = (kept & ref_kept)[..., :L].sum() / ref_kept[..., :L].sum()
    assert agree >= (0.99 if dtype == torch.float32 else 0.95), agree


def check_max_pooled_scores(device, dtype, Hq, H, L, D, T, Nc, config=None):
    """The kernel's max-pooled S_c vs utils.methods.dhsa.scores.max_pooled_chunk_scores (fp32, same queries); and per (head,
    tile) the same top-K chunks wherever the reference's K-th and (K+1)-th scores are clearly apart."""
    from utils.methods.dhsa.scores import max_pooled_chunk_scores, tile_key_means
    from utils.methods.dhsa.fused import max_pooled_chunk_scores_gpu

    q = rand(Hq, L, D, device=device, dtype=dtype, seed=3)
    chunk_k = rand(H, Nc, D, device=device, seed=4)
    got = max_pooled_chunk_scores_gpu(q, chunk_k, T, config=config)
    ref = max_pooled_chunk_scores(q.float(), chunk_k, T)
    assert got.shape == ref.shape == (H, math.ceil(L / T), Nc)
    assert torch.isfinite(got).all(), "kernel left scores unwritten or kept a padded row"
    assert rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2), rel(got, ref)
    K = max(1, Nc // 4)
    top = ref.topk(K + 1, dim=-1)
    apart = top.values[..., K - 1] - top.values[..., K] > 0.02 * ref.std()  # well separated: 2% of the spread
    assert apart.float().mean() > 0.3, "too few well-separated rankings for the check to mean anything"
    same = torch.zeros_like(ref, dtype=torch.bool).scatter_(-1, top.indices[..., :K], True) == \
        torch.zeros_like(got, dtype=torch.bool).scatter_(-1, got.topk(K, dim=-1).indices, True)
    assert same.all(-1)[apart].all(), "top-K chunk sets differ where the scores are well separated"
    # causal: given the chunk ends, chunks that start after a tile's last key may be skipped (-inf); the rest match
    ends = torch.sort(torch.randperm(L - 1, generator=torch.Generator().manual_seed(5))[:Nc - 1] + 1).values
    ends = torch.cat([ends, torch.tensor([L])]).to(device)
    causal = max_pooled_chunk_scores_gpu(q, chunk_k, T, ends=ends, q_offset=0, config=config)
    tile_end = torch.clamp(torch.arange(1, math.ceil(L / T) + 1, device=device) * T, max=L)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    visible = (starts[None, :] < tile_end[:, None]).expand_as(ref)
    # centring (center_keys): per-query shift by the tile's mean key, as the reference
    centring = tile_key_means(chunk_k, ends, tile_end, robust=True)
    got_c = max_pooled_chunk_scores_gpu(q, chunk_k, T, centring=centring, config=config)
    ref_c = max_pooled_chunk_scores(q.float(), chunk_k, T, centring=centring)
    assert rel(got_c, ref_c) < (1e-5 if dtype == torch.float32 else 1e-2), rel(got_c, ref_c)
    scored = ~torch.isneginf(causal)  # visible chunks, and maybe some of a program's later tiles' chunks
    assert scored[visible].all(), "a visible chunk was not scored"
    assert rel(causal[scored], ref[scored]) < (1e-5 if dtype == torch.float32 else 1e-2)


def check_sliding_window(device, dtype, B, Hq, Hkv, Lq, Lk, D, window, softcap=None, query_chunk=None):
    """sliding_window_attention (the kernel on CUDA, the reference executor on the CPU) vs dense attention with
    the window rule, computed in fp32."""
    from utils.attention import dense_attention, sliding_window_attention

    q = rand(B, Hq, Lq, D, device=device, dtype=dtype, seed=7)
    k, v = rand(B, Hkv, Lk, D, device=device, dtype=dtype, seed=8), rand(B, Hkv, Lk, D, device=device, dtype=dtype,
                                                                         seed=9)
    out = sliding_window_attention(q, k, v, window, softcap=softcap, query_chunk=query_chunk)
    with kernels.disabled():
        ref = dense_attention(q.float(), k.float(), v.float(), window=window, softcap=softcap)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2), rel(out, ref)


@pytest.mark.parametrize("Lq, Lk, window, T", [(100, 100, 7, 16), (50, 120, 33, 8), (64, 64, 64, None),
                                               (90, 90, 1, 32)])
def test_sliding_window_reference_path_equals_dense(Lq, Lk, window, T):
    check_sliding_window("cpu", torch.float32, 2, 4, 2, Lq, Lk, 16, window, softcap=None, query_chunk=T)
    check_sliding_window("cpu", torch.float32, 1, 2, 2, Lq, Lk, 16, window, softcap=3.0, query_chunk=T)


def block_reference(q, k, ends, budget, bs, sink_blocks, local_blocks):
    """Block-aligned DHSA by plain PyTorch: snapped chunks, scores upsampled to blocks, forced blocks, top-K."""
    from utils.methods.dhsa.scores import chunk_vectors, forced_key_counts, query_tile_vectors
    from utils.methods.dhsa.fused import snap_to_blocks

    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    nb, K = math.ceil(L / bs), max(1, min(budget // bs, math.ceil(L / bs)))
    out = []
    for b in range(B):
        bends = snap_to_blocks(ends[b], L, bs)
        s_c = torch.einsum("htd,hcd->htc", query_tile_vectors(q[b:b + 1], Hkv, bs)[0],
                           chunk_vectors(k[b], torch.clamp(bends * bs, max=L)))
        blk = torch.arange(nb)
        scores = s_c[:, :, torch.searchsorted(bends, blk, right=True)]  # [H, n_tiles, nb]
        end = torch.arange(1, nb + 1)  # visible blocks per query block
        tb = torch.clamp(end, max=K)
        sink, local = forced_key_counts(tb, sink_blocks, local_blocks)
        visible = blk[None] < end[:, None]
        forced = visible & ((blk[None] < sink[:, None]) | (blk[None] >= (end - local)[:, None]))
        scores = scores.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
        top, idx = torch.topk(scores, K, dim=-1)
        out.append(torch.where(top == float("-inf"), -1, idx))
    return torch.stack(out)


def check_block_path(device, dtype, B, Hq, Hkv, L, D, bs, budget):
    from utils.methods.dhsa.fused import dhsa_block_select

    q, k, v = (rand(B, h, L, D, device=device, dtype=dtype, seed=i + 5) for i, h in enumerate((Hq, Hkv, Hkv)))
    ends = as_boundary_list(fixed_size_ends(L, 11, device=device), B, L, device=device)
    sel = dhsa_block_select(q, k, budget=budget, boundaries=ends, block_size=bs,
                            options=DHSAOptions(sink_tokens=bs, local_tokens=bs))
    ref_blocks = block_reference(q.float().cpu(), k.float().cpu(), [e.cpu() for e in ends], budget, bs, 1, 1)
    got = torch.where(torch.arange(sel.key_index.shape[-1], device=device) < sel.counts[..., None], sel.key_index, -1)
    assert torch.equal(got.cpu().sort(-1).values, ref_blocks.sort(-1).values)
    with kernels.disabled():
        ref = sparse_attention(q.float(), k.float(), v.float(), block_selection_to_tokens(sel, L))
    out = sparse_attention(q, k, v, sel) if device == "cuda" else _block_kernel(q, k, v, sel)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol
    return q, k, v, sel, ref


def _block_kernel(q, k, v, sel):
    from utils.kernels.sparse_prefill import sparse_prefill
    return sparse_prefill(q, k, v, sel.key_index, sel.counts, query_chunk=sel.query_chunk, q_offset=sel.q_offset,
                          block_size=sel.block_size, config=dict(rows=16, block_n=16))


def check_block_sparse_baseline(device, dtype, L):
    from utils.methods.baselines.block_sparse import block_sparse_select

    q, k, v = rand(1, 4, L, 16, device=device, dtype=dtype), rand(1, 2, L, 16, device=device, dtype=dtype, seed=1), \
        rand(1, 2, L, 16, device=device, dtype=dtype, seed=2)
    sel = block_sparse_select(q, k, budget=64, block_size=16)
    bsel = blocks_from_token_selection(sel, 16, L)
    assert bsel is not None and bsel.block_size == 16
    with kernels.disabled():
        ref = sparse_attention(q.float(), k.float(), v.float(), sel)
    out = sparse_attention(q, k, v, bsel) if device == "cuda" else _block_kernel(q, k, v, bsel)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    scattered = Selection(sel.key_index.flip(-1), sel.query_chunk, sel.q_offset)  # not whole aligned runs
    assert blocks_from_token_selection(scattered, 16, L) is None


def check_peer_baselines(device, dtype, B, Hq, Hkv, Lq, Lk, D, bs, budget):
    """flexprefill and xattention (utils/baselines): their token lists through the token kernel and their block
    form through the block kernel equal the PyTorch executor on the token lists (per query head, Hs = Hq)."""
    from utils.methods.baselines.flexprefill import flexprefill_select
    from utils.methods.baselines.xattention import xattention_select
    from utils.kernels.sparse_prefill import sparse_prefill

    q = rand(B, Hq, Lq, D, device=device, dtype=dtype, seed=7)
    k, v = (rand(B, Hkv, Lk, D, device=device, dtype=dtype, seed=s) for s in (8, 9))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for select in (flexprefill_select, xattention_select):
        tokens = select(q, k, budget, bs)
        blocks = select(q, k, budget, bs, block_mode=True)
        assert blocks.block_size == bs and tokens.key_index.shape[1] == Hq and tokens.key_index.shape[-1] <= budget
        assert torch.equal(block_selection_to_tokens(blocks, Lk).mask(Lq, Lk), tokens.mask(Lq, Lk))
        with kernels.disabled():
            ref = sparse_attention(q.float(), k.float(), v.float(), tokens)
        if device == "cuda":  # the dispatch: token kernel (sorted lists with counts) and block kernel
            outs = [sparse_attention(q, k, v, tokens), sparse_attention(q, k, v, blocks)]
        else:
            small = dict(rows=16, block_n=16)
            outs = [sparse_prefill(q, k, v, tokens.key_index, tokens.counts, query_chunk=tokens.query_chunk,
                                   q_offset=tokens.q_offset, sorted_keys=True, config=small),
                    sparse_prefill(q, k, v, blocks.key_index, blocks.counts, query_chunk=blocks.query_chunk,
                                   q_offset=blocks.q_offset, block_size=bs, sorted_keys=True, config=small)]
        for out in outs:
            assert rel(out, ref) < tol, (select.__name__, rel(out, ref))


# ---------------------------------------------------------------------------------------------- everywhere

def test_cpu_tensors_never_reach_the_kernels(monkeypatch):
    """On the CPU the dispatch is skipped: results equal the reference with kernels on or off."""
    q, k, v = rand(1, 4, 70, 16), rand(1, 2, 70, 16, seed=1), rand(1, 2, 70, 16, seed=2)
    monkeypatch.setattr(kernels, "try_sparse_attention", lambda *a, **kw: pytest.fail("kernel called on CPU"))
    monkeypatch.setattr(dhsa_select_module, "try_fused_select", lambda *a, **kw: pytest.fail("fused selection called on CPU"))
    out = dhsa_attention(q, k, v, budget=20, query_chunk=16)
    with kernels.disabled():
        assert not kernels.enabled()
        torch.testing.assert_close(dhsa_attention(q, k, v, budget=20, query_chunk=16), out)
    assert kernels.enabled() == (os.environ.get("DHSA_KERNELS", "1") != "0")


def test_executor_reads_block_selections_on_the_cpu():
    """A block-mode KernelSelection (block numbers, for the block kernel) given to sparse_attention on the CPU runs
    as its token lists: the same output as the token selection it was made from."""
    from utils.methods.baselines.block_sparse import block_sparse_select

    q, k, v = rand(1, 4, 96, 16), rand(1, 2, 96, 16, seed=1), rand(1, 2, 96, 16, seed=2)
    tokens = block_sparse_select(q, k, budget=48, block_size=16)
    blocks = blocks_from_token_selection(tokens, 16, 96)
    assert blocks is not None and blocks.block_size == 16
    torch.testing.assert_close(sparse_attention(q, k, v, blocks), sparse_attention(q, k, v, tokens))
    assert torch.equal(block_selection_to_tokens(blocks, 96).mask(96, 96), tokens.mask(96, 96))


def test_selection_counts_is_one_past_the_last_used_slot():
    idx = torch.tensor([[[[0, 3, 5, -1, -1], [1, -1, 4, -1, -1], [-1, -1, -1, -1, -1]]]])
    assert kernels.selection_counts(idx).tolist() == [[[3, 3, 0]]]


@needs_triton
def test_kernels_under_triton_interpreter():
    """Runs the test_interp_* checks below on the CPU through Triton's interpreter, in a fresh process."""
    if INTERPRETER:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-p", "no:warnings",
                             str(Path(__file__)), "-k", "test_interp_"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary


# ---------------------------------------------------------------------------------------------- interpreter

@interpreter_only
@pytest.mark.parametrize("B, Hq, Hkv, L, D, T, budget, dtype, softcap, per_head", [
    (1, 4, 2, 100, 16, 16, 24, torch.float32, None, False),    # GQA 2:1, L not a multiple of the tile
    (2, 6, 2, 77, 32, 32, 30, torch.float16, None, False),     # GQA 3:1 (group padded to 4), batch, fp16
    (1, 4, 4, 130, 64, 64, 40, torch.float32, 5.0, False),     # MHA, soft-capping
    (1, 4, 2, 90, 16, 16, 20, torch.float32, None, True),      # one list per query head
])
def test_interp_kernel_matches_executor(B, Hq, Hkv, L, D, T, budget, dtype, softcap, per_head):
    check_kernel_matches_executor("cpu", dtype, B, Hq, Hkv, L, D, T, budget, softcap=softcap,
                                  per_query_head=per_head, config=dict(rows=16, block_n=16))


@interpreter_only
def test_interp_kernel_at_full_budget_equals_dense():
    from utils.kernels.sparse_prefill import sparse_prefill
    q, k, v = rand(1, 4, 50, 16), rand(1, 2, 50, 16, seed=1), rand(1, 2, 50, 16, seed=2)
    sel = full_selection(1, 2, 50, 50, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    out = sparse_prefill(q, k, v, sel.key_index, None, query_chunk=16, config=dict(rows=16, block_n=16))
    assert rel(out, ref) < 1e-5


@interpreter_only
@pytest.mark.parametrize("B, Hq, Hkv, L, T, budget, bounds, sink, local, share", [
    (1, 4, 2, 200, 16, 40, None, 8, 8, False),
    (2, 4, 2, 150, 32, 30, [1, 2, 3, 10, 11, 40, 90, 149, 150], 4, 4, False),  # length-1 and long chunks
    (1, 2, 1, 300, 8, 64, None, 0, 0, False),                                 # no forced keys
    (1, 4, 2, 120, 16, 50, None, 16, 16, True),                               # one selection for all heads
    (1, 2, 2, 64, 16, 100, None, 8, 8, False),                                # budget above the length
])
def test_interp_fused_selection_keeps_the_same_keys(B, Hq, Hkv, L, T, budget, bounds, sink, local, share):
    check_fused_selection("cpu", B, Hq, Hkv, L, T, budget, bounds, sink, local, share)


@interpreter_only
@pytest.mark.parametrize("dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local", [
    (torch.float32, 4, 2, 100, 100, 16, 16, 30, 60, 4, 4, 8),     # GQA 2:1, 4 sampled queries, last tile short
    (torch.float32, 4, 2, 70, 70, 16, 16, 30, 60, 0, 4, 8),       # every query rescores
    (torch.float32, 4, 1, 64, 90, 32, 16, 24, 40, 2, 0, 0),       # one selection for all heads, after a prefix
    (torch.bfloat16, 2, 2, 80, 80, 16, 8, 20, 50, 4, 2, 4),       # MHA, bf16 logits
])
def test_interp_fused_rescoring_keeps_the_same_keys(dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local):
    check_fused_rescoring("cpu", dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local,
                          config=dict(rows=16, block_w=16))  # 32 rows (every query, G = 2): two slices


@interpreter_only
@pytest.mark.parametrize("B, Hq, Hkv, L, T, budget, rescore, R, share, window", [
    (1, 4, 2, 150, 16, 40, 2.0, 4, False, 0),
    (2, 2, 2, 120, 32, 32, 1.5, 0, False, 0),
    (1, 4, 2, 100, 16, 40, 2.0, 4, True, 0),
    (1, 4, 2, 150, 16, 40, 2.0, 4, False, 16),    # rescore_window: keep 24 by chunk score, rescore 16 of 32 more
    (2, 2, 2, 200, 16, 48, 3.0, 0, False, 8),     # window 8, x3: 24 band candidates
])
def test_interp_fused_selection_rescores_tokens(B, Hq, Hkv, L, T, budget, rescore, R, share, window):
    check_fused_selection_with_rescoring("cpu", torch.float32, B, Hq, Hkv, L, 16, T, budget, rescore, R, share,
                                         window)


@interpreter_only
def test_interp_pick_keys_band_is_what_the_wider_pick_adds():
    """pick_keys with band_budget: the band lists exactly the keys the top-band_budget adds to the top-budget (the
    same two lists pick_keys gives alone), ascending."""
    from utils.methods.dhsa.fused import pick_keys

    g = torch.Generator().manual_seed(3)
    ends = torch.tensor([5, 16, 17, 40, 64, 80, 100, 130, 150, 200])
    scores = torch.randn(2, 4, ends.numel(), generator=g)
    args = dict(num_queries=200, q_offset=0, query_chunk=50, sink_tokens=4, local_tokens=8)
    keep, counts, band, band_counts = pick_keys(scores, ends, budget=40, num_slots=40, band_budget=90,
                                                forced_budget=60, **args)
    wide, wide_counts = pick_keys(scores, ends, budget=90, num_slots=90, forced_budget=60, **args)
    alone, _ = pick_keys(scores, ends, budget=40, num_slots=40, forced_budget=60, **args)
    assert torch.equal(keep, alone)
    assert torch.equal(band_counts + counts, wide_counts)
    for h in range(2):
        for t in range(4):
            a, b, w = (x[h, t][x[h, t] >= 0].tolist() for x in (keep, band, wide))
            assert b == sorted(b) and set(a) | set(b) == set(w) and not set(a) & set(b)


@interpreter_only
@pytest.mark.parametrize("dtype, Hq, H, L, D, T, Nc, config", [
    (torch.bfloat16, 8, 2, 100, 16, 16, 37, dict(rows=32, block_c=16)),  # 2 tiles a program, partial last tile
    (torch.float16, 4, 1, 70, 32, 32, 20, dict(rows=16, block_c=16)),    # one selection for all heads; 2 slices
    (torch.bfloat16, 2, 2, 90, 16, 40, 30, dict(rows=16, block_c=16)),   # tile of 40 in 3 slices, MHA
    (torch.float32, 4, 2, 53, 16, 8, 25, dict(rows=32, block_c=16)),     # 4 tiles a program, the last past the end
    (torch.float32, 4, 4, 50, 16, 100, 9, None),                          # one tile longer than the queries
])
def test_interp_max_pooled_scores_match_reference(dtype, Hq, H, L, D, T, Nc, config):
    check_max_pooled_scores("cpu", dtype, Hq, H, L, D, T, Nc, config)


@interpreter_only
@pytest.mark.parametrize("dtype, Hq, Hkv, Lq, Lk, D, window, softcap", [
    (torch.float16, 4, 2, 70, 70, 16, 20, None),
    (torch.float32, 2, 2, 40, 90, 32, 9, 4.0),   # queries after a prefix (KV cache), soft-capping
])
def test_interp_sliding_window_kernel(dtype, Hq, Hkv, Lq, Lk, D, window, softcap):
    """The kernel's window rule, on the window lists that sliding_window_attention builds, vs dense attention."""
    from utils.attention import dense_attention
    from utils.kernels.sparse_prefill import sparse_prefill

    q = rand(1, Hq, Lq, D, dtype=dtype, seed=7)
    k, v = rand(1, Hkv, Lk, D, dtype=dtype, seed=8), rand(1, Hkv, Lk, D, dtype=dtype, seed=9)
    T = 16
    n_tiles = math.ceil(Lq / T)
    first = (Lk - Lq) + torch.arange(n_tiles) * T - window + 1
    idx = first[:, None] + torch.arange(T + window - 1)[None, :]
    idx = torch.where((idx >= 0) & (idx < Lk), idx, -1).expand(1, Hkv, n_tiles, -1).contiguous()
    out = sparse_prefill(q, k, v, idx, query_chunk=T, q_offset=Lk - Lq, softcap=softcap, window=window,
                         config=dict(rows=32, block_n=16, num_warps=4, num_stages=1))
    ref = dense_attention(q.float(), k.float(), v.float(), window=window, softcap=softcap)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2), rel(out, ref)


@interpreter_only
def test_interp_block_path_and_flex():
    from utils.kernels.flex import flex_block_attention
    q, k, v, sel, ref = check_block_path("cpu", torch.float32, 1, 4, 2, 200, 16, 16, 64)
    assert rel(flex_block_attention(q, k, v, sel), ref) < 1e-5


@interpreter_only
@pytest.mark.parametrize("Lq", [1, 20])
def test_interp_queries_after_a_prefix(Lq):
    """Decode (Algorithm 2 boundaries) and a chunk of queries after cached keys: q_offset > 0."""
    from utils.methods.dhsa.scores import decode_boundaries
    from utils.methods.dhsa.fused import dhsa_select_fused
    from utils.kernels.sparse_prefill import sparse_prefill
    q, k, v = rand(1, 4, Lq, 16), rand(1, 2, 120, 16, seed=1), rand(1, 2, 120, 16, seed=2)
    ends = [decode_boundaries(fixed_size_ends(110, 8), 110, 120)] if Lq == 1 else [fixed_size_ends(120, 8)]
    opts = dict(budget=30, boundaries=ends, options=DHSAOptions(query_chunk=16, sink_tokens=4, local_tokens=4,
                                                                 head_pooling="mean", token_rescore=0))
    ref, got = dhsa_select(q, k, **opts), dhsa_select_fused(q, k, **opts)
    assert torch.equal(per_chunk_counts(got.key_index[0], ends[0]), per_chunk_counts(ref.key_index[0], ends[0]))
    out = sparse_prefill(q, k, v, got.key_index, got.counts, query_chunk=16, q_offset=got.q_offset, sorted_keys=True,
                         config=dict(rows=16, block_n=16))
    assert rel(out, sparse_attention(q, k, v, got)) < 1e-5


@interpreter_only
def test_interp_sorted_lists_skip_the_mask_safely():
    """KernelSelections are ascending: the kernel runs the blocks below each tile unmasked. Same output."""
    from utils.methods.dhsa.fused import dhsa_block_select, dhsa_select_fused
    from utils.kernels.sparse_prefill import sparse_prefill
    q, k, v = rand(1, 4, 300, 16), rand(1, 2, 300, 16, seed=1), rand(1, 2, 300, 16, seed=2)
    ends = [fixed_size_ends(300, 7)]
    sel = dhsa_select_fused(q, k, budget=64, boundaries=ends,
                            options=DHSAOptions(query_chunk=32, sink_tokens=8, local_tokens=8))
    blocks = dhsa_block_select(q, k, budget=64, boundaries=ends, block_size=16,
                               options=DHSAOptions(sink_tokens=16, local_tokens=16))
    for s, bs in ((sel, None), (blocks, 16)):
        outs = [sparse_prefill(q, k, v, s.key_index, s.counts, query_chunk=s.query_chunk, block_size=bs,
                               sorted_keys=flag, config=dict(rows=16, block_n=16)) for flag in (False, True)]
        assert rel(outs[1], outs[0]) < 1e-6


@interpreter_only
@pytest.mark.parametrize("L", [200, 256])
def test_interp_block_sparse_baseline_through_block_kernel(L):
    check_block_sparse_baseline("cpu", torch.float32, L)


@interpreter_only
@pytest.mark.parametrize("Lq, Lk", [(128, 128), (90, 141)])  # aligned prefill; queries after an unaligned prefix
def test_interp_flexprefill_and_xattention_through_the_kernels(Lq, Lk):
    check_peer_baselines("cpu", torch.float32, 1, 2, 1, Lq, Lk, 16, 16, 48)


# ---------------------------------------------------------------------------------------------- CUDA

@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, L, D, T, budget", [
    (1, 32, 8, 1000, 128, 256, 200),   # Llama-3.1-8B heads, L not a multiple of the tile
    (2, 8, 2, 777, 64, 128, 150),      # GQA 4:1, batch
    (1, 8, 4, 513, 256, 64, 96),       # Gemma-2 head dim
    (1, 12, 4, 300, 64, 256, 64),      # GQA 3:1
    (1, 4, 4, 400, 128, 100, 80),      # MHA, tile not a power of two
])
def test_cuda_kernel_matches_executor(dtype, B, Hq, Hkv, L, D, T, budget):
    check_kernel_matches_executor("cuda", dtype, B, Hq, Hkv, L, D, T, budget)


@cuda_only
def test_cuda_kernel_softcap_and_per_head_lists():
    check_kernel_matches_executor("cuda", torch.bfloat16, 1, 8, 4, 600, 256, 128, 100, softcap=50.0)
    check_kernel_matches_executor("cuda", torch.bfloat16, 1, 8, 2, 600, 128, 128, 100, per_query_head=True)


@cuda_only
def test_cuda_dispatch_equals_reference_path():
    """dhsa_attention on CUDA (fused selection + kernel) vs the PyTorch path with the kernels switched off.

    bf16 inputs: the fused selection scores chunks from bf16-rounded vectors, so on random inputs (near-ties
    everywhere) a few tiles may swap a chunk against the fp32 reference; the keys must still agree almost
    everywhere, and the attention must equal the reference executor on the kernel's own selection."""
    q, k, v = (rand(1, h, 2000, 128, device="cuda", dtype=torch.bfloat16, seed=i) for i, h in enumerate((32, 8, 8)))
    ends = as_boundary_list(fixed_size_ends(2000, 16, device="cuda"), 1, 2000, device="cuda")
    out = dhsa_attention(q, k, v, budget=250, boundaries=ends)
    sel = dhsa_select(q, k, budget=250, boundaries=ends)  # dispatches to the fused selection
    with kernels.disabled():
        ref_sel = dhsa_select(q.float(), k.float(), budget=250, boundaries=ends)
        ref = sparse_attention(q.float(), k.float(), v.float(), sel)
    assert rel(out, ref) < 1e-2
    kept = torch.zeros(sel.key_index.shape[:-1] + (2001,), dtype=torch.bool, device="cuda")
    ref_kept = torch.zeros_like(kept)
    kept.scatter_(-1, sel.key_index.long() % 2001, True)       # -1 (unused slot) lands in the spare column
    ref_kept.scatter_(-1, ref_sel.key_index.long() % 2001, True)
    agree = (kept & ref_kept)[..., :2000].sum() / ref_kept[..., :2000].sum()
    assert agree > 0.97, agree


@cuda_only
@pytest.mark.parametrize("L", [1000, 4096])
def test_cuda_fused_selection_keeps_the_same_keys(L):
    check_fused_selection("cuda", 1, 32, 8, L, 256, L // 16, None, 128, 128)
    check_fused_selection("cuda", 2, 8, 2, L, 128, L // 8, [3, 50, 51, 700, L - 1, L], 64, 64)


@cuda_only
@pytest.mark.parametrize("dtype, Hq, H, L, D, T, Nc", [
    (torch.bfloat16, 32, 8, 3000, 128, 64, 190),   # Llama-3.1-8B heads, DHSA's default tile
    (torch.float16, 8, 2, 1000, 256, 64, 70),      # Gemma-2 head dim
    (torch.bfloat16, 8, 1, 777, 64, 256, 50),      # shared selection, tile sliced (256 > rows)
    (torch.bfloat16, 4, 4, 500, 128, 100, 40),     # MHA, tile not a power of two
    (torch.float32, 8, 2, 600, 128, 64, 60),       # fp32: exact products
])
def test_cuda_max_pooled_scores_match_reference(dtype, Hq, H, L, D, T, Nc):
    check_max_pooled_scores("cuda", dtype, Hq, H, L, D, T, Nc)


@cuda_only
@pytest.mark.parametrize("Hq, Hkv, L, D, window, softcap", [(8, 4, 3000, 256, 512, None),   # Gemma-3 local layer
                                                             (8, 4, 5000, 256, 4096, 50.0),  # Gemma-2, soft-capping
                                                             (32, 8, 2000, 128, 300, None)])
def test_cuda_sliding_window_kernel(Hq, Hkv, L, D, window, softcap):
    check_sliding_window("cuda", torch.bfloat16, 1, Hq, Hkv, L, L, D, window, softcap=softcap)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_block_path_baseline_and_flex(dtype):
    from utils.kernels.flex import flex_block_attention
    q, k, v, sel, ref = check_block_path("cuda", dtype, 1, 32, 8, 2048, 128, 128, 512)
    assert rel(flex_block_attention(q, k, v, sel), ref) < 1e-2
    check_block_sparse_baseline("cuda", dtype, 1000)


@cuda_only
@pytest.mark.parametrize("tma", [True, False])
def test_cuda_block_kernel_reads_strided_kv_with_and_without_tma(tma):
    """Block mode on K/V laid out as transformers keeps them ([B, L, H, D] viewed as [B, H, L, D]) and a length
    that is no multiple of the key step: TMA descriptors (Hopper) and plain loads give the reference output."""
    from utils.methods.dhsa.fused import dhsa_block_select
    from utils.kernels.sparse_prefill import sparse_prefill

    B, Hq, Hkv, L, D, bs = 2, 8, 2, 1000, 128, 128
    q = rand(B, L, Hq, D, device="cuda", dtype=torch.bfloat16, seed=1).transpose(1, 2)
    k, v = (rand(B, L, Hkv, D, device="cuda", dtype=torch.bfloat16, seed=s).transpose(1, 2) for s in (2, 3))
    ends = as_boundary_list(fixed_size_ends(L, 16, device="cuda"), B, L, device="cuda")
    sel = dhsa_block_select(q, k, budget=384, boundaries=ends, block_size=bs,
                            options=DHSAOptions(sink_tokens=bs, local_tokens=bs))
    out = sparse_prefill(q, k, v, sel.key_index, sel.counts, query_chunk=sel.query_chunk, block_size=bs,
                         sorted_keys=True, config=dict(tma=tma))
    with kernels.disabled():
        ref = sparse_attention(q.float(), k.float(), v.float(), block_selection_to_tokens(sel, L))
    assert rel(out, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, bs, budget", [
    (1, 32, 8, 4096, 4096, 128, 128, 1024),   # Llama-3.1-8B heads, 25% density
    (1, 12, 2, 3000, 3000, 128, 128, 384),    # Qwen2.5-1.5B heads, L not a multiple of the block
    (2, 8, 4, 1000, 1300, 64, 64, 256),       # batch, queries after an unaligned prefix
])
def test_cuda_flexprefill_and_xattention_through_the_kernels(dtype, B, Hq, Hkv, Lq, Lk, D, bs, budget):
    check_peer_baselines("cuda", dtype, B, Hq, Hkv, Lq, Lk, D, bs, budget)


@cuda_only
@pytest.mark.parametrize("dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local", [
    (torch.bfloat16, 12, 2, 3000, 3000, 128, 64, 512, 1024, 4, 64, 128),   # qwen2.5-coder-1.5b heads, default tile
    (torch.float32, 14, 2, 2000, 2000, 64, 64, 256, 512, 4, 64, 128),      # qwen2.5-coder-0.5b heads, fp32
    (torch.float16, 8, 1, 1000, 1500, 256, 64, 200, 300, 0, 16, 16),       # head dim 256, shared, all queries
])
def test_cuda_fused_rescoring_keeps_the_same_keys(dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local):
    check_fused_rescoring("cuda", dtype, Hq, H, Lq, Lk, D, T, budget, W, R, sink, local)


@cuda_only
def test_cuda_fused_rescoring_without_kept_logits(monkeypatch):
    """Pass 2 gathering the keys again (the logits buffer over its limit) keeps the same keys as reading them."""
    from utils.methods.dhsa import fused_rescore
    monkeypatch.setattr(fused_rescore, "LOGITS_BYTES", 0)
    check_fused_rescoring("cuda", torch.bfloat16, 12, 2, 3000, 3000, 128, 64, 512, 1024, 4, 64, 128)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_selection_rescores_tokens(dtype):
    check_fused_selection_with_rescoring("cuda", dtype, 1, 12, 2, 4096, 128, 64, 512, 2.0, 4)
    check_fused_selection_with_rescoring("cuda", dtype, 2, 14, 2, 2000, 64, 64, 256, 2.0, 4, share=True)
    check_fused_selection_with_rescoring("cuda", dtype, 1, 14, 2, 8192, 64, 64, 1024, 3.0, 4, window=512)


@cuda_only
def test_cuda_exact_tail_on_the_fused_path():
    """exact_tail: the fused kernel selects every tile, then the tail tiles are redone exactly on the PyTorch path;
    the result equals the PyTorch path for the whole selection."""
    from utils.methods.dhsa.select import dhsa_select
    g = torch.Generator(device="cuda").manual_seed(0)
    L, T = 3000, 64
    q = torch.randn(1, 12, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ends = [torch.arange(16, L + 16, 16, device="cuda").clamp(max=L).unique()]
    options = DHSAOptions(exact_tail=128, token_rescore=0)
    fused = dhsa_select(q, k, budget=256, boundaries=ends, options=options)
    with kernels.disabled():
        reference = dhsa_select(q, k, budget=256, boundaries=ends, options=options)
    first = (L - 128) // T
    tail, ref_tail = fused.key_index[:, :, first:], reference.key_index[:, :, first:]
    assert torch.equal(tail, ref_tail)  # the exact tiles come from the same PyTorch code on the same inputs
    kept = torch.zeros(fused.key_index[:, :, :first].shape[:-1] + (L + 1,), dtype=torch.bool, device="cuda")
    ref_kept = torch.zeros_like(kept)
    kept.scatter_(-1, fused.key_index[:, :, :first].long() % (L + 1), True)  # -1 lands in the spare column
    ref_kept.scatter_(-1, reference.key_index[:, :, :first].long() % (L + 1), True)
    agree = (kept & ref_kept)[..., :L].sum() / ref_kept[..., :L].sum()
    assert agree > 0.97, agree  # fused vs PyTorch chunk scores: the same kept set up to ties


@cuda_only
def test_cuda_dense_tail_and_decode_question_keys():
    """The default dense question tail on the kernel path: the tail tiles equal dense attention, the tiles before it
    equal the same selection without a tail; a sparse decode step with the question's keys keeps its budget."""
    from utils.attention import dense_attention
    from utils.methods.dhsa.select import dhsa_attention
    from utils.methods import METHODS, LayerContext
    from utils.config import SparseAttentionConfig
    g = torch.Generator(device="cuda").manual_seed(0)
    L, T = 3000, 64
    q = torch.randn(1, 12, L + 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, L + 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 2, L + 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    first = (L - 128) // T * T  # the default dense_tail = 128
    out = dhsa_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], budget=256)
    plain = dhsa_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], budget=256, dense_tail=0)
    dense = dense_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L])
    torch.testing.assert_close(out[:, :, first:], dense[:, :, first:], atol=2e-2, rtol=2e-2)
    assert torch.equal(out[:, :, :first], plain[:, :, :first])
    config = SparseAttentionConfig(method="dhsa", budget=256, decode="sparse")
    context = LayerContext()
    METHODS["dhsa"].select(q[:, :, :L], k[:, :, :L], config, context)
    step = METHODS["dhsa"].select(q[:, :, L:], k, config, context)
    assert context.state["dhsa"]["question_keys"].shape == (1, 12, 256)
    assert step.key_index.shape == (1, 12, 1, 256) and step.dense_from is None


# ---------------------------------------------------------------------------------------------- RTX 3090 tile configs

def test_rtx3090_gets_smaller_tiles_that_fit(monkeypatch):
    """With 99 KB per block (RTX 3090, sm_86) the configs shrink to fit, by the kernels' own accounting, and the
    H100's stay as tuned; the limit is forced by shared_memory_limit or DHSA_SHARED_MEMORY."""
    from utils.methods.dhsa.fused import max_pooled_config
    from utils.kernels.shared_memory import H100, RTX_3090, shared_memory_limit, shared_memory_per_block
    from utils.kernels.sparse_prefill import default_config

    assert default_config(128, 4, shared_memory=H100) == dict(rows=256, block_n=64, num_warps=16, num_stages=5)
    with shared_memory_limit(RTX_3090):
        assert shared_memory_per_block() == RTX_3090
        assert default_config(128, 4) == dict(rows=128, block_n=64, num_warps=8, num_stages=2)
        assert default_config(128, 4, block_mode=True) == dict(rows=128, block_n=64, num_warps=4, num_stages=2,
                                                               tma=True)  # TMA needs sm_90: a 3090 loads rows
        assert max_pooled_config(256) == dict(rows=64, block_c=64, num_warps=8, num_stages=2)
        assert max_pooled_config(128, element_size=4) == dict(rows=128, block_c=32, num_warps=4, num_stages=2)
        for D in (64, 128, 256):
            for block_mode in (False, True):
                c = default_config(D, 4, block_mode)
                assert 2 * D * (c["rows"] + 2 * c["num_stages"] * c["block_n"]) <= RTX_3090, (D, c)
            for size in (2, 4):
                c = max_pooled_config(D, size)
                assert size * D * (c["rows"] + c["num_stages"] * c["block_c"]) <= RTX_3090, (D, size, c)
    assert max_pooled_config(128, shared_memory=H100) == dict(rows=128, block_c=64, num_warps=4, num_stages=4)
    monkeypatch.setenv("DHSA_SHARED_MEMORY", str(RTX_3090))
    assert shared_memory_per_block() == RTX_3090
    monkeypatch.setenv("DHSA_SHARED_MEMORY", "99KB")
    with pytest.raises(ValueError, match="DHSA_SHARED_MEMORY must be a number of bytes .* e.g. 101376"):
        shared_memory_per_block()


class _LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
                  torch.int32: "*i32"}


def shared_memory_on_sm86(kernel, args, kwargs) -> int:
    """Bytes of shared memory per block of one recorded launch, compiled for Ampere sm_86 (an RTX 3090) by Triton's
    own compiler: no GPU needed, the number the driver would check at launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature = {name: "constexpr" if name in kwargs else _POINTER_TYPES[values[name].dtype]
                 if isinstance(values[name], torch.Tensor) else "fp32" if isinstance(values[name], float) else "i32"
                 for name in kernel.arg_names}
    constants = {(kernel.arg_names.index(name),): value for name, value in kwargs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 86, 32),
                              options=options)
    return compiled.metadata.shared


def launches_of(monkeypatch, limit: int) -> list[tuple]:
    """(kernel, args, kwargs) of the Triton launches that the kernels' wrappers make under a shared-memory limit,
    for the layer shapes of the latency tables (head dims 64/128/256, token and block mode, bf16, fp32 scoring)."""
    from utils.methods.dhsa import fused as select_module
    from utils.methods.dhsa import fused_rescore as rescore_module
    from utils.kernels import sparse_prefill as prefill_module
    from utils.kernels.shared_memory import shared_memory_limit

    recorders = {}
    for module, name in ((prefill_module, "_sparse_prefill_kernel"), (select_module, "_max_pooled_scores_kernel"),
                         (select_module, "_dhsa_pick_kernel"), (rescore_module, "_rescore_weights_kernel"),
                         (rescore_module, "_keep_best_kernel")):
        kernel = getattr(module, name)
        recorders[name] = _LaunchRecorder(kernel.kernel if isinstance(kernel, _LaunchRecorder) else kernel)
        monkeypatch.setattr(module, name, recorders[name])
    with shared_memory_limit(limit):
        for Hq, Hkv, D in ((32, 8, 128), (12, 2, 128), (9, 3, 64), (8, 4, 256)):
            q, k = torch.zeros(1, Hq, 256, D, dtype=torch.bfloat16), torch.zeros(1, Hkv, 256, D, dtype=torch.bfloat16)
            idx = torch.zeros(1, Hkv, 4, 64, dtype=torch.long)
            prefill_module.sparse_prefill(q, k, k, idx, query_chunk=64, sorted_keys=True)
            prefill_module.sparse_prefill(q, k, k, idx[:, :, :2, :2], query_chunk=128, block_size=128, sorted_keys=True)
            prefill_module.sparse_prefill(q, k, k, idx, query_chunk=64, softcap=50.0)
            for dtype in (torch.bfloat16, torch.float32):
                select_module.max_pooled_chunk_scores_gpu(q[0].to(dtype), torch.zeros(Hkv, 40, D), 64)
                rescore_module.rescore_candidates(q[0].to(dtype), k[0].to(dtype), torch.zeros(Hkv, 4, 128, dtype=torch.long),
                                                  budget=64, query_chunk=64, q_offset=0, sink_tokens=16, local_tokens=16,
                                                  rescore_queries=4)
        for chunks in (2000, 8000, 32768):  # chunk scores of a tile: 32K to 512K keys at 16 keys per chunk
            select_module.pick_keys(torch.zeros(1, 1, chunks), torch.arange(1, chunks + 1), num_queries=1,
                                    q_offset=chunks - 1, budget=64, query_chunk=64, sink_tokens=16, local_tokens=16,
                                    num_slots=64)
    return [(recorder.kernel, args, kwargs) for recorder in recorders.values() for args, kwargs in recorder.launches]


@needs_triton
@pytest.mark.skipif(INTERPRETER, reason="compiles for a GPU target")
def test_rtx3090_configs_compile_within_its_shared_memory(monkeypatch):
    """Every kernel launch the wrappers make with a 3090's 99 KB, compiled for sm_86 by Triton (on any machine):
    each fits in 99 KB per block. The H100's configs do not all fit (fp32 scoring), so the limit is what keeps them
    in; that is also checked, so that this test cannot pass by compiling nothing that could overflow."""
    from utils.kernels.shared_memory import H100, RTX_3090

    small = launches_of(monkeypatch, RTX_3090)
    assert len(small) == 4 * 5 + 3 + 4 * 2 * 2  # + token rescoring: 2 kernels x 2 dtypes per shape
    for kernel, args, kwargs in small:
        used = shared_memory_on_sm86(kernel, args, kwargs)
        assert used <= RTX_3090, (kernel.fn.__name__, {n: v for n, v in kwargs.items() if not n.isupper()}, used)
    large = [shared_memory_on_sm86(*launch) for launch in launches_of(monkeypatch, H100)
             if launch[0].fn.__name__ == "_max_pooled_scores_kernel" and launch[2]["IEEE"]]
    assert max(large) > RTX_3090, large


@cuda_only
def test_cuda_rtx3090_configs(monkeypatch):
    """The tile configs an RTX 3090 gets (99 KB of shared memory per block, no TMA), forced on this GPU: the
    attention kernel (token and block mode, soft-capping, sliding windows), the fused selection and the
    max-pooled scoring kernel give the PyTorch path's results, within the tolerances of the tests above."""
    from utils.kernels import sparse_prefill as prefill_module
    from utils.kernels.shared_memory import RTX_3090, shared_memory_limit

    monkeypatch.setattr(prefill_module, "_tma_usable", lambda *tensors: False)  # sm_86 has no TMA
    with shared_memory_limit(RTX_3090):
        for D in (64, 128, 256):
            check_kernel_matches_executor("cuda", torch.bfloat16, 1, 32 if D == 128 else 8, 8 if D == 128 else 2,
                                          1500, D, 64, 200)
        check_kernel_matches_executor("cuda", torch.float16, 2, 12, 2, 900, 128, 128, 300)  # Qwen2.5-1.5B heads
        check_kernel_matches_executor("cuda", torch.bfloat16, 1, 8, 4, 600, 256, 64, 100, softcap=50.0)  # Gemma-2
        check_kernel_matches_executor("cuda", torch.bfloat16, 1, 8, 2, 600, 128, 64, 100, per_query_head=True)
        check_sliding_window("cuda", torch.bfloat16, 1, 8, 4, 3000, 3000, 256, 512)
        for dtype, Hq, H, L, D, T, Nc in [(torch.bfloat16, 32, 8, 3000, 128, 64, 190),
                                          (torch.float16, 8, 2, 1000, 256, 64, 70),
                                          (torch.float32, 8, 2, 600, 128, 64, 60)]:
            check_max_pooled_scores("cuda", dtype, Hq, H, L, D, T, Nc)
        check_fused_selection("cuda", 2, 8, 2, 2000, 128, 250, None, 64, 64)
        test_cuda_dispatch_equals_reference_path()  # selection + attention through the dispatch, Llama heads
        check_block_path("cuda", torch.bfloat16, 1, 32, 8, 2048, 128, 128, 512)
        check_peer_baselines("cuda", torch.bfloat16, 1, 12, 2, 3000, 3000, 128, 128, 384)


@interpreter_only
def test_interp_merge_sorted_lists():
    """merge_sorted: two ascending lists per row with counts (-1 after, disjoint) -> one ascending list, -1 after."""
    from utils.methods.dhsa.fused import merge_sorted

    g = torch.Generator().manual_seed(4)
    H, n, Na, Nb = 2, 3, 20, 7
    a = torch.full((H, n, Na), -1, dtype=torch.long)
    b = torch.full((H, n, Nb), -1, dtype=torch.long)
    ca, cb = torch.randint(0, Na + 1, (H, n), generator=g), torch.randint(0, Nb + 1, (H, n), generator=g)
    for h in range(H):
        for t in range(n):
            keys = torch.randperm(100, generator=g)[: int(ca[h, t] + cb[h, t])]
            a[h, t, : ca[h, t]] = keys[: ca[h, t]].sort().values
            b[h, t, : cb[h, t]] = keys[ca[h, t]:].sort().values
    got = merge_sorted(a, ca, b, cb)
    for h in range(H):
        for t in range(n):
            want = sorted(a[h, t][a[h, t] >= 0].tolist() + b[h, t][b[h, t] >= 0].tolist())
            assert got[h, t].tolist() == want + [-1] * (Na + Nb - len(want))
