"""The argument checks of `GLMTokenizer`'s public entries (tokenization_glm.py): what `__call__`, `decode`,
`batch_decode`, `apply_chat_template`, `build_inputs_for_generation` and `build_inputs_for_multiple_choice` accept.

Ambiguous input is refused with a TypeError/ValueError naming the argument and showing (a short repr of) what was
given, never guessed at: transformers releases differ in what they make of it (ids given as text, bools as ids,
triply nested batches), so the tokenizer decides here, the same way on every version.

Named `tokenization_glm_checks` after model_checks.py (the models' input checks) and to sort beside
tokenization_glm.py; plain Python, no transformers. A sibling module of the tokenizer: transformers' remote-code
loader and `save_pretrained` copy it with tokenization_glm.py (it is imported relatively).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any


def shown(value: Any) -> str:
    """`value` as the error messages show it: its type and a shortened repr."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def is_id(value: Any) -> bool:
    """A token id: an int, but not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_strs(value: Any) -> bool:
    """A list or tuple of str (empty included)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def check_text(value: Any, name: str) -> None:
    """`text` / `text_pair` of `__call__`: a str, a batch of str, or a batch of lists of str (pre-split words or
    pairs). Ids (ints), bytes, None inside a batch and deeper nesting are refused: versions differ in what they
    make of them (5.x takes a list of ints as ids and a triply nested list as a batch)."""
    if isinstance(value, str) or is_strs(value):
        return
    if isinstance(value, (list, tuple)) and value and all(is_strs(v) for v in value):
        return
    raise TypeError(
        f"{name} must be a str, a list of str (a batch) or a list of lists of str (pre-split words or pairs), "
        f"got {shown(value)}"
    )


def _plain(value: Any) -> Any:
    """Tensors and arrays (and their scalars) as Python lists and numbers; lists element by element. (transformers'
    `to_py_obj` is not used: 4.57's turns [True, 5] into [1, 5] through numpy.)"""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def token_id_rows(token_ids: Any, name: str, is_item=is_id) -> tuple[list[list[int]], bool]:
    """Ids (an int, a sequence, a batch of sequences; lists, tensors or arrays) as rows of Python ints, and whether
    a batch was given. Anything else, a float or a bool among them, is a TypeError naming `name`."""
    values = _plain(token_ids)
    if is_item(values):
        return [[values]], False
    if isinstance(values, (list, tuple)) and all(is_item(v) for v in values):
        return [list(values)], False
    if isinstance(values, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in values):
        if all(is_item(v) for r in values for v in r):
            return [list(r) for r in values], True
    items = values if isinstance(values, (list, tuple)) else [values]
    items = [w for v in items for w in (v if isinstance(v, (list, tuple)) else [v])]
    bad = next((v for v in items if not is_item(v)), values)
    raise TypeError(
        f"{name} must hold integer token ids (an int, a list, a batch of lists, a tensor), got {shown(token_ids)}"
        + (f" holding {shown(bad)}" if bad is not values else "")
    )


def check_conversation(conversation: Any) -> None:
    """A chat: a list of {"role": str, "content": str} messages, or a batch (list) of such lists."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"conversation must be a list of messages (dicts), got {shown(conversation)}")
    batched = bool(conversation) and all(isinstance(c, (list, tuple)) for c in conversation)
    for chat in conversation if batched else [conversation]:
        for i, message in enumerate(chat):
            if not isinstance(message, Mapping):
                raise TypeError(f"conversation[{i}] must be a dict with 'role' and 'content', got {shown(message)}")
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise TypeError(
                    f"conversation[{i}] needs a str 'role' and a str 'content', got {reprlib.repr(message)}"
                )


def check_int(value: Any, name: str, minimum: int) -> None:
    """An int argument (not a bool) of at least `minimum`: a TypeError or ValueError naming `name` otherwise."""
    if not is_id(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {shown(value)}")
    if value < minimum:
        raise ValueError(f"{name}={value}: expected an int >= {minimum}")
