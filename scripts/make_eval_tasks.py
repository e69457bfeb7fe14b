"""lm-eval tasks built from the embedded default model's held-out split (scripts/make_corpus.py, seed 0).

    python scripts/make_eval_tasks.py --out tests/data/lm_eval --per-task 60   # the small copy the tests use
    python scripts/make_eval_tasks.py --out build/lm_eval_heldout              # the whole held-out split

writes, for `--include_path OUT` of lm-eval (or scripts/evaluate.py), four tasks tagged `glm_heldout`:
- `glm_heldout_facts` (generate_until): fill the [MASK] of a fact in a phrasing never trained on; exact match.
- `glm_heldout_arith` (generate_until): the sum or difference of an operand pair never trained on; exact match.
- `glm_heldout_choice` (multiple_choice): the same questions (facts and arithmetic, alternating) with four
  answers: the right one and three others (facts: answers of the same relation and language; arithmetic: the
  result +-1 and +-10), in a fixed shuffled order; accuracy.
- `glm_heldout_text` (loglikelihood_rolling): the held-out sentences with the blank filled in; word and byte
  perplexity, bits per byte.
Each task reads its JSON-lines file next to the YAML through `glm_heldout_data.py` (no download, no dataset
script; `datasets` only builds the in-memory table). `--per-task N` keeps N evenly spaced items per task.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus  # noqa: E402

LOADER = '''"""Loads a glm_heldout task's JSON-lines file from this folder (made by scripts/make_eval_tasks.py)."""

import json
from pathlib import Path


def load(file, **_):
    import datasets

    lines = Path(__file__).with_name(file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
'''

COMMON = """tag: glm_heldout
custom_dataset: !function glm_heldout_data.load
dataset_kwargs:
  file: {file}
test_split: test
"""

TASKS = {
    "glm_heldout_facts": """task: glm_heldout_facts
{common}output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    regexes_to_ignore: ["^ +", " +$"]
metadata:
  version: 1.0
""",
    "glm_heldout_choice": """task: glm_heldout_choice
{common}output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "glm_heldout_text": """task: glm_heldout_text
{common}output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}
TASKS["glm_heldout_arith"] = TASKS["glm_heldout_facts"].replace("glm_heldout_facts", "glm_heldout_arith")


def spaced(items: list, n: int | None) -> list:
    """n evenly spaced items (all of them when n is None or too large)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def choices_for(item, pool: list, rng: random.Random) -> tuple[list[str], int]:
    """Four answers (the right one and three wrong ones) in a shuffled order, and the right one's index."""
    if item.kind == "arith":
        value = int(item.answer)
        wrong = [str(v) for v in (value + 1, value - 1, value + 10, value - 10, value + 2) if v >= 0]
    else:
        same = sorted({i.answer for i in pool if (i.relation, i.lang) == (item.relation, item.lang)} - {item.answer})
        wrong = rng.sample(same, min(3, len(same)))
    options = [item.answer] + [w for w in wrong if w != item.answer][:3]
    rng.shuffle(options)
    return options, options.index(item.answer)


def build(per_task: int | None, seed: int = 0) -> dict[str, list[dict]]:
    """The records of each task file (deterministic)."""
    heldout = make_corpus.build_corpus(seed)["heldout"]
    facts = [i for i in heldout if i.kind == "fact"]
    arith = [i for i in heldout if i.kind == "arith"]
    rng = random.Random(seed)
    half = None if per_task is None else per_task // 2
    mixed = [i for pair in zip(spaced(facts, half), spaced(arith, half)) for i in pair]
    if per_task is None:
        mixed += arith[len(facts) :]  # the arithmetic items past the facts' count
    choice = []
    for item in mixed:
        options, label = choices_for(item, facts, rng)
        choice.append({"prompt": item.prompt, "choices": options, "label": label, "kind": item.kind})

    def question(item) -> dict:
        return {"prompt": item.prompt, "answer": item.answer, "lang": item.lang, "relation": item.relation}

    return {
        "facts.jsonl": [question(i) for i in spaced(facts, per_task)],
        "arith.jsonl": [question(i) for i in spaced(arith, per_task)],
        "choice.jsonl": choice,
        "text.jsonl": [{"text": i.prompt.replace("[MASK]", i.answer)} for i in mixed],
    }


def files(per_task: int | None, seed: int = 0) -> dict[str, str]:
    """Every file of the task folder: name -> text."""
    out = {"glm_heldout_data.py": LOADER}
    for name, records in build(per_task, seed).items():
        out[name] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data_file = {"glm_heldout_facts": "facts.jsonl", "glm_heldout_arith": "arith.jsonl"}
    data_file.update(glm_heldout_choice="choice.jsonl", glm_heldout_text="text.jsonl")
    for task, template in TASKS.items():
        out[f"{task}.yaml"] = template.format(common=COMMON.format(file=data_file[task]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write the task files into")
    parser.add_argument("--per-task", type=int, default=None, help="items per task (default: the whole split)")
    parser.add_argument("--seed", type=int, default=0, help="make_corpus seed of the embedded model (0)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    written = files(args.per_task, args.seed)
    for name, text in written.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    main()
