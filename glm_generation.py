"""Generation for the GLM models of this repository: what `generate()` feeds each step, and ChatGLM-6B's chat API.

`GLMGenerationMixin`, a base class of `GLMForConditionalGeneration`, holds
- `generate()` with the prompt checked first, and `prepare_inputs_for_generation`: the tokens the cache has not
  seen with their 2-D positions and mask for the step, from the full sequence (transformers 4.57 and 5.x alike), or
  sliced from GLM's own generation inputs (`position_ids` [B, 2, L + G] and `generation_attention_mask` from GLM's
  tokenizer `build_inputs_for_generation`), which 5.x expands for beams along the wrong dimension (`to_batch`);
- ChatGLM-6B's `chat()` / `stream_chat()`. THUDM's own (modeling_chatglm.py) wrote their own decoding loop; here
  both are built on `generate()` (and `TextIteratorStreamer` for streaming), with ChatGLM-6B's prompt format
  (`[Round i]\n问：...\n答：...`), its response post-processing (full-width punctuation next to CJK text) and its
  guard against fp16 overflow (`InvalidScoreLogitsProcessor`); the tokenizer's `apply_chat_template` produces the
  same prompt.

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from threading import Thread

import torch
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from .configuration_glm import GLMConfig
from .glm_inputs import build_position_ids
from .model_checks import check_generate_inputs
from .transformers_compat import fixed_cache_size, generation_cache, is_fixed_size, pad_to_cache, step_tensor


class GLMGenerationMixin:
    """`generate()`'s step inputs, `chat()` and `stream_chat()` for a GLM generation model (needs `config`,
    `device`, `generation_config`, and `GenerationMixin` after it among the bases)."""

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with the prompt checked first: a clear error for ids that are not an integer
        [batch, seq] tensor, or a padding mask of another shape, instead of one from deep inside generate()."""
        # GLM's own generation inputs (3-D position_ids, a 4-D generation_attention_mask) may be right-padded
        glm_inputs = kwargs.get("generation_attention_mask") is not None or (
            isinstance(kwargs.get("position_ids"), torch.Tensor) and kwargs["position_ids"].dim() == 3
        )
        check_generate_inputs(inputs, kwargs, self.config.vocab_size, left_padding=not glm_inputs)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        generation_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> dict:
        """Feed the tokens the cache has not seen, with their 2-D positions and mask for this step.

        By default positions and the prefix-LM mask are rebuilt from the full sequence and the 2-D padding mask
        (generate()'s own 1-D `position_ids` are replaced). GLM's generation inputs, `position_ids` [B, 2, L + G]
        and `generation_attention_mask` [B, 1, L + G, L + G] as GLM's tokenizer `build_inputs_for_generation`
        returns them, are sliced to this step instead. Works on transformers 4.57 and 5.x alike: the new tokens
        are found from the cache length (not from `cache_position` / `next_sequence_length`), and GLM inputs that
        generate() expanded for beams / `num_return_sequences` along the wrong dimension (5.x treats 3-D
        `position_ids` as multimodal [3, B, L]) or not at all are brought back to one row per sequence. The cache
        comes as `past_key_values` or `cache` (5.24+, whose generate() refuses a user's cache the signature lacks).
        """
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            raise ValueError(
                "GLM generation needs input_ids (the blank and <sop> tokens drive the mask), not inputs_embeds"
            )
        past_key_values = generation_cache(self.config, past_key_values, dict(kwargs, cache=cache), fixed_size_ok=True)
        cache_length = int(past_key_values.get_seq_length()) if past_key_values is not None else 0  # static: 1 sync
        past_length = cache_length - (self.config.pre_seq_len or 0) if cache_length else 0
        batch_size, length = input_ids.shape
        glm_positions = position_ids if position_ids is not None and position_ids.dim() == 3 else None
        if glm_positions is not None or generation_attention_mask is not None:
            step_position_ids, step_mask = glm_generation_step(
                self.config, input_ids, past_length, glm_positions, generation_attention_mask, attention_mask
            )
        else:  # (right padding was refused by generate() itself, once)
            position_ids = build_position_ids(input_ids, attention_mask, self.config, validate=past_length == 0)
            step_position_ids, step_mask = position_ids[..., past_length:], attention_mask
        model_inputs = {  # fresh strides: slices of the growing sequence would make a compiled step trace again
            "input_ids": step_tensor(input_ids[:, past_length:]),
            "position_ids": step_tensor(step_position_ids),
            "past_key_values": past_key_values,
            "attention_mask": step_mask,
        }
        if is_fixed_size(past_key_values):  # the step's slots, and the mask over all of them: one shape per step
            model_inputs["cache_position"] = torch.arange(past_length, length, device=input_ids.device)
            model_inputs["attention_mask"] = pad_to_cache(step_mask, fixed_cache_size(past_key_values))
        skipped = {"cache_position", "next_sequence_length", "is_first_iteration", "labels"}
        model_inputs.update({k: v for k, v in kwargs.items() if k not in skipped and k not in model_inputs})
        return model_inputs

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """ChatGLM-6B's chat API: answer `query` given `history`; returns (response, history + [(query, response)])."""
        history = checked_history(query, history)
        inputs, gen_kwargs = self._chat_inputs(
            tokenizer, query, history, logits_processor, do_sample, top_p, temperature
        )
        length = _chat_length(self.generation_config, max_length, kwargs)
        output = self.generate(**inputs, **length, num_beams=num_beams, **gen_kwargs, **kwargs)
        response = process_response(
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """ChatGLM-6B's streaming chat: yields (response so far, history + [(query, response so far)])."""
        history = checked_history(query, history)
        inputs, gen_kwargs = self._chat_inputs(
            tokenizer, query, history, logits_processor, do_sample, top_p, temperature
        )
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run_generate() -> None:
            try:
                length = _chat_length(self.generation_config, max_length, kwargs)
                self.generate(**inputs, **length, streamer=streamer, **gen_kwargs, **kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = Thread(target=run_generate, daemon=True)
        thread.start()
        text, response = "", None
        for piece in streamer:
            text += piece
            if piece:
                response = process_response(text)
                yield response, history + [(query, response)]
        thread.join()
        if errors:
            raise errors[0]
        if response is None:  # an empty answer (e.g. <eop> first) still ends the stream with one reply
            yield "", history + [(query, "")]

    def _chat_inputs(
        self, tokenizer, query: str, history: list[tuple[str, str]], logits_processor, do_sample, top_p, temperature
    ) -> tuple[dict, dict]:
        """The encoded ChatGLM prompt, and generate() settings (sampling ones only when sampling)."""
        encoded = tokenizer([build_chat_prompt(query, history)], return_tensors="pt")
        inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in encoded}
        processors = LogitsProcessorList([InvalidScoreLogitsProcessor()])
        processors.extend(logits_processor or [])
        gen_kwargs = {"do_sample": do_sample, "logits_processor": processors}
        if do_sample:
            gen_kwargs.update(top_p=top_p, temperature=temperature)
        return inputs, gen_kwargs


def glm_generation_step(
    config: GLMConfig,
    input_ids: torch.Tensor,
    past_length: int,
    position_ids: torch.Tensor | None,
    generation_attention_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This step's slices of GLM's precomputed generation positions [B, 2, L + G] and mask [B, 1, L + G, L + G]
    (either may be absent: it is then built from the tokens)."""
    batch_size, length = input_ids.shape
    if generation_attention_mask is not None:
        mask = to_batch(generation_attention_mask, batch_size, "generation_attention_mask")
        if mask.dim() != 4 or mask.shape[-1] < length or mask.shape[-2] < length:
            raise ValueError(
                f"generation_attention_mask {list(generation_attention_mask.shape)} covers fewer than the "
                f"{length} tokens generated so far: build the inputs with max_gen_length >= max_new_tokens "
                "(tokenizer.build_inputs_for_generation(..., max_gen_length=...))"
            )
        step_mask = mask[:, :, past_length:length, :length]
    else:  # the 2-D padding mask; the model derives the prefix-LM mask from the block positions
        step_mask = attention_mask
    if position_ids is not None:
        positions = to_batch(position_ids, batch_size, "position_ids")
        if positions.shape[-1] < length:
            raise ValueError(
                f"position_ids {list(position_ids.shape)} cover fewer than the {length} tokens generated so "
                "far: build the inputs with max_gen_length >= max_new_tokens"
            )
        step_positions = positions[..., past_length:length]
    else:
        step_positions = build_position_ids(input_ids, None, config, validate=past_length == 0)
        step_positions = step_positions[..., past_length:]
    return step_positions, step_mask


def to_batch(tensor: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """GLM generation inputs with one row per prompt -> one row per generated sequence.

    transformers 4.57 expands them for beams / num_return_sequences itself (repeat_interleave on dim 0); 5.x
    takes a 3-D `position_ids` for multimodal [3, B, L] positions and repeats along dim 1, turning [B, 2, L] into
    [B, 2 * k, L]; some callers pass them unexpanded. All three come back as [B * k, ...] here.
    """
    rows = tensor.shape[0]
    if rows == batch_size:
        if name == "position_ids" and tensor.shape[1] != 2:
            raise ValueError(f"position_ids must have shape [batch, 2, seq], got {list(tensor.shape)}")
        return tensor
    if rows == 0 or batch_size % rows:
        raise ValueError(f"{name} has {rows} rows, which does not divide the {batch_size} sequences being generated")
    copies = batch_size // rows
    if name == "position_ids" and tensor.shape[1] == 2 * copies:  # transformers 5.x: repeated along dim 1
        tensor = tensor.unflatten(1, (2, copies))[:, :, 0]
    elif name == "position_ids" and tensor.shape[1] != 2:
        raise ValueError(f"position_ids must have shape [batch, 2, seq], got {list(tensor.shape)}")
    return tensor.repeat_interleave(copies, dim=0)


def checked_history(query, history) -> list[tuple[str, str]]:
    """`history` as a list of (query, response) string pairs; a TypeError naming `query` / `history` otherwise
    (a flat list of strings or a list of dicts would silently build a wrong prompt)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) string pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise TypeError(f"history[{i}] must be a (query, response) pair of strings, got {turn!r}")
    return [tuple(turn) for turn in history]


def _chat_length(generation_config, max_length: int, kwargs: dict) -> dict:
    """chat()'s `max_length` for generate(), unless a `max_new_tokens` is in force (passed, or in
    generation_config.json): generate() would follow that one anyway, and warn about both being set."""
    if kwargs.get("max_new_tokens") is not None or generation_config.max_new_tokens is not None:
        return {}
    return {"max_length": max_length}


def build_chat_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM-6B's multi-turn prompt: the bare query without history, else numbered rounds of 问/答."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def process_response(response: str) -> str:
    """ChatGLM-6B's post-processing: strip, fill the training-date placeholder, and make ASCII punctuation next
    to a CJK character full-width."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        response = re.sub(rf"({_CJK}){mark}", rf"\1{full_width}", response)
        response = re.sub(rf"{mark}({_CJK})", rf"{full_width}\1", response)
    return response


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """ChatGLM-6B's guard against fp16 overflow: NaN/+inf scores become a forced token 5 instead of a crash.

    Unlike THUDM's, -inf is left alone: generate()'s own processors (bad words, min length, ...) put it there.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
            scores = torch.zeros_like(scores)
            scores[..., 5] = 5e4
        return scores
