"""The main job: load the repository root through the Auto classes and fill blanks with the embedded model.

Run by the README's first command (`bash scripts/main.sh`, which calls `python scripts/demo.py "$@"`). In a
fresh process it loads the root with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(root,
trust_remote_code=True)` and prints what it loaded, then fills blanks a reader can check: a `[MASK]` inside a
sentence, a `[gMASK]` at the end, a batch of prompts of different lengths generated together (left-padded),
beam search with its alternatives, the accuracy on the held-out questions of `scripts/make_corpus.py` (facts
in phrasings never trained on, sums of operand pairs never seen) and the decoding speed.

    python scripts/demo.py [--prompt "The capital of [MASK] is Paris."]... [--model DIR] [--eval-limit N]

The embedded default model is a small ChatGLM-6B-architecture GLM trained by `scripts/train_default.py`.
While the root has no `model.safetensors` this script says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent

EXAMPLES_MASK = ["The capital of [MASK] is Paris.", "[MASK]的首都是东京。", "The chemical symbol for Gold is [MASK]."]
EXAMPLES_GMASK = ["The capital of Italy is [gMASK]", "27 plus 15 equals [gMASK]", "法国的首都是[gMASK]"]
EXAMPLES_BATCH = [
    "Mars is the [MASK] planet from the Sun.",
    "8加5等于[MASK]。",
    "The opposite of hot is [MASK].",
    "In chemistry, Fe stands for [MASK].",
    "58 minus 21 equals [MASK].",
]
EXAMPLE_BEAM = "The capital of [MASK] is Berlin."


def fill_blanks(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, **generate_kwargs) -> list[str]:
    """Generate the span for the blank of each prompt (one batch, left-padded); return the decoded spans.

    The tokenizer appends `[gMASK] <sop>` (ChatGLM-6B's convention); generation stops at `<eop>`.
    """
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


def heldout_accuracy(
    model, tokenizer, items, batch_size: int = 128, progress: bool = True, max_new_tokens: int = 8
) -> dict:
    """Exact-match accuracy of greedy fills on held-out items (make_corpus.Item), per kind ("fact", "arith").

    Returns {"fact": (correct, total), "arith": (correct, total), "errors": [(item, got)], "tokens": n,
    "seconds": s}.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))  # similar lengths batch together
    result: dict = {"fact": [0, 0], "arith": [0, 0], "errors": [], "tokens": 0, "seconds": 0.0}
    bar = tqdm(total=len(items), desc="held-out questions", unit="q", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = [items[i] for i in order[start : start + batch_size]]
        t0 = time.perf_counter()
        answers = fill_blanks(model, tokenizer, [it.prompt for it in batch], max_new_tokens=max_new_tokens)
        result["seconds"] += time.perf_counter() - t0
        for item, got in zip(batch, answers):
            result["tokens"] += len(tokenizer.encode(got, add_special_tokens=False)) + 1  # + <eop>
            ok = got == item.answer
            result[item.kind][0] += ok
            result[item.kind][1] += 1
            if not ok:
                result["errors"].append((item, got))
        bar.update(len(batch))
        bar.set_postfix(fact=_pct(*result["fact"]), arith=_pct(*result["arith"]))
    bar.close()
    result["fact"], result["arith"] = tuple(result["fact"]), tuple(result["arith"])
    return result


def _pct(correct: int, total: int) -> str:
    return f"{100.0 * correct / total:.1f}%" if total else "-"


def select_items(items, limit: int | None):
    """A deterministic spread-out sample of `limit` items (all when None)."""
    if limit is None or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def decode_speed(model, tokenizer, new_tokens: int = 32) -> float:
    """Tokens per second generating `new_tokens` tokens for one prompt (greedy, with the cache)."""
    import torch

    enc = tokenizer(["The capital of France is [gMASK]"], return_tensors="pt")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(**enc, **kwargs)
    return new_tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fill blanks with the embedded default GLM model.")
    parser.add_argument("--model", type=Path, default=ROOT, help="folder to load (default: the repository root)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt with [MASK], [sMASK] or [gMASK]")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate this many held-out items (default all)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed the model's corpus was built with")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out accuracy")
    args = parser.parse_args(argv)

    if not (args.model / "model.safetensors").is_file():
        print(
            f"No embedded model yet: {args.model} has no model.safetensors (it is trained by "
            "scripts/train_default.py and committed once it meets its accuracy targets), so there is nothing to run."
        )
        return 0

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    model.eval()
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"== Loaded {args.model} in {time.perf_counter() - t0:.1f}s (AutoModelForCausalLM, trust_remote_code=True)")
    print(f"   model      {type(model).__name__} ({config.model_type}, variant {config.variant!r})")
    print(
        f"   size       {n_params / 1e6:.2f}M parameters: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}"
    )
    print(f"   dtype      {model.dtype}, attention {config._attn_implementation}")
    print(f"   tokenizer  {type(tokenizer).__name__} (flavour {getattr(tokenizer, 'flavour', '?')!r})")
    print(f"   versions   transformers {transformers.__version__}, torch {torch.__version__}")

    def show(prompts: list[str], **kwargs) -> None:
        answers = fill_blanks(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, **kwargs)
        for prompt, answer in zip(prompts, answers):
            print(f"   {prompt!r:48} -> {answer!r}")

    if args.prompt:
        print("\n== Your prompts")
        show(args.prompt)

    print("\n== [MASK] inside a sentence (a short span)")
    show(EXAMPLES_MASK)
    print("\n== [gMASK] at the end (generate the rest)")
    show(EXAMPLES_GMASK)
    print(f"\n== A batch of {len(EXAMPLES_BATCH)} prompts of different lengths, left-padded, generated together")
    show(EXAMPLES_BATCH)

    print(f"\n== Beam search (num_beams={args.num_beams}) with its alternatives: {EXAMPLE_BEAM!r}")
    enc = tokenizer([EXAMPLE_BEAM], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            num_return_sequences=args.num_beams,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    for rank, (seq, score) in enumerate(zip(out.sequences, out.sequences_scores)):
        text = tokenizer.decode(seq[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        print(f"   beam {rank}: {text!r:24} log-prob/token {score.item():.3f}")

    if not args.no_eval:
        sys.path.insert(0, str(SCRIPTS))
        import make_corpus

        items = select_items(make_corpus.build_corpus(args.corpus_seed)["heldout"], args.eval_limit)
        print(f"\n== Held-out accuracy ({len(items)} questions never seen in training; see scripts/make_corpus.py)")
        result = heldout_accuracy(model, tokenizer, items)
        for kind, label in (("fact", "fact blanks (unseen phrasing)"), ("arith", "arithmetic (unseen operand pairs)")):
            correct, total = result[kind]
            print(f"   {label:36} {correct}/{total} = {_pct(correct, total)}")
        for item, got in result["errors"][:5]:
            print(f"   wrong: {item.prompt!r} -> {got!r} (expected {item.answer!r})")
        print(f"   batched generation: {result['tokens'] / result['seconds']:.0f} tokens/s (batches of up to 128)")

    print(f"\n== Speed: {decode_speed(model, tokenizer):.0f} tokens/s decoding one prompt (greedy, KV cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
