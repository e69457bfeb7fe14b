"""lm-evaluation-harness on this repository's models (issue 20): scripts/evaluate.py's `glm` class and lm-eval's
own `hf` class for BART-gen and sparse GPT-2.

Every score lm-eval reports here is recomputed directly with transformers in the same test, by a different route:
- generate_until: `tokenizer(prompts)` (which appends `[gMASK] <sop>`) and `model.generate()` with the
  generation_config's `<eop>`, as scripts/demo.py fills blanks;
- multiple_choice / loglikelihood: `tokenizer.build_inputs_for_generation(..., targets=[choice])`, the
  fine-tuning inputs, whose labels mark the span; the log-probabilities of the span's tokens but the final `<eop>`;
- loglikelihood_rolling: the same, with the whole text as the target of an empty context (one window), or window
  by window for a small `rolling_window`.
The tasks are tests/data/lm_eval (40 items each, from the embedded model's held-out split; made by
`scripts/make_eval_tasks.py --out tests/data/lm_eval --per-task 40`, which the first test checks). All offline:
the tasks load local JSON-lines files.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, TEST_DATA, fresh_env

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pyproject.toml, extra 'test')")
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import evaluate as glm_eval  # noqa: E402  scripts/evaluate.py
import make_eval_tasks  # noqa: E402

TASKS = TEST_DATA / "lm_eval"
HAS_MODEL = (REPO_ROOT / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="the embedded default model (model.safetensors) is missing")


def docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


def test_task_files_are_what_make_eval_tasks_writes():
    expected = make_eval_tasks.files(per_task=40)
    assert sorted(p.name for p in TASKS.iterdir() if p.is_file()) == sorted(expected)
    for name, text in expected.items():
        assert (TASKS / name).read_text(encoding="utf-8") == text, f"{name} is stale: rerun make_eval_tasks.py"
    assert all(len(docs(f)) == 40 for f in ("facts.jsonl", "arith.jsonl", "choice.jsonl", "text.jsonl"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread is much faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the glm class
@pytest.fixture(scope="module")
def direct():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO_ROOT), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(REPO_ROOT), trust_remote_code=True).eval()
    return model, tok


def span_logprob(model, tok, context: str, target: str) -> float:
    """log p(target | context) from the fine-tuning inputs: labels mark `target <eop>`; <eop> is left out."""
    enc = tok.build_inputs_for_generation(tok([context], return_tensors="pt"), targets=[target])
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    labels = enc["labels"][0, 1:]
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    scored = (labels != -100) & (labels != tok.eop_token_id)
    return logprobs[scored].gather(1, labels[scored][:, None]).sum().item()


def evaluate(lm, tasks: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True, verbosity="ERROR"
    )


@pytest.fixture(scope="module")
def runs():
    """lm-eval's results on the four tasks with the glm class at batch size 1 and 8 (one model load)."""
    if not HAS_MODEL:
        pytest.skip("the embedded default model (model.safetensors) is missing")
    lm = glm_eval.GLMEvalLM(pretrained=str(REPO_ROOT), device="cpu", batch_size=1)
    tasks = ["glm_heldout_facts", "glm_heldout_arith", "glm_heldout_choice", "glm_heldout_text"]
    out = {1: evaluate(lm, tasks)}
    lm.batch_size = 8
    out[8] = evaluate(lm, tasks)
    return out


def samples(result: dict, task: str) -> list[dict]:
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


@needs_model
@pytest.mark.parametrize("task,file", [("glm_heldout_facts", "facts.jsonl"), ("glm_heldout_arith", "arith.jsonl")])
def test_generate_until_equals_direct_generation(runs, direct, task, file):
    from demo import fill_blanks

    model, tok = direct
    items = docs(file)
    expected = fill_blanks(model, tok, [d["prompt"] for d in items], max_new_tokens=8)
    accuracy = sum(e == d["answer"] for e, d in zip(expected, items)) / len(items)
    for batch_size, result in runs.items():
        got = [s["filtered_resps"][0].strip() for s in samples(result, task)]
        assert got == expected, f"batch {batch_size}"
        assert result["results"][task]["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy >= (0.85 if task == "glm_heldout_facts" else 0.95)  # the model's held-out level (README)


@needs_model
def test_multiple_choice_equals_direct_scores(runs, direct):
    model, tok = direct
    items = docs("choice.jsonl")
    scores = [[span_logprob(model, tok, d["prompt"], " " + c) for c in d["choices"]] for d in items]
    accuracy = sum(max(range(4), key=row.__getitem__) == d["label"] for row, d in zip(scores, items)) / len(items)
    for batch_size, result in runs.items():
        got = [[resp[0] for resp in s["filtered_resps"]] for s in samples(result, "glm_heldout_choice")]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(scores), atol=1e-4, rtol=0, msg=f"b{batch_size}")
        assert result["results"]["glm_heldout_choice"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy >= 0.9  # chance is 0.25; lm-eval's hf class scores GLM at chance


@needs_model
def test_loglikelihood_rolling_equals_direct_scores(runs, direct):
    model, tok = direct
    texts = [d["text"] for d in docs("text.jsonl")]
    totals = [span_logprob(model, tok, "", text) for text in texts]  # short texts: one window after [gMASK] <sop>
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    for batch_size, result in runs.items():
        got = [s["filtered_resps"][0] for s in samples(result, "glm_heldout_text")]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(totals), atol=1e-4, rtol=0, msg=f"b{batch_size}")
        word_ppl = result["results"]["glm_heldout_text"]["word_perplexity,none"]
        assert word_ppl == pytest.approx(math.exp(-sum(totals) / words), rel=1e-4)


@needs_model
def test_rolling_windows_each_token_once_and_batch_independent(direct):
    """With 3-token windows a text is several spans, each after the text before it; batch 1 == batch 5."""
    from lm_eval.api.instance import Instance

    model, tok = direct
    texts = [d["text"] for d in docs("text.jsonl")[:6]]
    lm = glm_eval.GLMEvalLM(pretrained=str(REPO_ROOT), device="cpu", batch_size=1, rolling_window=3)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    single = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    lm.batch_size = 5
    batched = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    expected = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert [t for prefix, span in lm.rolling_windows(text) for t in span] == ids
        total = 0.0
        for start in range(0, len(ids), 3):  # window = ids[start:start+3], after `ids[:start] [gMASK] <sop>`
            sequence = torch.tensor([tok.build_inputs_with_special_tokens(ids[:start]) + ids[start : start + 3]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
            span = sequence[0, -len(ids[start : start + 3]) :]
            total += logprobs[-len(span) - 1 : -1].gather(1, span[:, None]).sum().item()
        expected.append(total)
    torch.testing.assert_close(torch.tensor(single), torch.tensor(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)


@needs_model
def test_span_prefix_follows_the_tokenizer_and_the_blank_option(direct):
    _, tok = direct
    gmask, mask, sop = tok.gmask_token_id, tok.mask_token_id, tok.sop_token_id
    context = tok.encode("27 plus 15 equals", add_special_tokens=False)
    lm = glm_eval.GLMEvalLM.__new__(glm_eval.GLMEvalLM)  # the input builder only, no model
    lm.tokenizer, lm.sop_id, lm.gmask_id, lm.blank_ids = tok, sop, gmask, set(tok.mask_token_ids)
    lm.tokenizer_adds_gmask, lm.max_length = True, 512
    lm.blank_id = gmask
    assert lm.span_prefix(context) == tok("27 plus 15 equals")["input_ids"] == context + [gmask, sop]
    lm.blank_id = mask  # GLM's LAMBADA setting: a [MASK] at the end (chatglm's tokenizer still appends [gMASK])
    assert lm.span_prefix(context) == context + [mask, gmask, sop]
    inner = tok.encode("The capital of [MASK] is Paris.", add_special_tokens=False)
    assert lm.span_prefix(inner) == inner + [gmask, sop]  # a context with a blank is used as it is
    long = [context[0]] * 600  # cut from the left so that 10 span tokens fit in 512
    assert lm.fitted_prefix(long, room=10) == [context[0]] * 499 + [mask, gmask, sop]


@needs_model
def test_bad_model_args_are_named():
    with pytest.raises(ValueError, match="blank='X'"):
        glm_eval.GLMEvalLM(pretrained=str(REPO_ROOT), blank="X")
    with pytest.raises(ValueError, match="batch_size='auto'"):
        glm_eval.GLMEvalLM(pretrained=str(REPO_ROOT), batch_size="auto")


@needs_model
def test_command_line_writes_results(tmp_path):
    """scripts/evaluate.py takes lm-eval's flags (--include_path, --limit, --output_path, --device) in a fresh
    process and writes lm-eval's results file."""
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--model", "glm", "--model_args",
           f"pretrained={REPO_ROOT},dtype=float32", "--tasks", "glm_heldout_choice", "--include_path", str(TASKS),
           "--limit", "8", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = fresh_env(tmp_path / "hf_home")
    env.update(HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result_file.read_text())["results"]["glm_heldout_choice"]["acc,none"]
    assert 0.75 <= acc <= 1.0


# ---------------------------------------------------------------- lm-eval's hf class on BART-gen and sparse GPT-2
PAIRS = [("the cat sat on", " the mat."), ("a hat is", " on the cat."), ("that", " cat has a hat."), ("the", " mat")]


@pytest.mark.parametrize("name", ["gpt2_sparse", "bart_gen"])
def test_hf_class_scores_bart_gen_and_sparse_gpt2_like_direct_scoring(name):
    from fixtures.hub_folders import folder, load
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load(name)
    expected = []
    with torch.no_grad():
        for context, continuation in PAIRS:
            if name == "bart_gen":  # the encoder reads the context, the decoder is scored on the continuation
                labels = torch.tensor([tok.encode(continuation, add_special_tokens=False)])
                logits = model(input_ids=torch.tensor([tok.encode(context)]), labels=labels).logits
                target = labels[0]
            else:  # one causal text: the continuation's tokens after the context's
                context_ids, continuation_ids = tok.encode(context), tok.encode(continuation)
                logits = model(torch.tensor([context_ids + continuation_ids[:-1]])).logits[:, len(context_ids) - 1 :]
                target = torch.tensor(continuation_ids)
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            expected.append(logprobs.gather(1, target[:, None]).sum().item())
    backend = "seq2seq" if name == "bart_gen" else "causal"
    for batch_size in (1, len(PAIRS)):  # all rows in one batch: one padded width, whatever lm-eval's order
        lm = HFLM(pretrained=str(folder(name).path), backend=backend, trust_remote_code=True, batch_size=batch_size,
                  device="cpu")  # fmt: skip
        requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
        got = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0, msg=f"b{batch_size}")
        # lm-eval's seq2seq generation passes max_length = context tokens + max_gen_toks to generate(), where it
        # bounds the decoder: an explicit max_length (gen_kwargs) is what bounds BART-gen's output
        limit = {"max_length": 6} if name == "bart_gen" else {"max_new_tokens": 5}
        gen_kwargs = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False} | (limit if name == "bart_gen" else {})
        generations = lm.generate_until(
            [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, (c, _) in enumerate(PAIRS)],
            disable_tqdm=True,
        )
        if name == "bart_gen" and batch_size > 1:
            # lm-eval left-pads every batch it generates from, encoder inputs included; BART's learned positions
            # count from the first column, padding or not (as in transformers' own BART), so a padded row reads
            # shifted positions: the direct route gets the same left-padded batch
            enc = tok([c for c, _ in PAIRS], return_tensors="pt", padding=True, padding_side="left")
            out = model.generate(**enc, **limit, do_sample=False, pad_token_id=tok.pad_token_id)
            direct_gen = [t.split("\n")[0] for t in tok.batch_decode(out, skip_special_tokens=True)]
        else:
            direct_gen = []
            for context, _ in PAIRS:
                enc = tok(context, return_tensors="pt")
                out = model.generate(**enc, **limit, do_sample=False, pad_token_id=tok.pad_token_id)
                start = 0 if name == "bart_gen" else enc["input_ids"].shape[1]
                direct_gen.append(tok.decode(out[0, start:], skip_special_tokens=True).split("\n")[0])
        assert generations == direct_gen, f"batch {batch_size}"


def test_evaluate_script_help_runs_offline(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--help"],
        capture_output=True, text=True, env=fresh_env(tmp_path / "hf_home"), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model_args" in proc.stdout or "run" in proc.stdout


@needs_model
def test_max_gen_toks_is_honoured_and_generation_config_does_not_override_it(direct):
    """generation_config.json sets no max_new_tokens (it would override a caller's max_length, e.g. lm-eval's hf
    class); the glm class passes max_gen_toks as max_new_tokens."""
    from lm_eval.api.instance import Instance

    _, tok = direct
    config = json.loads((REPO_ROOT / "generation_config.json").read_text())
    assert "max_new_tokens" not in config and config["eos_token_id"] == tok.eop_token_id
    lm = glm_eval.GLMEvalLM(pretrained=str(REPO_ROOT), device="cpu", batch_size=2)
    prompts = ["The capital of Italy is", "Buenos Aires is the capital of"]
    for limit in (1, 40):
        gen = {"until": [], "max_gen_toks": limit, "do_sample": False}
        out = lm.generate_until([Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)])
        lengths = [len(tok.encode(o, add_special_tokens=False)) for o in out]
        assert all(n <= limit for n in lengths), (limit, out)
        assert limit == 1 or out == ["Rome.", "Argentina."], out  # stopped at <eop>, long before 40 tokens
