"""sparse_attention.py on its own: the CPU kernel and the two-part (window + pivots, merged by log-sum-exp)
formulation of the CUDA path, each against a dense masked reference written from the definition, forward and
gradients; the FlexAttention block masks against the mask they stand for; pivot sampling.

Needs only torch and pytest (no transformers, no hypothesis), so that a GPU machine can run `pytest -m gpu` here.
Tests marked `gpu` run the FlexAttention path itself and skip without CUDA."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch
from helpers import REPO_ROOT, assert_close


def _import():
    if "sparse_attention_repo" not in sys.modules:
        pkg = types.ModuleType("sparse_attention_repo")
        pkg.__path__ = [str(REPO_ROOT)]
        sys.modules["sparse_attention_repo"] = pkg
    from sparse_attention_repo import sparse_attention

    return sparse_attention


sa = _import()


def gpu(test):
    """Marks a test `gpu` (run them with `pytest -m gpu`); it skips without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# ---------------------------------------------------------------------------------------------------------------
# Dense reference: the allowed-set definition of reference-notes Part B §1, written independently of the module.
# ---------------------------------------------------------------------------------------------------------------
def allowed_and_bias(mode: int, q_len: int, k_len: int, w: int, t: int, pivots: torch.Tensor):
    """Bool [B, Q, K] allowed keys and float [B, Q, K] additive bias for the last q_len queries of k_len keys."""
    bsz, n = pivots.shape
    i = torch.arange(k_len - q_len, k_len).view(1, -1, 1)
    j = torch.arange(k_len).view(1, 1, -1)
    is_pivot = torch.zeros(bsz, k_len, dtype=torch.bool)
    is_pivot.scatter_(1, pivots.cpu(), True)
    is_pivot = is_pivot[:, None, :]
    if mode == 1:
        window = (i // w - j // w >= 0) & (i // w - j // w < t) & (j <= i)
        far_pivot = is_pivot & (j // w <= i // w - t)
        bias = far_pivot.double() * math.log(k_len // n)
    else:
        window = (j > i - t * w) & (j <= i)
        far_pivot = is_pivot & (j <= i - t * w)
        bias = torch.zeros_like(far_pivot, dtype=torch.double)
    return (window | far_pivot), bias


def dense_reference(q, k, v, allowed, bias):
    allowed, bias = allowed.to(q.device), bias.to(q.device)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias[:, None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.double()).transpose(1, 2)  # [B, Q, H, D]


def with_padding(allowed, key_mask, q_len, k_len):
    """Padding keys are invisible, except each query's own key."""
    own = torch.arange(k_len - q_len, k_len).view(1, -1, 1) == torch.arange(k_len).view(1, 1, -1)
    return (allowed & key_mask.cpu()[:, None, :]) | own


def geometry(mode, q_len, k_len, w, t, n_piv):
    """(window_start, block, span, bias) of the plan for these sizes (as plan_sparse_attention makes them)."""
    pos = torch.arange(k_len - q_len, k_len)
    if mode == 1:
        return (pos // w - (t - 1)) * w, w, t * w, math.log(k_len // n_piv)
    block = min(q_len, w)
    return pos - (t * w - 1), block, -(-(t * w + block - 1) // block) * block, 0.0


def random_case(seed: int, max_blocks: int = 6, device="cpu", dtype=torch.float32, heads=3, head_dim=8):
    """A random mode, w, t, batch, pivots (unsorted, some past the keys in mode 2), padding and query chunk."""
    r = random.Random(seed)
    mode, w, t = r.choice([1, 2]), r.randint(1, 5), r.randint(1, 3)
    if mode == 1:
        k_len = (t + r.randint(1, max_blocks) - 1) * w
        q_len = k_len
    else:
        k_len = t * w + r.randint(1, max_blocks) * w + r.randint(0, 3)
        q_len = 1 + r.randint(1, 40) % k_len  # prefill, a chunk after a cache, or one decode step
    batch, n_piv = r.randint(1, 2), min(r.randint(1, 6), k_len)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for n in (q_len, k_len, k_len))
    pivots = torch.stack([torch.randperm(k_len, generator=g)[:n_piv] for _ in range(batch)])
    key_mask = None
    if r.random() < 0.5:
        key_mask = torch.ones(batch, k_len, dtype=torch.bool)
        key_mask[-1, : r.randint(1, max(1, k_len // 3))] = False  # left padding of the last row
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    pivots = pivots.to(device)
    key_mask = key_mask.to(device) if key_mask is not None else None
    return mode, w, t, q, k, v, pivots, key_mask


def reference_for(mode, w, t, q, k, v, pivots, key_mask):
    q_len, k_len = q.shape[2], k.shape[2]
    allowed, bias = allowed_and_bias(mode, q_len, k_len, w, t, pivots)
    if key_mask is not None:
        allowed = with_padding(allowed, key_mask, q_len, k_len)
    return dense_reference(q, k, v, allowed, bias)


def check_against_reference(out, expected, inputs, atol, msg, seed=0):
    assert_close(out, expected, atol=atol, msg=msg)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    ours = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    ref = torch.autograd.grad(expected, inputs, grad.double())
    for name, a, b in zip("qkv", ours, ref):
        assert_close(a, b, atol=atol, msg=f"{msg} d{name}")


def two_part(q, k, v, mode, w, t, pivots, key_mask, attend):
    start, _, _, bias = geometry(mode, q.shape[2], k.shape[2], w, t, pivots.shape[1])
    parts = sa._FlexParts.get({}, q, k, start.to(q.device), pivots, key_mask)
    return sa._two_part_attention(q, k, v, parts, bias, q.shape[-1] ** -0.5, attend)


# ---------------------------------------------------------------------------------------------------------------
# The CPU kernel
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_kernel_matches_dense_masked_reference(seed):
    mode, w, t, q, k, v, pivots, key_mask = random_case(seed)
    start, block, span, bias = geometry(mode, q.shape[2], k.shape[2], w, t, pivots.shape[1])
    out = sa.sparse_window_attention(q, k, v, start, block, span, pivots, bias, key_mask, 8**-0.5, backend="kernel")
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    check_against_reference(out, expected, (q, k, v), 1e-5, f"kernel mode {mode} w={w} t={t}", seed)


@pytest.mark.parametrize("mode", [1, 2])
def test_kernel_step_by_step_matches_reference(mode, monkeypatch):
    """One block per step (the many-step path long sequences take): pivot prefixes per step, window gradients
    folded across steps, unsorted pivots and padded keys, forward and gradients against the dense reference."""
    monkeypatch.setattr(sa, "_STEP_ELEMENTS", 1)
    g = torch.Generator().manual_seed(mode)
    w, t, batch, n_piv = 3, 2, 2, 5
    k_len = 8 * w + (2 if mode == 2 else 0)
    q_len = k_len if mode == 1 else 11  # mode 2: a chunk of queries after cached keys, last block partial
    q, k, v = (torch.randn(batch, 2, n, 4, generator=g, requires_grad=True) for n in (q_len, k_len, k_len))
    pivots = torch.stack([torch.randperm(k_len, generator=g)[:n_piv] for _ in range(batch)])  # unsorted
    key_mask = torch.ones(batch, k_len, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding of row 1: its keys and any pivot there are invisible
    start, block, span, bias = geometry(mode, q_len, k_len, w, t, n_piv)
    out = sa.sparse_window_attention(q, k, v, start, block, span, pivots, bias, key_mask, 4**-0.5)
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    check_against_reference(out, expected, (q, k, v), 1e-5, f"mode {mode} step by step")


@pytest.mark.parametrize("step_elements, heads, head_dim", [(None, 2, 3), (1, 1, 2)])
def test_kernel_gradcheck_with_dropout_and_padding(step_elements, heads, head_dim, monkeypatch):
    """Finite differences (float64) through the custom backward, with attention dropout and padded keys, in one
    step and one block per step (dropout masks must be replayed in the same order)."""
    if step_elements is not None:
        monkeypatch.setattr(sa, "_STEP_ELEMENTS", step_elements)
    g = torch.Generator().manual_seed(0)
    shape = (2, heads, 9, head_dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.double, requires_grad=True) for _ in range(3))
    pos = torch.arange(9)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False
    pivots = torch.tensor([[0, 1, 6], [3, 4, 5]])  # row 1: pivot 6 is visible only to the last block
    geo = sa._SparseGeometry(q, k, (pos // 3 - 1) * 3, 3, 6, pivots, 0.7, key_mask)
    fn = lambda q, k, v: sa._SparseWindowAttention.apply(q, k, v, geo, 0.5, 0.3, 1234)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
    with torch.no_grad():
        dropped = fn(q, k, v)
        kept = sa._SparseWindowAttention.apply(q, k, v, geo, 0.5, 0.0, 0)
    assert (dropped - kept).abs().max() > 1e-3  # dropout did something


# ---------------------------------------------------------------------------------------------------------------
# The two-part formulation of the CUDA path, on the CPU: same parts, same merge; only the attention calls differ
# (plain torch here, compiled FlexAttention on CUDA).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_two_parts_merged_by_lse_match_dense_reference(seed):
    mode, w, t, q, k, v, pivots, key_mask = random_case(seed)
    out = two_part(q, k, v, mode, w, t, pivots, key_mask, sa.dense_part)
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    check_against_reference(out, expected, (q, k, v), 1e-5, f"two parts mode {mode} w={w} t={t}", seed)


@pytest.mark.parametrize("seed", range(4))
def test_two_parts_through_flex_attention_forward_on_cpu(seed):
    """FlexAttention itself (its eager CPU forward: no CPU backward exists) reads the parts' mask function, block
    masks and log-sum-exp as the plain-torch parts do."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def flex_part(query, key, value, part, scaling):
        out, aux = flex.flex_attention(
            query, key, value, block_mask=part.block_mask(), scale=scaling, return_aux=flex.AuxRequest(lse=True)
        )
        return out, aux.lse

    mode, w, t, q, k, v, pivots, key_mask = random_case(100 + seed, max_blocks=40)
    q, k, v = (x.detach() for x in (q, k, v))  # flex refuses CPU inputs that require grad
    with torch.no_grad():
        out = two_part(q, k, v, mode, w, t, pivots, key_mask, flex_part)
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    assert_close(out, expected, atol=1e-5, msg=f"flex forward mode {mode}")


@pytest.mark.parametrize("seed", range(12))
def test_block_masks_cover_the_mask_and_full_tiles_are_full(seed):
    """Every allowed (query, key) pair lies in a listed tile; tiles marked full hold only allowed pairs; tiles with
    nothing allowed are rarely listed (the window reads at most its span plus two tiles). Long sequences (several
    128-tiles), windows wider and narrower than a tile, pivots with and without padding."""
    r = random.Random(seed)
    mode, w, t = r.choice([1, 2]), r.choice([1, 16, 64, 100, 200]), r.randint(1, 4)
    k_len = t * w + r.randint(1, 700)
    k_len = k_len // w * w if mode == 1 else k_len
    q_len = k_len if mode == 1 else r.randint(1, k_len)
    batch, n = 2, r.randint(1, min(300, k_len))
    g = torch.Generator().manual_seed(seed)
    pivots = torch.stack([torch.randperm(k_len, generator=g)[:n] for _ in range(batch)])
    key_mask = None
    if r.random() < 0.5:
        key_mask = torch.ones(batch, k_len, dtype=torch.bool)
        key_mask[0, : r.randint(1, k_len)] = False
    q = torch.zeros(batch, 1, q_len, 16)
    start, _, _, _ = geometry(mode, q_len, k_len, w, t, n)
    parts = sa._FlexParts.get({}, q, torch.zeros(batch, 1, k_len, 16), start, pivots, key_mask)
    for name, part in (("window", parts.window), ("pivots", parts.pivots)):
        allowed = part.dense()  # [B, 1, Q, KV]
        pad_q, pad_kv = sa._tiles(part.q_len) * sa._TILE - part.q_len, sa._tiles(part.kv_len) * sa._TILE - part.kv_len
        tiles = torch.nn.functional.pad(allowed, (0, pad_kv, 0, pad_q))
        tiles = tiles.unflatten(-1, (-1, sa._TILE)).unflatten(-3, (-1, sa._TILE))  # [B, 1, QT, 128, KT, 128]
        any_allowed = tiles.any(-1).any(-2)
        listed = part.partial | (part.full if part.full is not None else False)
        assert not (any_allowed & ~listed).any(), f"{name}: an allowed pair lies in an unlisted tile"
        if part.full is not None:
            all_allowed = tiles.all(-1).all(-2)
            assert not (part.full & ~all_allowed).any(), f"{name}: a tile marked full holds masked pairs"
            assert not (part.full & part.partial).any()
        block_mask = part.block_mask()
        dense = block_mask.to_dense().bool()
        assert torch.equal(dense.expand_as(listed), listed.expand_as(dense)), f"{name}: BlockMask lists other tiles"
        # the query-major lists (backward) we build from our tiles are the ones torch derives from the key-major
        derived = type(block_mask).from_kv_blocks(
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            BLOCK_SIZE=sa._TILE,
            seq_lengths=(part.q_len, part.kv_len),
        )
        for field in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            ours, theirs = getattr(block_mask, field), getattr(derived, field)
            assert (ours is None) == (theirs is None), f"{name}: {field}"
            assert ours is None or torch.equal(ours, theirs), f"{name}: {field} differs from from_kv_blocks'"
    # the window part reads about (t * w + 128) / 128 + 1 key tiles per query tile, not the whole causal triangle
    per_row = (parts.window.partial | (parts.window.full if parts.window.full is not None else False)).sum(-1)
    assert int(per_row.max()) <= -(-(t * w + sa._TILE) // sa._TILE) + 1


def test_merge_by_lse_gradcheck_and_empty_second_part(monkeypatch):
    monkeypatch.setattr(sa, "_MERGE_ELEMENTS", 40)  # several chunks of query rows
    g = torch.Generator().manual_seed(0)
    o1, o2 = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.double, requires_grad=True) for _ in range(2))
    l1, l2 = (torch.randn(2, 3, 7, generator=g, dtype=torch.double, requires_grad=True) for _ in range(2))
    o2 = o2.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # flex may return such a layout
    assert torch.autograd.gradcheck(sa.merge_by_lse, (o1, l1, o2, l2), eps=1e-6, atol=1e-6)
    # a second part that sees nothing (lse -inf, out 0) leaves the first part unchanged, with finite gradients
    empty = torch.full((2, 3, 7), float("-inf"), dtype=torch.double, requires_grad=True)
    out = sa.merge_by_lse(o1, l1, torch.zeros_like(o2), empty)
    assert torch.equal(out, o1)
    grads = torch.autograd.grad(out.sum(), (o1, l1, empty))
    assert all(bool(torch.isfinite(x).all()) for x in grads)


def test_fused_merge_eagerly_gradcheck_and_empty_second_part(monkeypatch):
    """The one-pass merge CUDA compiles, run eagerly: gradients, a second part that sees nothing, and agreement
    with the chunked merge; its output is a [B, H, Q, D] view of a [B, Q, H, D] tensor."""
    monkeypatch.setattr(sa._FusedMerge, "compiled", False)
    g = torch.Generator().manual_seed(1)
    o1, o2 = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.double, requires_grad=True) for _ in range(2))
    l1, l2 = (torch.randn(2, 3, 7, generator=g, dtype=torch.double, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(sa._FusedMerge.apply, (o1, l1, o2, l2), eps=1e-6, atol=1e-6)
    out = sa._FusedMerge.apply(o1, l1, o2, l2)
    assert out.transpose(1, 2).is_contiguous()
    assert_close(out, sa.merge_by_lse(o1, l1, o2, l2), atol=1e-12, msg="fused vs chunked merge")
    empty = torch.full((2, 3, 7), float("-inf"), dtype=torch.double, requires_grad=True)
    out = sa._FusedMerge.apply(o1, l1, torch.zeros_like(o2), empty)
    assert torch.equal(out, o1)
    grads = torch.autograd.grad(out.sum(), (o1, l1, empty))
    assert all(bool(torch.isfinite(x).all()) for x in grads)


@pytest.mark.parametrize("seed", range(6))
def test_two_parts_with_the_fused_merge_match_dense_reference(seed, monkeypatch):
    """The CUDA path's merge (run eagerly here): with gradients (autograd Function) and in inference (written
    over the window part's output)."""
    monkeypatch.setattr(sa._FusedMerge, "compiled", False)
    mode, w, t, q, k, v, pivots, key_mask = random_case(200 + seed)
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    start, _, _, bias = geometry(mode, q.shape[2], k.shape[2], w, t, pivots.shape[1])
    parts = sa._FlexParts.get({}, q, k, start, pivots, key_mask)
    scaling = q.shape[-1] ** -0.5
    out = sa._two_part_attention(q, k, v, parts, bias, scaling, sa.dense_part, fused=True)
    check_against_reference(out, expected, (q, k, v), 1e-5, f"fused merge mode {mode} w={w} t={t}", seed)
    with torch.no_grad():
        out = sa._two_part_attention(q, k, v, parts, bias, scaling, sa.dense_part, fused=True)
    assert_close(out, expected, atol=1e-5, msg=f"fused merge in inference mode {mode}")


def test_dispatch_on_cpu_takes_the_kernel(monkeypatch):
    """On the CPU `auto` never reaches FlexAttention (no CPU backward); a bad backend name is a ValueError."""
    called = []
    monkeypatch.setattr(sa, "_two_part_attention", lambda *a, **k: called.append(1))
    mode, w, t, q, k, v, pivots, key_mask = random_case(3)
    start, block, span, bias = geometry(mode, q.shape[2], k.shape[2], w, t, pivots.shape[1])
    sa.sparse_window_attention(q, k, v, start, block, span, pivots, bias, key_mask, 1.0)
    assert not called
    with pytest.raises(ValueError, match="backend"):
        sa.sparse_window_attention(q, k, v, start, block, span, pivots, bias, key_mask, 1.0, backend="triton")


def test_sampled_pivots_text_first_exact_count_and_deterministic():
    is_image = torch.ones(3, 24, dtype=torch.bool)
    is_image[:, [0, 5, 11]] = False  # three text tokens per row
    valid = torch.ones_like(is_image)
    valid[2, :4] = False  # padding is never a pivot
    is_text, is_img = valid & ~is_image, valid & is_image
    a = sa.sample_pivots(is_text, is_img, 6, torch.Generator().manual_seed(1))
    b = sa.sample_pivots(is_text, is_img, 6, torch.Generator().manual_seed(1))
    c = sa.sample_pivots(is_text, is_img, 6, torch.Generator().manual_seed(2))
    assert a.shape == (3, 6) and torch.equal(a, b) and not torch.equal(a, c)
    for row in range(3):
        chosen = set(a[row].tolist())
        assert len(chosen) == 6 and sorted(chosen) == a[row].tolist()
        assert set(is_text[row].nonzero().flatten().tolist()) <= chosen
        assert all(valid[row, j] for j in chosen)
    with pytest.raises(ValueError, match="text tokens"):
        sa.check_pivot_candidates(is_text, is_img, 2, 1)


def _cogview_config(w: int, t: int, num_pivot: int, layers: int = 3):
    return types.SimpleNamespace(
        query_window=w, key_window_times=t, num_pivot=num_pivot, max_position_embeddings=64, num_layers=layers,
        num_image_tokens=100,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_decode_step_masks_see_what_the_sampled_plan_lets_the_last_query_see(seed):
    """A mode-2 decode step (one query at position K-1) builds its masks on the device; with the same generator they
    hold, per layer, exactly the window and the pivots that the sampler picks for the last query of a full call
    (the reference's allowed set), minus padding, plus the query's own key."""
    rng = random.Random(seed)
    w, t, bsz = rng.choice([2, 3, 4]), rng.choice([1, 2]), rng.choice([1, 3])
    k_len = t * w + rng.randint(4, 20)
    config = _cogview_config(w, t, num_pivot=rng.choice([8, 32]))
    generator = torch.Generator().manual_seed(seed)
    image_mask = torch.rand(bsz, k_len, generator=generator) < 0.8
    key_mask = torch.ones(bsz, k_len, dtype=torch.bool)
    key_mask[-1, : rng.randint(0, 3)] = False  # left padding in the last row
    plan = sa.plan_sparse_attention(
        config, 2, None, bsz, k_len, 0, key_mask, None, image_mask, torch.Generator().manual_seed(seed), "cpu"
    )
    masks = sa.decode_step_masks(
        config, bsz, k_len, key_mask, None, image_mask, torch.Generator().manual_seed(seed), "cpu"
    )
    assert len(masks) == config.num_layers
    own = torch.arange(k_len) == k_len - 1
    for layer, (mask, pivots) in enumerate(zip(masks, plan.pivots)):
        allowed, _ = allowed_and_bias(2, 1, k_len, w, t, pivots)
        assert mask.shape == (bsz, 1, 1, k_len) and mask.dtype == torch.bool
        assert torch.equal(mask[:, 0, 0], allowed[:, 0] & key_mask | own), f"layer {layer}"
    # a plan for one new query against a cache carries these masks instead of pivots
    step = sa.plan_sparse_attention(
        config, 2, None, bsz, 1, k_len - 1, key_mask, None, image_mask, torch.Generator().manual_seed(seed), "cpu"
    )
    assert step.pivots == [] and all(torch.equal(a, b) for a, b in zip(step.step_masks, masks))


@pytest.mark.parametrize("seed", range(4))
def test_decode_step_masks_over_a_static_caches_slots_equal_the_dynamic_ones(seed):
    """A static cache's step (query at slot `last`, a device tensor; all N slots as keys, those after `last` empty)
    sees the dynamic step's keys with the same generator: the same noise per key (drawn max_position_embeddings
    wide) and no slot after the query. Sampled and given pivots, with padding."""
    rng = random.Random(seed)
    w, t, bsz = rng.choice([2, 3, 4]), rng.choice([1, 2]), rng.choice([1, 3])
    k_len = rng.randint(1, 40)  # from inside the window to well past it
    n_slots = k_len + rng.randint(1, 20)
    config = _cogview_config(w, t, num_pivot=rng.choice([8, 32]))
    image_mask = torch.rand(bsz, n_slots, generator=torch.Generator().manual_seed(seed)) < 0.8
    key_mask = torch.ones(bsz, n_slots, dtype=torch.bool)
    key_mask[-1, : rng.randint(0, 3)] = False
    given = torch.tensor([[0, 3, 17, 30]])
    for pivots in (None, given):
        dynamic = sa.decode_step_masks(
            config, bsz, k_len, key_mask[:, :k_len], pivots, image_mask, torch.Generator().manual_seed(seed), "cpu"
        )
        static = sa.decode_step_masks(
            config, bsz, n_slots, key_mask, pivots, image_mask, torch.Generator().manual_seed(seed), "cpu",
            last=torch.tensor([k_len - 1]),
        )  # fmt: skip
        for layer, (d, s) in enumerate(zip(dynamic, static)):
            assert torch.equal(s[..., :k_len], d) and not s[..., k_len:].any(), f"layer {layer}, pivots {pivots}"


def test_decode_step_masks_with_given_pivots_and_too_few_candidates():
    """Given pivots: those left of the window count, the others (not reached yet, up to max_position_embeddings)
    stay invisible. Sampled: a row with fewer candidates than CogView's count takes them all (the full call would
    raise; a decode step cannot read the count without waiting for the device)."""
    config = _cogview_config(w=2, t=2, num_pivot=64)
    k_len = 12  # limit = 8
    pivots = torch.tensor([[0, 5, 9, 40], [1, 2, 7, 63]])
    masks = sa.decode_step_masks(config, 2, k_len, None, pivots, None, None, "cpu")
    expected = torch.zeros(2, k_len, dtype=torch.bool)
    expected[:, 8:] = True
    expected[0, [0, 5]] = expected[1, [1, 2, 7]] = True
    assert all(torch.equal(m[:, 0, 0], expected) for m in masks)

    image_mask = torch.ones(2, k_len, dtype=torch.bool)
    image_mask[0, :6] = False  # of the first 8 keys, row 0: 6 text, 2 image; row 1: 2 text, 3 padding, 3 image
    image_mask[1, :2] = False
    key_mask = torch.ones(2, k_len, dtype=torch.bool)
    key_mask[1, 2:5] = False  # count = 6 text + max(0, (5 - 6) * 1) = 6; row 1 has 5 candidates: all
    masks = sa.decode_step_masks(config, 2, k_len, key_mask, None, image_mask, torch.Generator().manual_seed(0), "cpu")
    for m in masks:
        assert m[0, 0, 0, :8].sum() == 6 and torch.equal(m[0, 0, 0, :6], torch.ones(6, dtype=torch.bool))
        assert torch.equal(m[1, 0, 0, :8], key_mask[1, :8])


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the FlexAttention path itself (pytest -m gpu). In order of compile cost (scripts/benchmarks/gpu_sparse.sh
# runs them under a time limit): bf16 at the benchmark's shapes first (its kernels warm the compile cache for the
# benchmark), then fp32 at fixed shapes, random shapes, the whole model.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [1, 2])
@gpu
def test_gpu_flex_matches_kernel_bf16_cogview_shape(mode):
    """bf16 at CogView's shape (w=64, t=4, head_dim 64, 256 pivots), s=2048 with padding: FlexAttention against
    the kernel (itself checked against the reference above), outputs and gradients within bf16 rounding."""
    g = torch.Generator().manual_seed(mode)
    s, w, t, n = 2048, 64, 4, 256
    q, k, v = (torch.randn(2, 4, s, 64, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    pivots = torch.stack([torch.randperm(s, generator=g)[:n].sort().values for _ in range(2)]).cuda()
    key_mask = torch.ones(2, s, dtype=torch.bool, device="cuda")
    key_mask[1, :100] = False
    start, block, span, bias = geometry(mode, s, s, w, t, n)
    args = (q, k, v, start.cuda(), block, span, pivots, bias, key_mask, 0.125)
    grad = torch.randn(2, s, 4, 64, generator=g).cuda().bfloat16()
    results = []
    for backend in ("flex", "kernel"):
        out = sa.sparse_window_attention(*args, block_masks={}, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        scale = float(b.float().abs().max())
        assert_close(a.float(), b.float(), atol=2e-2 * scale, msg=f"mode {mode} {name} flex vs kernel")


@gpu
def test_gpu_flex_compiles_once_for_both_parts_and_new_data():
    """The mask function is one code object whatever the data: new pivots, padding and window starts of the same
    shapes do not recompile (each recompile costs seconds and torch stops compiling after a few)."""
    from torch._dynamo.utils import counters

    def call(seed):
        torch.manual_seed(seed)
        q, k, v = (torch.randn(1, 2, 512, 64, device="cuda", requires_grad=True) for _ in range(3))
        pivots = torch.randperm(512, device="cuda")[:40][None]
        key_mask = torch.rand(1, 512, device="cuda") > 0.1
        start, block, span, bias = geometry(1, 512, 512, 8, 2, 40)
        out = sa.sparse_window_attention(
            q, k, v, start.cuda(), block, span, pivots, bias, key_mask, 0.25, block_masks={}, backend="flex"
        )
        out.sum().backward()

    call(0)
    before = counters["stats"]["unique_graphs"]
    for seed in (1, 2, 3):
        call(seed)
    assert counters["stats"]["unique_graphs"] == before, "new data recompiled FlexAttention"


@pytest.mark.parametrize("seed", range(8))
@gpu
def test_gpu_flex_matches_dense_reference_fp32(seed):
    """Compiled FlexAttention (two parts), fp32, forward and gradients against the dense reference. Sequences long
    enough to span several tiles; head_dim 64 (CogView's; the other gpu tests share the compiled kernels)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    mode, w, t, q, k, v, pivots, key_mask = random_case(seed, max_blocks=60, device="cuda", head_dim=64)
    start, block, span, bias = geometry(mode, q.shape[2], k.shape[2], w, t, pivots.shape[1])
    out = sa.sparse_window_attention(
        q, k, v, start.cuda(), block, span, pivots, bias, key_mask, 64**-0.5, block_masks={}, backend="flex"
    )
    expected = reference_for(mode, w, t, q, k, v, pivots, key_mask)
    check_against_reference(out, expected, (q, k, v), 2e-4, f"flex mode {mode} w={w} t={t} Q={q.shape[2]}", seed)


@pytest.mark.parametrize("mode", [1, 2])
@gpu
def test_gpu_model_flex_equals_kernel(mode, monkeypatch):
    """The whole model on CUDA (fp32, 4 layers, sampled pivots per layer in mode 1): the FlexAttention path (block
    masks shared by the layers) gives the kernel's loss and gradients."""
    pytest.importorskip("transformers")
    from sparse_attention_repo import configuration_gpt2_sparse, modeling_gpt2_sparse

    torch.backends.cuda.matmul.allow_tf32 = False
    config = configuration_gpt2_sparse.GPT2SparseConfig(
        vocab_size=300, hidden_size=256, num_layers=4, num_attention_heads=4, max_position_embeddings=1024,
        hidden_dropout=0.0, attention_dropout=0.0, query_window=16, key_window_times=4, num_pivot=64,
        num_image_tokens=280, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = modeling_gpt2_sparse.GPT2SparseLMHeadModel(config).cuda()
    ids = torch.randint(0, 280, (2, 768), device="cuda")
    ids[:, :8] = 290  # text
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    losses, grads = [], []
    for min_queries in (sa._FLEX_MIN_QUERIES, 10**9):  # flex, then the kernel
        monkeypatch.setattr(sa, "_FLEX_MIN_QUERIES", min_queries)
        model.zero_grad()
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = model(ids, attention_mask=mask, labels=ids, is_sparse=mode, generator=gen, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.model.layers[0].attention.query_key_value.weight.grad.clone())
    assert_close(losses[0], losses[1], atol=1e-4, msg=f"mode {mode} loss")
    assert_close(grads[0], grads[1], atol=1e-4 * float(grads[1].abs().max()), msg=f"mode {mode} grad")
