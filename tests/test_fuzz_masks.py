"""Property-based fuzzing of the mask and position builders against plain-loop reference formulations.

GLM: rows with blanks anywhere (several kinds, several of each, inside the span too), `<sop>` and blank ids inside the
left padding (which must be ignored), random batch shapes, a cache split at a random point and a P-tuning prefix,
for both variants. Sparse GPT-2: the dense mode-0 mask with a per-row bidirectional prefix, padding and a cache;
pivot sampling. BART: the decoder's causal self-attention mask with padding and a cache. Each reference is written
from the rules stated in the models' docstrings, one row and one (query, key) pair at a time.
(tests/test_glm_model.py already checks THUDM's layout of one blank right before `<sop>`; the sparse attention
kernels are checked against a dense masked reference in tests/test_gpt2_sparse.py.)
"""

from __future__ import annotations

import torch
from fixtures import (
    GLM_VARIANTS,
    GMASK,
    MASK,
    PAD,
    SMASK,
    SOP,
    bart_config,
    glm_config,
    repo_module,
    sparse_config,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=40, deadline=None)
BLANKS = (GMASK, MASK, SMASK)
WORD = st.integers(5, 100)


# ---------------------------------------------------------------------------------------------------------------- GLM
@st.composite
def glm_rows(draw):
    """Left-padded rows: context with >= 1 blank anywhere, <sop>, a span that may hold blanks and <sop> ids again,
    and padding whose ids may be blanks or <sop>."""
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        context = draw(st.lists(st.one_of(WORD, st.sampled_from(BLANKS)), min_size=0, max_size=7))
        context.insert(draw(st.integers(0, len(context))), draw(st.sampled_from(BLANKS)))
        span = draw(st.lists(st.one_of(WORD, st.sampled_from((*BLANKS, SOP))), max_size=4))
        rows.append(context + [SOP] + span)
    width = max(map(len, rows)) + draw(st.integers(0, 2))
    padded, masks = [], []
    for row in rows:
        pad = width - len(row)
        padded.append(draw(st.lists(st.sampled_from((PAD, SOP, *BLANKS, 7)), min_size=pad, max_size=pad)) + row)
        masks.append([0] * pad + [1] * len(row))
    return torch.tensor(padded), torch.tensor(masks)


def glm_reference(ids: list[int], real: list[int], variant: str):
    """Positions, block positions and the prefix-LM mask of one left-padded row, by the stated rules."""
    n = len(ids)
    first = real.index(1)
    tokens = ids[first:]  # the padding is never a blank nor <sop>, whatever its ids
    sop = tokens.index(SOP)
    if variant == "chatglm" and GMASK in tokens:  # ChatGLM: the first [gMASK] wins, else the first [MASK]/[sMASK]
        blank = tokens.index(GMASK)
    else:
        blank = next(i for i, t in enumerate(tokens) if t in (BLANKS if variant == "glm" else (MASK, SMASK)))
    positions = [0] * first + [i if i < sop else blank for i in range(len(tokens))]
    blocks = [0] * first + [0 if i < sop else i - sop + 1 for i in range(len(tokens))]
    mask = [[real[k] == 1 and (k <= q or blocks[k] == 0) for k in range(n)] for q in range(n)]
    return positions, blocks, mask


@FUZZ
@given(batch=glm_rows(), variant=st.sampled_from(GLM_VARIANTS), split=st.floats(0, 1), prefix=st.integers(0, 3))
@example(batch=(torch.tensor([[GMASK, SOP]]), torch.tensor([[1, 1]])), variant="glm", split=0.0, prefix=3)
def test_glm_positions_and_mask_match_the_rules(batch, variant, split, prefix):
    ids, attention_mask = batch
    modeling = repo_module("glm_inputs")
    position_ids = modeling.build_position_ids(ids, attention_mask, glm_config(variant=variant))
    full = modeling.build_attention_mask(position_ids[:, 1], attention_mask, past_length=0)
    for b in range(ids.shape[0]):
        positions, blocks, mask = glm_reference(ids[b].tolist(), attention_mask[b].tolist(), variant)
        assert position_ids[b, 0].tolist() == positions, f"row {b} positions"
        assert position_ids[b, 1].tolist() == blocks, f"row {b} block positions"
        assert full[b, 0].tolist() == mask, f"row {b} mask"

    # The same rows continued from a cache holding the first `past` tokens, with a P-tuning prefix in front.
    past = int(split * (ids.shape[1] - 1))
    chunk = modeling.build_attention_mask(position_ids[:, 1, past:], attention_mask, past, prefix_length=prefix)
    prefix_columns = torch.ones(*full.shape[:-1], prefix, dtype=torch.bool)
    expected = torch.cat([prefix_columns, full], dim=-1)[:, :, past:]
    assert torch.equal(chunk if chunk is not None else torch.ones_like(expected), expected)


@FUZZ
@given(
    sep=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    query=st.integers(1, 6),
    past=st.integers(0, 4),
    prefix=st.integers(0, 2),
)
def test_glm_sep_mask_matches_the_rule(sep, query, past, prefix):
    """GLM's `sep` convention: keys before sep[b] are seen by every query, the rest causally (cache included)."""
    mask = repo_module("glm_inputs").build_sep_mask(torch.tensor(sep), query, past, prefix_length=prefix)
    for b, s in enumerate(sep):
        for q in range(query):
            row = [True] * prefix + [k < s or k <= past + q for k in range(past + query)]
            assert mask[b, 0, q].tolist() == row


def test_glm_reference_sees_through_the_padding_ids():
    """The fuzzed padding holds blank and <sop> ids: without a 2-D mask they would be read as real tokens."""
    modeling = repo_module("glm_inputs")
    ids, mask = torch.tensor([[SOP, GMASK, 5, MASK, 6, SOP, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    positions = modeling.build_position_ids(ids, mask, glm_config())
    assert positions.tolist() == [[[0, 0, 0, 1, 2, 1, 1], [0, 0, 0, 0, 0, 1, 2]]]


# ------------------------------------------------------------------------------------------------------- sparse GPT-2
@FUZZ
@given(
    batch=st.integers(1, 3),
    query=st.integers(1, 6),
    past=st.integers(0, 5),
    sep=st.one_of(st.none(), st.integers(0, 7), st.lists(st.integers(0, 7), min_size=3, max_size=3)),
    data=st.data(),
)
def test_sparse_dense_mask_matches_the_rule(batch, query, past, sep, data):
    """Mode 0: causal, plus the first `sep` tokens of the call visible to all of its queries, minus padded keys (a
    padded query keeps its own key so that its discarded row stays finite)."""
    model = repo_module("modeling_gpt2_sparse").GPT2SparseModel(sparse_config(num_layers=1))
    model.config._attn_implementation = "eager"
    sep_value = torch.tensor(sep[:batch]) if isinstance(sep, list) else sep
    seps = [0 if sep is None else (sep[b] if isinstance(sep, list) else sep) for b in range(batch)]
    keys = past + query
    padding = data.draw(st.lists(st.lists(st.booleans(), min_size=keys, max_size=keys), min_size=batch, max_size=batch))
    key_mask = torch.tensor(padding) if not all(map(all, padding)) else None
    slots = torch.arange(past, keys)
    mask = model._dense_mask(slots, keys, past, key_mask, sep_value)
    for b in range(batch):
        for q in range(query):
            qa = past + q
            row = [
                (k <= qa or k < past + seps[b]) and (key_mask is None or padding[b][k] or k == qa) for k in range(keys)
            ]
            assert mask[min(b, mask.shape[0] - 1), 0, q].tolist() == row, (b, q)


@FUZZ
@given(
    kinds=st.lists(st.lists(st.sampled_from("tip"), min_size=12, max_size=12), min_size=1, max_size=3), data=st.data()
)
def test_sparse_pivots_are_all_text_plus_distinct_images(kinds, data):
    """Pivots: every text position, then distinct image positions, never padding, sorted, `num_pivots` per row."""
    is_text = torch.tensor([[c == "t" for c in row] for row in kinds])
    is_image = torch.tensor([[c == "i" for c in row] for row in kinds])
    low = int(is_text.sum(-1).max())
    high = int((is_text | is_image).sum(-1).min())
    if low > high or high == 0:
        return
    n = data.draw(st.integers(max(low, 1), high))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    pivots = repo_module("sparse_attention").sample_pivots(is_text, is_image, n, generator)
    for b, row in enumerate(pivots.tolist()):
        assert row == sorted(set(row)) and len(row) == n
        assert set(torch.nonzero(is_text[b]).flatten().tolist()) <= set(row)
        assert all(is_text[b, i] or is_image[b, i] for i in row)


# --------------------------------------------------------------------------------------------------------------- BART
@FUZZ
@given(batch=st.integers(1, 3), new=st.integers(1, 5), past=st.integers(0, 5), data=st.data())
def test_bart_decoder_mask_matches_the_rule(batch, new, past, data):
    """Decoder self-attention: key k is visible to the query at absolute position q when k <= q and k is not
    padding."""
    decoder = repo_module("modeling_bart_gen").BartGenDecoder(bart_config(decoder_layers=1))
    decoder.config._attn_implementation = "sdpa"  # boolean masks (eager gets the same rule as an additive mask)
    keys = past + new
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=keys, max_size=keys), min_size=batch, max_size=batch))
    rows = [row[:-1] + [True] for row in rows]  # a row keeps at least one real token
    mask = decoder._self_attention_mask(torch.tensor(rows).long(), torch.arange(past, keys), keys, past, torch.float32)
    for b in range(batch):
        for q in range(new):
            expected = [k <= past + q and rows[b][k] for k in range(keys)]
            got = (
                mask[b if mask.shape[0] > 1 else 0, 0, q].tolist()
                if mask is not None
                else [k <= past + q for k in range(keys)]
            )
            assert got == expected, (b, q)
