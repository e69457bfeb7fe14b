"""ChatGLM-6B's chat API for the GLM models of this repository: `model.chat()` and `model.stream_chat()`.

ChatGLM-6B's own `chat`/`stream_chat` (THUDM's modeling_chatglm.py) wrote their own decoding loop; here both are
built on `generate()` (and `TextIteratorStreamer` for streaming), with ChatGLM-6B's prompt format
(`[Round i]\n问：...\n答：...`), its response post-processing (full-width punctuation next to CJK text) and its
guard against fp16 overflow (`InvalidScoreLogitsProcessor`). `GLMChatMixin` is a base class of
`GLMForConditionalGeneration`; the tokenizer's `apply_chat_template` produces the same prompt.

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from threading import Thread

import torch
from transformers.generation import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer


class GLMChatMixin:
    """`chat()` and `stream_chat()` for a GLM generation model (needs `generate`, `device`, `generation_config`)."""

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
