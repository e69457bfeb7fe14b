"""Evaluate GLM checkpoints with lm-evaluation-harness (lm-eval), the way GLM reads and writes text.

    python scripts/evaluate.py --model glm --model_args pretrained=PATH,dtype=bfloat16 \\
        --tasks lambada_openai,hellaswag --batch_size 8 [--device cuda:0] [--limit N] [--output_path out/]

The command line is lm-eval's own (`lm_eval --help`): this script registers one more model class, `glm`, and
hands over to lm-eval's CLI. `--model hf` and every other lm-eval model keep working (BART-gen and sparse GPT-2
need no class of their own: `--model hf --model_args pretrained=PATH,trust_remote_code=True,backend=seq2seq` or
`backend=causal`).

Why GLM needs its own class: GLM is a prefix LM that fills a blank. A prompt is `context [gMASK] <sop>` (the
context read bidirectionally) and the answer is generated causally after `<sop>`, ending with `<eop>`. lm-eval's
`hf` class instead scores `context + continuation` as one causal text and slices it, so GLM's `[gMASK] <sop>`
lands after the answer (multiple-choice scores at chance), and it stops generation at the decoded EOS string,
which for some GLM tokenizers is '' (every generation stops after one token).

What the `glm` class computes (P = the tokenizer's generation inputs for the context, ending with `<sop>`):
- loglikelihood(context, continuation): log p(continuation | context) with the continuation as the span,
  `P + continuation[:-1]` in one forward pass; is_greedy: every continuation token is the argmax. No `<eop>` is
  scored (the continuation may be a prefix of the answer). Batched with left padding.
- loglikelihood_rolling(text): the text is cut into windows of `rolling_window` tokens (model_args; default half
  the model's `max_sequence_length`); each window is scored as the [gMASK] span whose context is the text
  before it (as much as fits, the first window has none). Every token is scored once; the windows do not depend
  on each other or on the batch size.
- generate_until(context, gen_kwargs): greedy `generate()` from P, stopping at `<eop>` (passed by id, so it does
  not depend on how the tokenizer decodes it) or after `max_gen_toks` tokens; the text is cut at the first of
  the task's `until` strings.

How P is built (`blank` model arg): a context that already holds a blank ([MASK], [sMASK] or [gMASK]) is used
as it is (the model fills that blank); otherwise `blank` is appended: `gMASK` (default, "generate the rest") or
`MASK` ("fill a short span", GLM's LAMBADA setting). Then the tokenizer adds what it always adds (chatglm:
`[gMASK] <sop>` at the end, so `blank=MASK` gives `context [MASK] [gMASK] <sop>`, where ChatGLM-6B's model fills
the [MASK]; glm: `[CLS] context [blank] <|endoftext|> <sop>`). A context longer than the model allows is cut
from the left.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

BLANKS = ("gMASK", "MASK")


def _as_int(name: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or str(number) != str(value).strip():
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return number


@register_model("glm")
class GLMEvalLM(LM):
    """lm-eval model class for GLM checkpoints (`config.model_type == "glm_infill"`, variants chatglm and glm).

    model_args: `pretrained` (folder or Hub id), `dtype` (auto, float32, bfloat16, float16), `blank` (gMASK or
    MASK: the blank appended to a context that has none), `max_gen_toks` (default for generate_until when the
    task names none), `rolling_window` (tokens per loglikelihood_rolling window), `revision`,
    `attn_implementation`; from lm-eval's flags: `batch_size`, `device`.
    """

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        blank: str = "gMASK",
        max_gen_toks: int = 256,
        rolling_window: int | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = True,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lm-eval passes it; batches here have a fixed size
        device: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if blank not in BLANKS:
            raise ValueError(f"blank={blank!r}: expected one of {', '.join(BLANKS)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the glm model class: give a number, e.g. 8")
        self.batch_size = _as_int("batch_size", batch_size)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = {"trust_remote_code": bool(trust_remote_code), "revision": revision}
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, **load)
        model_kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, **load, **model_kwargs).to(self._device).eval()
        config = self.model.config
        if getattr(config, "model_type", None) != "glm_infill":
            raise ValueError(
                f"{pretrained} is a {config.model_type!r} model, not GLM (glm_infill): use --model hf for it "
                "(backend=seq2seq for BART-gen, backend=causal for sparse GPT-2)"
            )
        tok = self.tokenizer
        self.max_length = int(config.max_sequence_length)
        self.rolling_window = _as_int("rolling_window", rolling_window or self.max_length // 2)
        self.gmask_id = tok.gmask_token_id
        self.blank_id = tok.gmask_token_id if blank == "gMASK" else tok.mask_token_id
        self.blank_ids = set(tok.mask_token_ids)
        self.sop_id, self.pad_id = tok.sop_token_id, tok.pad_token_id
        self.stop_ids = sorted({tok.eop_token_id, *_ids(config.eos_token_id)})
        # what the tokenizer adds around a text: chatglm `[gMASK] <sop>` after it, glm `[CLS] ... <|endoftext|>`
        self.tokenizer_adds_gmask = tok.gmask_token_id in tok.build_inputs_with_special_tokens([])
        if self.rolling_window > self.max_length - len(self.span_prefix([], self.gmask_id)):
            raise ValueError(
                f"rolling_window={self.rolling_window}: expected at most the model's max_sequence_length "
                f"({self.max_length}) minus the special tokens"
            )

    # ------------------------------------------------------------------ inputs
    def span_prefix(self, context_ids: list[int], blank_id: int | None = None) -> list[int]:
        """The tokenizer's generation inputs for `context_ids` plus `blank_id` (unless they hold a blank, or the
        tokenizer appends [gMASK] itself and that is the blank asked for); they end with `<sop>`."""
        blank_id = self.blank_id if blank_id is None else blank_id
        ids = list(context_ids)
        if not self.blank_ids.intersection(ids) and not (self.tokenizer_adds_gmask and blank_id == self.gmask_id):
            ids.append(blank_id)
        ids = self.tokenizer.build_inputs_with_special_tokens(ids)
        return ids if ids[-1] == self.sop_id else ids + [self.sop_id]

    def fitted_prefix(self, context: str | list[int], room: int, blank_id: int | None = None) -> list[int]:
        """span_prefix of the context, its oldest tokens dropped until `room` span tokens fit in max_sequence_length."""
        ids = self.encode(context) if isinstance(context, str) else list(context)
        while True:
            prefix = self.span_prefix(ids, blank_id)
            excess = len(prefix) + room - self.max_length
            if excess <= 0:
                return prefix
            if not ids:
                raise ValueError(f"{room} span tokens do not fit in max_sequence_length {self.max_length}")
            ids = ids[excess:]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_spans(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        """(log p(span | prefix), span is greedy) for each (prefix ending with <sop>, span) pair, in batches."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=not desc or self.rank != 0):
            rows = [i for i in order[start : start + self.batch_size] if pairs[i][1]]
            if not rows:
                continue
            seqs = [pairs[i][0] + pairs[i][1][:-1] for i in rows]
            input_ids, attention_mask = self._left_pad(seqs)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            width = input_ids.shape[1]
            for row, i in enumerate(rows):
                span = pairs[i][1]
                first = width - len(span)  # logits at [first, width) predict the span's tokens
                step = logprobs[row, first:width]  # [len(span), V]
                target = torch.tensor(span, device=step.device)
                total = step.gather(1, target[:, None]).sum().item()
                greedy = bool((step.argmax(dim=-1) == target).all())
                results[i] = (total, greedy)
        return results

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        ids = [[self.pad_id] * (width - len(s)) + s for s in seqs]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
        return (torch.tensor(ids, device=self._device), torch.tensor(mask, device=self._device))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            span = self.encode(continuation)
            pairs.append((self.fitted_prefix(context, len(span)), span))
        results = self.score_spans(pairs, desc="" if disable_tqdm else "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(prefix, span) per window of `text`: spans of `rolling_window` tokens, each the [gMASK] span after the
        text before it (as much of it as fits)."""
        ids = self.encode(text)
        windows = []
        for start in range(0, len(ids), self.rolling_window):
            span = ids[start : start + self.rolling_window]
            windows.append((self.fitted_prefix(ids[:start], len(span), self.gmask_id), span))
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            for window in self.rolling_windows(text):
                windows.append(window)
                owner.append(index)
        scores = self.score_spans(windows, desc="" if disable_tqdm else "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = _as_int(
                "max_gen_toks", kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks))
            )
            kwargs.setdefault("do_sample", False)
            if not kwargs["do_sample"]:
                for key in ("temperature", "top_p", "top_k"):
                    kwargs.pop(key, None)
            prefixes = {i: self.fitted_prefix(requests[i].args[0], max_new) for i in indices}
            order = sorted(indices, key=lambda i: -len(prefixes[i]))
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                input_ids, attention_mask = self._left_pad([prefixes[i] for i in rows])
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_id,
                    **kwargs,
                )
                for i, new in zip(rows, out[:, input_ids.shape[1] :].tolist()):
                    results[i] = _cut(self.decode_span(new), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(rows))
        bar.close()
        return results

    def decode_span(self, ids: list[int]) -> str:
        """The generated span's text: up to the first stop id (`<eop>`), special tokens dropped."""
        stop = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:stop], skip_special_tokens=True)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype)}


def _ids(value) -> Iterable[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    if len(sys.argv) == 1:
        sys.argv.append("--help")
    cli_evaluate()


if __name__ == "__main__":
    main()
