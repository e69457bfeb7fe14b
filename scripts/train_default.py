"""Train the embedded default GLM model (ChatGLM-6B architecture, about a million parameters) from scratch.

Reproducible end to end from a seed, with no downloads:
1. the corpus: `scripts/make_corpus.py` (facts and two-digit arithmetic in English and Chinese, with a
   held-out split);
2. a SentencePiece tokenizer trained on the training sentences (digits split so arithmetic generalises,
   GLM's special pieces as control symbols), wrapped as the repository's `GLMTokenizer` (flavour "chatglm");
3. the model, trained with transformers' `Trainer` on GLM's blank-infilling objective: a `[MASK]` over a
   short span (75% an answer slot, 7% 1-3 random words), a `[gMASK]` over a sentence's suffix (10%), and an
   `[sMASK]` over a whole sentence of a short paragraph about one fact or sum (8%; the other sentences
   restate it). Examples are length-bucketed into batches (less padding), in a seeded order. Each example
   is encoded the way the model is used: `tokenizer(prompt)` (which appends `[gMASK] <sop>`) then
   `tokenizer.build_inputs_for_generation(..., targets=[span])`, whose labels cover the span and `<eop>`;
4. the held-out accuracy, and the result saved with `save_pretrained` (config with auto_map, generation
   config, model.safetensors in float32, tokenizer files).

    python scripts/train_default.py [--out build/default_model] [--seed 0] [--max-steps N] [--export-root]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/train_default.py ...   # DDP, gloo on CPU (fastest on
                                                                                 # 2 cores; the shipped run)
    accelerate launch --num_processes 8 scripts/train_default.py [--bf16] [--fsdp "full_shard auto_wrap"]
                                                                   [--deepspeed ds_config.json]

`--batch-size` is the global batch: each of the N processes takes batch / N, so a DDP run sees the same
number of examples per step. `--export-root` copies the trained model and tokenizer to the repository root
(config.json, generation_config.json, model.safetensors, tokenizer.model, tokenizer_config.json).
A loss log is written to OUT/loss_log.jsonl and the accuracy to OUT/metrics.json; checkpoints every
`--save-steps` go to OUT/trainer (continue an interrupted run with the same command plus `--resume`).
Same seed, same process count and thread count -> identical loss log and weights (checked for 1 and 2
processes); a different thread or process count changes float summation order, so the weights differ
slightly while the accuracy should not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import make_corpus  # noqa: E402

SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
ROOT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def tokenizer_text(corpus: dict) -> list[str]:
    """Training text for SentencePiece: the fact sentences weighted up (they are few next to arithmetic)."""
    facts = [s.text for s in corpus["train"] if s.kind == "fact"]
    arith = [s.text for s in corpus["train"] if s.kind == "arith"]
    return facts * 20 + arith[::8]


def train_sentencepiece(corpus: dict, out_dir: Path, vocab_size: int) -> Path:
    """Train the SentencePiece model (deterministic: fixed input order, one thread). Returns its path.

    The model is written through `model_writer`, so no local path (`model_prefix`) is stored inside it.
    """
    import io

    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_text(corpus)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=1,
        control_symbols=SPECIAL_PIECES,
        user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)],
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buffer.getvalue())
    return out_dir / "tokenizer.model"


def load_code(name: str):
    """A class of the repository's remote code, through transformers' dynamic-module loader (as users get it)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(name, str(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# Blank-infilling examples
# ---------------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[^\s.,]+")
_ZH_PUNCT = set("。，、：")


def _random_span(rng: random.Random, s: make_corpus.Sentence) -> tuple[int, int]:
    if s.lang == "en":
        words = [m.span() for m in _WORD.finditer(s.text)]
        n = rng.randint(1, min(3, len(words)))
        i = rng.randrange(len(words) - n + 1)
        return words[i][0], words[i + n - 1][1]
    chars = [i for i, ch in enumerate(s.text) if ch not in _ZH_PUNCT]
    n = rng.randint(1, 3)
    i = rng.randrange(len(chars))
    j = i
    while j + 1 < len(chars) and chars[j + 1] == chars[j] + 1 and j - i + 1 < n:
        j += 1
    return chars[i], chars[j] + 1


def make_example(rng: random.Random, s: make_corpus.Sentence, groups: dict[str, list]) -> tuple[str, str, str]:
    """One GLM training example from a sentence: (objective, prompt with one blank, target span)."""
    r = rng.random()
    if r < 0.75:  # [MASK] over an answer slot (for arithmetic mostly the result)
        if s.kind == "arith" and rng.random() < 0.7:
            span = s.slots[2]
        else:
            span = rng.choice(s.slots)
        return ("mask", *make_corpus.blank(s.text, span))
    if r < 0.82:  # [MASK] over 1-3 random words / characters
        return ("mask_span", *make_corpus.blank(s.text, _random_span(rng, s)))
    if r < 0.92:  # [gMASK]: the suffix from an answer slot or a random word boundary
        starts = [a for a, _ in s.slots if a > 0]
        if starts and rng.random() < 0.6:
            cut = rng.choice(starts)
        elif s.lang == "en":
            cut = rng.choice([m.start() for m in _WORD.finditer(s.text) if m.start() > 0])
        else:
            cut = rng.randrange(1, len(s.text) - 1)
        prefix = s.text[:cut].rstrip()
        if rng.random() < 0.5:  # both spellings: the tokenizer appends [gMASK] anyway
            prefix += " [gMASK]" if s.lang == "en" else "[gMASK]"
        return "gmask", prefix, s.text[cut:]
    # [sMASK]: a short paragraph about the same fact / triple, one sentence blanked
    others = [t for t in groups[s.group] if t.text != s.text]
    chosen = rng.sample(others, min(len(others), 1 if rng.random() < 0.7 else 2))
    sentences = [s.text, *(t.text for t in chosen)]
    rng.shuffle(sentences)
    sep = " " if s.lang == "en" else ""
    prompt = sep.join("[sMASK]" if t == s.text else t for t in sentences)
    return "smask", prompt, s.text


def make_examples(corpus: dict, n: int, seed: int, fact_fraction: float) -> list[tuple[str, str, str]]:
    """`n` examples, deterministic in `seed`: a `fact_fraction` share from fact sentences, the rest arithmetic."""
    rng = random.Random(seed)
    facts = [s for s in corpus["train"] if s.kind == "fact"]
    arith = [s for s in corpus["train"] if s.kind == "arith"]
    groups: dict[str, list] = {}
    for s in corpus["train"]:
        groups.setdefault(s.group, []).append(s)
    examples = []
    for _ in range(n):
        pool = facts if rng.random() < fact_fraction else arith
        examples.append(make_example(rng, rng.choice(pool), groups))
    return examples


def bucket_by_length(examples: list, batch_size: int, seed: int, window: int = 50) -> list:
    """Reorder examples so each batch holds similar lengths (less padding), batches in random order.

    Windows of `window` batches are sorted by text length and cut into batches; the batch order is then
    shuffled with `seed`. Deterministic, and the same order whatever the number of processes.
    """
    rng = random.Random(seed + 1)
    batches = []
    for start in range(0, len(examples), batch_size * window):
        chunk = sorted(examples[start : start + batch_size * window], key=lambda e: len(e[1]) + len(e[2]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [e for batch in batches for e in batch]


class ExampleStream(torch.utils.data.IterableDataset):
    """The examples in a fixed order (already shuffled and length-bucketed), so the Trainer does not reshuffle;
    under DDP each global batch is split between the processes."""

    def __init__(self, examples: list[tuple[str, str, str]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)


class BlankInfillingCollator:
    """Encodes a batch with the tokenizer's own data format: tokenizer(prompts) + build_inputs_for_generation."""

    def __init__(self, tokenizer, max_gen_length: int):
        self.tokenizer, self.max_gen_length = tokenizer, max_gen_length

    def __call__(self, batch: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        prompts, targets = [b[1] for b in batch], [b[2] for b in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return dict(
            self.tokenizer.build_inputs_for_generation(enc, max_gen_length=self.max_gen_length, targets=targets)
        )


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def build_model(tokenizer, args):
    GLMConfig = load_code("configuration_glm.GLMConfig")
    GLMForConditionalGeneration = load_code("modeling_glm.GLMForConditionalGeneration")
    config = GLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        inner_hidden_size=4 * args.hidden_size,
        max_sequence_length=512,
        residual_alpha=args.residual_alpha if args.residual_alpha else math.sqrt(2 * args.num_layers),
        bos_token_id=tokenizer.sop_token_id,
        eos_token_id=tokenizer.eop_token_id,
        mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id,
        smask_token_id=tokenizer.smask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    model = GLMForConditionalGeneration(config)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.sop_token_id,
        eos_token_id=tokenizer.eop_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # no max_new_tokens / max_length here: a max_new_tokens overrides a caller's max_length (lm-eval's hf class
        # passes one), and a max_length makes generate() warn at every call that passes max_new_tokens
        do_sample=False,
    )
    return model


def loss_log_callback(path: Path):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends every logged step (loss, learning rate, grad norm) to a JSON-lines file on the main process."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path.write_text("")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return LossLog()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the embedded default GLM model.")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "default_model")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus split, the examples, init and data order")
    p.add_argument("--max-steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over DDP processes)")
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--fact-fraction", type=float, default=0.45, help="share of examples built from fact sentences")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--residual-alpha", type=float, default=None, help="ChatGLM's residual scale (default sqrt(2L))")
    p.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece pieces")
    p.add_argument("--max-gen-length", type=int, default=48, help="longest target span in tokens")
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--eval-limit", type=int, default=None, help="held-out items to evaluate (default all)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--save-steps", type=int, default=250, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/trainer")
    p.add_argument("--export-root", action="store_true", help="copy the result to the repository root")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPUs)")
    p.add_argument("--fsdp", default="", help='FSDP on GPUs, e.g. "full_shard auto_wrap" (wraps each GLMBlock)')
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (GPUs; needs the deepspeed package)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of processes {world_size}")
    out: Path = args.out
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size // world_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.01,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
        # each process reads the example stream and collates its own share of every global batch
        accelerator_config={"dispatch_batches": False},
        remove_unused_columns=False,
        disable_tqdm=False,
        bf16=args.bf16,
        fsdp=args.fsdp,
        fsdp_config={"transformer_layer_cls_to_wrap": ["GLMBlock"]} if args.fsdp else None,
        deepspeed=args.deepspeed,
    )
    is_main = training_args.process_index == 0

    corpus = make_corpus.build_corpus(args.seed)
    make_corpus.check_split(corpus)
    GLMTokenizer = load_code("tokenization_glm.GLMTokenizer")
    with training_args.main_process_first(desc="SentencePiece training"):
        if is_main:
            train_sentencepiece(corpus, out / "sentencepiece", args.vocab_size)
    tokenizer = GLMTokenizer(str(out / "sentencepiece" / "tokenizer.model"), flavour="chatglm")

    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    examples = make_examples(corpus, args.max_steps * args.batch_size, args.seed, args.fact_fraction)
    examples = bucket_by_length(examples, args.batch_size, args.seed)
    if is_main:
        print(f"corpus: {json.dumps(corpus['stats'])}")
        print(f"tokenizer: {len(tokenizer)} tokens; model: {n_params / 1e6:.2f}M parameters; processes: {world_size}")
        for objective, prompt, target in examples[:4]:
            print(f"  example ({objective}): {prompt!r} -> {target!r}")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ExampleStream(examples),
        data_collator=BlankInfillingCollator(tokenizer, args.max_gen_length),
        callbacks=[loss_log_callback(out / "loss_log.jsonl")] if is_main else [],
    )
    # The model's loss honours Trainer's `num_items_in_batch` (transformers_compat.causal_lm_loss: a sum over the
    # label tokens divided by those of the whole accumulation step), so gradient accumulation and DDP weigh every
    # label token alike; Trainer sees that from the forward's signature.
    t0 = time.time()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    train_seconds = time.time() - t0
    if not is_main:
        return 0

    model = trainer.model
    model.eval()
    model.config.use_cache = True  # Trainer turns it off for training; generation wants the KV cache
    final = out / "final"
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    metrics = {
        "train_seconds": round(train_seconds, 1),
        "steps": args.max_steps,
        "params": n_params,
        "processes": world_size,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if not args.no_eval:
        from demo import heldout_accuracy, select_items

        items = select_items(corpus["heldout"], args.eval_limit)
        result = heldout_accuracy(model, tokenizer, items)
        for kind in ("fact", "arith"):
            correct, total = result[kind]
            metrics[f"heldout_{kind}_accuracy"] = round(100.0 * correct / max(total, 1), 2)
            metrics[f"heldout_{kind}"] = f"{correct}/{total}"
        metrics["errors_sample"] = [(it.prompt, got, it.answer) for it, got in result["errors"][:30]]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "errors_sample"}, indent=2))
    if args.export_root:
        for name in ROOT_FILES:
            if (final / name).is_file():
                shutil.copyfile(final / name, ROOT / name)
                print(f"exported {name} -> {ROOT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
