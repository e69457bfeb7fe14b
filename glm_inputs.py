"""How the GLM models of this repository read their inputs: GLM's 2-D blank-infilling positions, the prefix-LM
attention mask, and the input conventions of THUDM's GLM code that `modeling_glm.py` accepts as they are.

- `build_position_ids` and `build_attention_mask`: the (position, block position) ids and the boolean mask that
  make GLM a prefix LM (context bidirectional, span causal), built vectorised from the token ids and the 2-D
  padding mask;
- `read_attention_mask`: the one place that decides what an `attention_mask` means (a padding mask, an explicit
  4-D mask, or GLM's `sep` prefix length) and `build_sep_mask` for the last;
- GLM's generation inputs (`position_ids` [B, 2, L + G] and `generation_attention_mask` from GLM's tokenizer
  `build_inputs_for_generation`), sliced per generation step, and its multiple-choice inputs (`padded_choices`);
- the checks of these inputs, which raise a ValueError / TypeError naming the argument.

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .configuration_glm import GLMConfig
from .model_checks import check_prefix_length, check_static_cache, check_tensor, padding_mask
from .transformers_compat import fixed_cache_size


def first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 where there is none)."""
    return hits.to(torch.int32).argmax(dim=-1)


def build_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GLMConfig,
    validate: bool = True,
    require_span: bool = True,
) -> torch.Tensor:
    """2-D position ids [B, 2, S] for GLM blank infilling, without a loop over the batch.

    Row b reads: the context (everything before the first `<sop>`) has positions 0, 1, ... counted from the first
    real token (so left padding does not shift them) and block position 0; the span from `<sop>` on has the
    position of the blank and block positions 1, 2, ... The blank is, for ChatGLM, the first `[gMASK]`, else the
    first `[MASK]`/`[sMASK]` (THUDM's model); for GLM the first blank of any kind (GLM's tokenizer). Padding gets
    position 0. A row without `<sop>` is all context. `validate` raises a ValueError naming the rows without a
    `<sop>` (when `require_span`) or with a `<sop>` but no blank.
    """
    batch_size, seq_len = input_ids.shape
    is_gmask = input_ids == config.gmask_token_id
    is_short_blank = torch.zeros_like(is_gmask)
    for token_id in (config.mask_token_id, config.smask_token_id):
        if token_id is not None:
            is_short_blank |= input_ids == token_id
    if attention_mask is not None:  # a blank or <sop> id inside the padding is padding, not a blank / span start
        real = attention_mask.bool()
        is_gmask, is_short_blank = is_gmask & real, is_short_blank & real
    has_gmask = is_gmask.any(dim=-1)
    if config.variant == "chatglm":  # THUDM's ChatGLM model: [gMASK] wins over [MASK] wherever it is
        blank_index = torch.where(has_gmask, first_index(is_gmask), first_index(is_short_blank))  # [B]
    else:  # GLM's tokenizer: the first blank of any kind
        blank_index = first_index(is_gmask | is_short_blank)  # [B]
    is_sop = input_ids == config.bos_token_id
    if attention_mask is not None:
        is_sop = is_sop & real
    has_sop = is_sop.any(dim=-1)
    sop_index = torch.where(has_sop, first_index(is_sop), seq_len)  # [B]; seq_len: no span
    if validate:
        if require_span:
            _check_rows(
                has_sop,
                f"no <sop> token (bos_token_id {config.bos_token_id}) opening the span "
                "to generate; the tokenizer appends it (chatglm: `[gMASK] <sop>` at the end of every prompt; "
                "glm: tokenizer.build_inputs_for_generation)",
            )
        _check_rows(
            has_gmask | is_short_blank.any(dim=-1) | ~has_sop,
            "no blank token ([gMASK], [MASK] or [sMASK], ids "
            f"{config.gmask_token_id}, {config.mask_token_id}, {config.smask_token_id})",
        )

    if attention_mask is None:
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch_size, seq_len)
    else:
        positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # counted from the first real token
    token_index = torch.arange(seq_len, device=input_ids.device)
    in_span = token_index >= sop_index[:, None]  # [B, S]
    blank_position = positions.gather(1, blank_index[:, None])  # [B, 1]
    position_ids = torch.where(in_span, blank_position, positions)
    block_position_ids = (token_index - sop_index[:, None] + 1).clamp(min=0)
    return torch.stack((position_ids, block_position_ids), dim=1)


def _check_rows(row_ok: torch.Tensor, problem: str) -> None:
    if not bool(row_ok.all()):
        rows = torch.nonzero(~row_ok).flatten().tolist()  # error path only
        raise ValueError(f"input_ids row(s) {rows}: {problem}.")


def build_attention_mask(
    block_position_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    past_length: int,
    prefix_length: int = 0,
    cache_position: torch.Tensor | None = None,
    kv_length: int | None = None,
) -> torch.Tensor | None:
    """Boolean prefix-LM mask [B, 1, q, kv] (True = attend), or None when every query may see every key.

    Query i may see key j if j <= i (causal) or if j is a context token (block position 0): the context is
    bidirectional, the span causal. Cached keys are all earlier than the queries, so only the current chunk's
    block positions matter. `padding_mask` [B, kv] hides padding; `prefix_length` P-tuning keys are visible to
    everyone. A fixed-size (static) cache gives the queries' slots as `cache_position` [q] and its size as
    `kv_length` (`past_length` unused): its slots after a query, empty ones among them, are hidden causally.
    """
    batch_size, query_length = block_position_ids.shape
    if cache_position is None:
        if query_length == 1 and padding_mask is None:
            return None  # one new token at the end of the sequence sees everything
        cache_position = past_length + torch.arange(query_length, device=block_position_ids.device)
        kv_length = past_length + query_length
    kv_index = torch.arange(kv_length, device=block_position_ids.device)  # [kv]
    allowed = (kv_index[None, :] <= cache_position[:, None])[None]  # causal: [1, q, kv]
    if query_length > 1:  # the chunk's context keys, at their slots
        is_context_key = block_position_ids.new_zeros(batch_size, kv_length, dtype=torch.bool)
        is_context_key = is_context_key.index_copy(1, cache_position, block_position_ids == 0)  # [B, kv]
        allowed = allowed | is_context_key[:, None, :]
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, :]
    allowed = allowed.expand(batch_size, query_length, -1)
    if prefix_length:
        allowed = F.pad(allowed, (prefix_length, 0), value=True)
    return allowed[:, None]


def read_attention_mask(
    attention_mask, batch_size: int, query_length: int, kv_length: int, read: bool
) -> tuple[str | None, torch.Tensor | None]:
    """What `attention_mask` means, decided in this one place: (kind, tensor), kind one of
    - "padding": a 2-D [B, past + S] 0/1 mask, as bool (None: it masks nothing);
    - "explicit": a 4-D [B, 1, S, past + S] boolean / 0/1 mask (True = attend), as bool;
    - "sep": GLM's prefix-length convention (an int, a 1-element or a [B] tensor), as lengths [B];
    - None: no mask.
    Raises a ValueError / TypeError naming `attention_mask` for anything else. `read`: run the data-dependent
    checks (0/1 values, negative lengths); off on decode steps (`model_checks.reads_values`)."""
    if attention_mask is None:
        return None, None
    if isinstance(attention_mask, bool) or not isinstance(attention_mask, (int, torch.Tensor)):
        raise ValueError(
            f"attention_mask must be a tensor or GLM's prefix length (an int), got {type(attention_mask).__name__}"
        )
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() <= 1:
        return "sep", check_prefix_length(attention_mask, "attention_mask", batch_size, read).expand(batch_size)
    if attention_mask.dim() == 2 and attention_mask.shape == (batch_size, kv_length):
        return "padding", padding_mask(attention_mask, "attention_mask", (batch_size, kv_length), read, True)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be a [batch, past + seq] = [{batch_size}, {kv_length}] padding mask, a "
            f"4-D [batch, 1, seq, past + seq] mask or GLM's prefix length (an int or a [batch] tensor), got "
            f"{list(attention_mask.shape)}"
        )
    if attention_mask.shape[0] != batch_size or attention_mask.shape[2:] != (query_length, kv_length):
        raise ValueError(
            f"a 4-D attention_mask must have shape [batch, 1, q, past + q] = [{batch_size}, 1, "
            f"{query_length}, {kv_length}], got {list(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if read and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError(
                "a 4-D attention_mask must be boolean or hold 0/1 (True / 1 = attend); additive float "
                "masks are not accepted"
            )
        attention_mask = attention_mask.bool()
    return "explicit", attention_mask


def build_sep_mask(sep: torch.Tensor, query_length: int, past_length: int, prefix_length: int = 0) -> torch.Tensor:
    """Boolean mask [B, 1, q, kv] for GLM's `sep` convention: keys before `sep[b]` are seen by every query, the
    rest causally (GLM's `build_mask_matrix`; cached keys come first and are always visible)."""
    kv_index = torch.arange(past_length + query_length, device=sep.device)  # [kv]
    q_index = past_length + torch.arange(query_length, device=sep.device)  # [q]
    allowed = (kv_index[None, None, :] <= q_index[None, :, None]) | (kv_index[None, None, :] < sep[:, None, None])
    if prefix_length:
        allowed = F.pad(allowed, (prefix_length, 0), value=True)
    return allowed[:, None]


def check_position_ids(position_ids, shape: tuple[int, int], read: bool, table_size: int | None = None) -> torch.Tensor:
    """`position_ids` [B, 2, S] of an integer dtype, as long; with `table_size` (GLM's learned position tables
    have max_sequence_length + 1 rows) each within [0, table_size)."""
    check_tensor(position_ids, "position_ids", "integer positions [batch, 2, seq]")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    batch_size, query_length = shape
    if position_ids.shape != (batch_size, 2, query_length):
        raise ValueError(
            f"position_ids must have shape [batch, 2, seq] = [{batch_size}, 2, {query_length}] "
            f"(position ids, block position ids), got {list(position_ids.shape)}"
        )
    if table_size is not None and read:
        bad = (position_ids < 0) | (position_ids >= table_size)
        if bool(bad.any()):
            raise ValueError(
                f"position_ids must lie in [0, max_sequence_length={table_size - 1}] "
                f"(the rows of the position tables), got {int(position_ids[bad][0])}"
            )
    return position_ids.to(torch.long)


def positions_and_mask(
    config: GLMConfig,
    input_ids: torch.Tensor | None,
    attention_mask,
    position_ids: torch.Tensor | None,
    shape: tuple[int, int],
    read: bool,
    cache=None,
    past_length: int | None = 0,
    cache_position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 2-D positions [B, 2, S] (the caller's, checked, or built from `input_ids` and the padding) and the
    boolean prefix-LM mask [B, 1, S, P + past + S] every layer uses (None: every query sees every key), from
    whatever `attention_mask` is (`read_attention_mask`); P-tuning's P prefix keys are visible to every query.
    A fixed-size `cache` (`past_length` None) is masked over all its slots, the step's being `cache_position`."""
    batch_size, query_length = shape
    kv_length = fixed_cache_size(cache) if past_length is None else past_length + query_length
    kind, mask = read_attention_mask(attention_mask, batch_size, query_length, kv_length, read)
    if position_ids is not None:
        table_size = config.max_sequence_length + 1 if config.variant == "glm" else None  # learned tables
        position_ids = check_position_ids(position_ids, shape, read, table_size)
    elif input_ids is None:
        raise ValueError("with inputs_embeds, pass position_ids [batch, 2, seq] too (they are built from input_ids)")
    elif past_length is None or past_length > 0:
        cache = "a fixed-size cache" if past_length is None else f"a cache holding {past_length} tokens"
        raise ValueError(
            f"position_ids are needed to continue {cache}: pass "
            "model.get_position_ids(full_input_ids, full_attention_mask)[..., -new_length:] "
            "(generate() does this for you)."
        )
    else:  # GLM rows without <sop> are all context (classification / multiple-choice inputs)
        padding = mask if kind == "padding" else None
        position_ids = build_position_ids(input_ids, padding, config, require_span=config.variant == "chatglm")
    prefix_length = config.pre_seq_len or 0
    if kind == "sep":
        if past_length is None:
            raise ValueError("GLM's `sep` attention_mask needs a dynamic cache; pass a padding mask with a static one")
        return position_ids, build_sep_mask(mask, query_length, past_length, prefix_length)
    if kind == "explicit":
        # A query row that may see nothing (a padding row of GLM's right-padded masks) attends everywhere: its
        # output is meaningless either way (the references average all values there), but sdpa would give
        # NaN, and NaN values of a padding position poison every query through 0 * NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        return position_ids, F.pad(mask, (prefix_length, 0), value=True) if prefix_length else mask
    block_position_ids = position_ids[:, 1]
    return position_ids, build_attention_mask(
        block_position_ids, mask, past_length or 0, prefix_length, cache_position, kv_length
    )


def check_fixed_size_cache(cache, cache_position: torch.Tensor | None, config: GLMConfig) -> None:
    """A fixed-size cache (`StaticCache`) the model can fill (`model_checks.check_static_cache`), and no P-tuning
    prefix (it would need slots of its own)."""
    check_static_cache(cache, cache_position, config.max_sequence_length, "max_sequence_length")
    if config.pre_seq_len:
        raise ValueError(
            f"P-tuning (pre_seq_len={config.pre_seq_len}) needs the default dynamic cache, not a {type(cache).__name__}"
        )


def flatten_choices(input_ids, inputs_embeds, position_ids, attention_mask) -> tuple[int | None, tuple]:
    """Inputs of C choices per example ([B, C, S] ids or [B, C, S, h] embeddings, masks and positions shaped alike)
    as B * C sequences, and C (None, and the inputs unchanged, for plain [B, S] inputs)."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or tokens.dim() != (3 if input_ids is not None else 4):
        return None, (input_ids, inputs_embeds, position_ids, attention_mask)
    input_ids, inputs_embeds, position_ids = (
        t.flatten(0, 1) if t is not None else None for t in (input_ids, inputs_embeds, position_ids)
    )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() >= 2:
        attention_mask = attention_mask.flatten(0, 1)
    return tokens.shape[1], (input_ids, inputs_embeds, position_ids, attention_mask)


def padded_choices(choice_ids, choice_indices, batch_size: int, device: torch.device):
    """`choice_ids` / `choice_indices` as LongTensors [B, C, T] (ids padded with -100), from GLM's nested lists of
    1-D tensors or from tensors already padded."""
    if isinstance(choice_ids, torch.Tensor) and isinstance(choice_indices, torch.Tensor):
        if choice_ids.dim() != 3 or choice_ids.shape != choice_indices.shape or choice_ids.shape[0] != batch_size:
            raise ValueError(
                f"padded choice_ids and choice_indices must both be [batch={batch_size}, choices, tokens], got "
                f"{list(choice_ids.shape)} and {list(choice_indices.shape)}"
            )
        return choice_ids.to(device, torch.long), choice_indices.to(device, torch.long)
    if len(choice_ids) != batch_size or len(choice_indices) != batch_size:
        raise ValueError(f"choice_ids and choice_indices need one entry per example ({batch_size})")
    num_choices = {len(c) for c in choice_ids} | {len(c) for c in choice_indices}
    if len(num_choices) != 1:
        raise ValueError("every example needs the same number of choices (and of choice_indices entries)")
    rows = [
        (torch.as_tensor(i).reshape(-1), torch.as_tensor(x).reshape(-1))
        for c, n in zip(choice_ids, choice_indices)
        for i, x in zip(c, n)
    ]
    if any(len(i) != len(x) for i, x in rows):
        raise ValueError("each choice needs as many choice_indices as choice_ids")
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), -100, dtype=torch.long)
    index = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (i, x) in enumerate(rows):
        ids[row, : len(i)], index[row, : len(x)] = i, x
    shape = (batch_size, num_choices.pop(), width)
    return ids.view(shape).to(device), index.view(shape).to(device)


def refuse_mems(kwargs: dict) -> None:
    if kwargs.get("mems") is not None:
        raise ValueError(
            "mems (GLM's cache of hidden states) is not supported: this model keeps a key/value cache in "
            "past_key_values (a transformers DynamicCache, which generate() manages)"
        )
