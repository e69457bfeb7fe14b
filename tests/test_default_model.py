"""The embedded default GLM model at the repository root (issue 5): the corpus split it was trained and
evaluated on, the demo's behaviour without weights, and the shipped model answering held-out questions
through the full Auto-class path in a fresh process (on whichever transformers version runs the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, fresh_env, run_fresh

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_corpus  # noqa: E402

# The shipped model is the repository root; GLM_DEFAULT_MODEL_DIR checks a candidate (e.g. build/default_model/final)
MODEL_DIR = Path(os.environ.get("GLM_DEFAULT_MODEL_DIR", REPO_ROOT)).resolve()
HAS_MODEL = (MODEL_DIR / "model.safetensors").is_file()


def test_corpus_is_deterministic_and_split_holds():
    a, b = make_corpus.build_corpus(0), make_corpus.build_corpus(0)
    assert [s.text for s in a["train"]] == [s.text for s in b["train"]]
    assert [(i.prompt, i.answer) for i in a["heldout"]] == [(i.prompt, i.answer) for i in b["heldout"]]
    make_corpus.check_split(a)
    train_texts = {s.text for s in a["train"]}
    for item in a["heldout"]:
        assert item.prompt.count("[MASK]") == 1
        assert item.prompt.replace("[MASK]", item.answer) not in train_texts
    # every held-out fact is trained in another phrasing: its answer occurs in some training sentence
    train_blob = "\n".join(train_texts)
    assert all(item.answer in train_blob for item in a["heldout"] if item.kind == "fact")
    # arithmetic answers are right
    for item in a["heldout"]:
        if item.kind == "arith":
            numbers = [int(n) for n in make_corpus.re.findall(r"\d+", item.prompt)]
            expected = numbers[0] + numbers[1] if item.relation == "plus" else numbers[0] - numbers[1]
            assert int(item.answer) == expected, item
    assert a["stats"]["heldout_fact_items"] > 500 and a["stats"]["heldout_arith_items"] > 1000


def test_check_split_catches_a_leak():
    corpus = make_corpus.build_corpus(0)
    item = next(i for i in corpus["heldout"] if i.kind == "arith")
    leaked = make_corpus.Sentence(item.prompt.replace("[MASK]", item.answer), item.lang, "arith", item.relation)
    leaked.slots = make_corpus.arith_sentence(item.lang, item.relation, *make_corpus._numbers(leaked.text)).slots
    corpus["train"].append(leaked)
    with pytest.raises(AssertionError, match="leaked"):
        make_corpus.check_split(corpus)


def test_demo_without_model_says_so_and_exits_zero(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        env=fresh_env(tmp_path / "hf_home"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no model.safetensors" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_MODEL, reason=f"{MODEL_DIR} has no model.safetensors yet (made by scripts/train_default.py)"
)
def test_shipped_model_answers_heldout_questions_in_fresh_process():
    code = """
        import json, sys
        root, scripts = sys.argv[1], sys.argv[2]
        sys.path.insert(0, scripts)
        import torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import make_corpus
        from demo import fill_blanks, heldout_accuracy, select_items

        tok = AutoTokenizer.from_pretrained(root, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True).eval()
        items = make_corpus.build_corpus(0)["heldout"]
        facts = select_items([i for i in items if i.kind == "fact"], 80)
        arith = select_items([i for i in items if i.kind == "arith"], 80)
        result = heldout_accuracy(model, tok, facts + arith, progress=False)
        batch = fill_blanks(model, tok, [facts[0].prompt, arith[0].prompt, facts[1].prompt])
        single = [fill_blanks(model, tok, [p])[0] for p in (facts[0].prompt, arith[0].prompt, facts[1].prompt)]
        print(json.dumps({
            "fact": result["fact"], "arith": result["arith"], "batch": batch, "single": single,
            "errors": [(it.prompt, got, it.answer) for it, got in result["errors"]],
            "model_type": model.config.model_type, "class": type(model).__name__,
            "tokenizer": type(tok).__name__, "version": transformers.__version__,
        }))
    """
    out = json.loads(run_fresh(code, str(MODEL_DIR), str(REPO_ROOT / "scripts"), timeout=300).strip().splitlines()[-1])
    assert out["model_type"] == "glm_infill" and out["class"] == "GLMForConditionalGeneration"
    assert out["tokenizer"] == "GLMTokenizer"
    fact_ok, fact_n = out["fact"]
    arith_ok, arith_n = out["arith"]
    assert fact_n == 80 and arith_n == 80
    msg = f"transformers {out['version']}: errors {out['errors'][:10]}"
    assert fact_ok / fact_n >= 0.95, f"fact accuracy {fact_ok}/{fact_n}; {msg}"
    assert arith_ok / arith_n >= 0.90, f"arithmetic accuracy {arith_ok}/{arith_n}; {msg}"
    assert out["batch"] == out["single"], "left-padded batch differs from one-by-one generation"


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    """Two short runs of scripts/train_default.py with the same seed write byte-identical weights and tokenizer
    (the full-length version of this check was run once by hand: see the README's default-model section)."""
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "train_default.py"), "--out", str(out), "--max-steps", "4",
             "--no-eval", "--logging-steps", "1", "--save-steps", "1000"],
            capture_output=True, text=True, env=fresh_env(tmp_path / f"hf_home_{run}"), timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        logged = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
        losses = [entry["loss"] for entry in logged if "loss" in entry]
        assert losses and all(loss == loss and loss < 20 for loss in losses), losses  # finite, not NaN
        outputs.append({name: (out / "final" / name).read_bytes() for name in ("model.safetensors", "tokenizer.model")})
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], f"{name} differs between two runs with the same seed"
