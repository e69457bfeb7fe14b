"""The fast compatibility subset that `scripts/test.sh` runs on a spread of transformers releases (issue 17).

Marked `compat`: `pytest -m compat` runs only this module, in about a minute, and scripts/test.sh runs it on the
first 5.x release, every fifth minor line and the three newest ones (`--all-versions`: every 5.x minor line), each
in its own environment. The whole suite, this module included, runs on 4.57.6, the pinned 5.x and the newest 5.x.

Every family, as a user meets it on a new release: the embedded default GLM at the repository root (ChatGLM-6B
variant), a tiny GLM-10B-family model, sparse GPT-2 and BART-gen (tiny random folders from
fixtures.hub_folders.build_folder, written with the transformers under test). Per family, one fresh process
loads the folder through the Auto classes and records:
- greedy, beam (with `num_return_sequences`), seeded sampling and a padded batch through `generate()`, each with
  and without the cache (a cache-calling change in a release shows up here first: the two must give the same ids),
  and with a static cache (the same ids, the cache sized in buckets);
- logits on the padded batch, then `save_pretrained` into a new folder;
- the losses of a few `Trainer` steps.
A second fresh process reloads the saved folder through the Auto classes (same logits expected) and runs the
`text-generation` pipeline (GLM, sparse GPT-2), whose ids must equal `generate()`'s prompt by prompt.
Greedy and beam ids must also equal those the pinned release gave (tests/data/compat/generate_ids.json, written
by `python tests/test_compat_matrix.py --write-golden` with .venv/tf5's transformers): a release that changes what
the models generate, not only how they are called, fails here.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from fixtures.hub_folders import AUTO_LM, PROMPTS, folder, run_fresh_here
from helpers import REPO_ROOT, TEST_DATA, assert_close

# "glm" is the embedded default model at the repository root, the others tiny random folders.
NAMES = ("glm", "glm-10b", "gpt2_sparse", "bart_gen")
CAUSAL = tuple(name for name in NAMES if name != "bart_gen")
MODES = ("greedy", "beam", "sampled", "batch")
NEW_TOKENS = 6
TRAIN_STEPS = 2
TESTS_DIR = Path(__file__).resolve().parent
GOLDEN = TEST_DATA / "compat" / "generate_ids.json"

# One xdist group per family: the two fresh processes of a family run once, on the worker that gets its tests
# (scripts/test.sh passes --dist loadgroup).
pytestmark = pytest.mark.compat


def per_family(names: tuple[str, ...]) -> list:
    return [pytest.param(name, marks=pytest.mark.xdist_group(f"compat_{name}")) for name in names]


LOAD_GENERATE_SAVE_TRAIN = """
    import json, math, sys, torch, transformers
    from transformers import Trainer, TrainingArguments
    name, path, auto_class, prompts, saved, new_tokens, steps, tests_dir = sys.argv[1:9]
    prompts, new_tokens, steps = json.loads(prompts), int(new_tokens), int(steps)
    sys.path.insert(0, tests_dir)
    from fixtures import repo_module
    from fixtures.hub_folders import training_examples

    model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    out = dict(version=transformers.__version__, model=type(model).__name__, generate={}, greedy_each=[])
    single = tok(prompts[:1], return_tensors="pt")
    batch = tok(prompts, return_tensors="pt", padding=True)
    modes = dict(
        greedy=(single, dict(do_sample=False)),
        beam=(single, dict(do_sample=False, num_beams=3, num_return_sequences=2)),
        sampled=(single, dict(do_sample=True, top_k=20)),
        batch=(batch, dict(do_sample=False)),
    )
    with torch.no_grad():
        for mode, (inputs, kwargs) in modes.items():
            out["generate"][mode] = {}
            for use_cache in (True, False):
                torch.manual_seed(0)
                ids = model.generate(**inputs, max_new_tokens=new_tokens, use_cache=use_cache, **kwargs)
                out["generate"][mode][str(use_cache)] = ids.tolist()
        for prompt in prompts:
            ids = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=new_tokens, do_sample=False)
            out["greedy_each"].append(ids[0].tolist())
        # a cache the caller creates (5.24+ passes it on as `cache` only if the model's signature names it), and
        # the static cache
        given = transformers.DynamicCache()
        if model.config.is_encoder_decoder:
            given = transformers.EncoderDecoderCache(given, transformers.DynamicCache())
        ids = model.generate(**single, max_new_tokens=new_tokens, do_sample=False, past_key_values=given)
        out["given_cache"] = dict(ids=ids.tolist(), filled=int(given.get_seq_length()))
        static = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                                return_dict_in_generate=True)
        out["static"] = static.sequences.tolist()
        compat = repo_module("transformers_compat")  # the cache's size: generate() sizes it in buckets
        needed = new_tokens + (1 if model.config.is_encoder_decoder else batch["input_ids"].shape[1])
        out["static_slots"] = dict(slots=compat.fixed_cache_size(compat.output_cache(static)), needed=needed,
                                   limit=model.config.max_position_embeddings)
        out["logits"] = model(**batch).logits.tolist()
    model.save_pretrained(saved)
    tok.save_pretrained(saved)

    args = TrainingArguments(output_dir=saved + "_trainer", max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=training_examples(name, tok))
    trainer.train()
    out["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    out["weights_changed"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    print(json.dumps(out))
"""

RELOAD_AND_PIPELINE = """
    import json, sys, torch, transformers
    path, saved, auto_class, prompts, new_tokens, causal = sys.argv[1:7]
    prompts, new_tokens = json.loads(prompts), int(new_tokens)
    model = getattr(transformers, auto_class).from_pretrained(saved, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(saved, trust_remote_code=True)
    with torch.no_grad():
        out = dict(model=type(model).__name__,
                   logits=model(**tok(prompts, return_tensors="pt", padding=True)).logits.tolist())
    if causal == "1":
        pipe = transformers.pipeline("text-generation", model=path, trust_remote_code=True)
        rows = pipe(prompts, return_tensors=True, max_new_tokens=new_tokens, do_sample=False)
        out["pipeline"] = [torch.as_tensor(row[0]["generated_token_ids"]).tolist() for row in rows]
    print(json.dumps(out))
"""


@functools.cache
def _run(name: str) -> dict | AssertionError:
    """Both fresh processes of family `name`, once per process; a failure is kept (not re-run per test)."""
    path = REPO_ROOT if name == "glm" else folder(name).path
    saved = Path(tempfile.mkdtemp(prefix=f"compat_{name}_")) / "saved"
    prompts = json.dumps(PROMPTS[name])
    try:
        first = run_fresh_here(
            LOAD_GENERATE_SAVE_TRAIN,
            *(name, path, AUTO_LM[name], prompts, saved, NEW_TOKENS, TRAIN_STEPS, TESTS_DIR),
        )
        second = run_fresh_here(
            RELOAD_AND_PIPELINE, *(path, saved, AUTO_LM[name], prompts, NEW_TOKENS, "1" if name in CAUSAL else "0")
        )
    except AssertionError as error:
        return error
    return dict(first=json.loads(first.splitlines()[-1]), second=json.loads(second.splitlines()[-1]))


def report(name: str) -> dict:
    """What the two fresh processes recorded for family `name`."""
    result = _run(name)
    if isinstance(result, AssertionError):
        raise AssertionError(f"transformers {transformers.__version__}, {name}: {result}")
    return result


@pytest.mark.parametrize("name", per_family(NAMES))
def test_loads_through_auto_classes_on_this_release(name):
    first = report(name)["first"]
    assert first["version"] == transformers.__version__, "the fresh process imported another transformers"
    expected = {"bart_gen": "BartGenForConditionalGeneration", "gpt2_sparse": "GPT2SparseLMHeadModel"}
    assert first["model"] == expected.get(name, "GLMForConditionalGeneration")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", per_family(NAMES))
def test_generate_equal_with_and_without_cache(name, mode):
    runs = report(name)["first"]["generate"][mode]
    with_cache, without_cache = runs["True"], runs["False"]
    assert with_cache == without_cache, (
        f"transformers {transformers.__version__}, {name}, {mode}: generate() ids differ with the cache"
    )
    rows = 2 if mode == "beam" else len(PROMPTS[name]) if mode == "batch" else 1
    assert len(with_cache) == rows


@pytest.mark.parametrize("name", per_family(NAMES))
def test_a_cache_given_to_generate_is_filled_and_used(name):
    first = report(name)["first"]
    assert first["given_cache"]["filled"] > 0, f"transformers {transformers.__version__}: the given cache was unused"
    assert first["given_cache"]["ids"] == first["generate"]["greedy"]["True"]


@pytest.mark.parametrize("name", per_family(NAMES))
def test_static_cache_generates_the_dynamic_cache_ids(name):
    first = report(name)["first"]
    assert first["static"] == first["generate"]["batch"]["True"], f"transformers {transformers.__version__}"


@pytest.mark.parametrize("name", per_family(NAMES))
def test_generate_sizes_its_static_cache_in_buckets(name):
    """Powers of two from 256 slots, at most the model's positions (fast_decoding.static_cache_slots): the sizing
    reaches transformers' private cache factory (`_get_cache` / `_prepare_static_cache`), which a release may rename."""
    static = report(name)["first"]["static_slots"]
    bucket = next(size for size in (256 << i for i in range(8)) if size >= static["needed"])
    assert static["slots"] == min(bucket, static["limit"]), f"transformers {transformers.__version__}: {static}"


@pytest.mark.parametrize("name", per_family(NAMES))
def test_save_and_reload_through_auto_classes_gives_the_same_logits(name):
    first, second = report(name)["first"], report(name)["second"]
    assert second["model"] == first["model"]
    assert_close(torch.tensor(second["logits"]), torch.tensor(first["logits"]), atol=1e-5, msg="reloaded logits")


@pytest.mark.parametrize("name", per_family(NAMES))
def test_trainer_steps_update_the_weights(name):
    first = report(name)["first"]
    assert len(first["losses"]) == TRAIN_STEPS and all(math.isfinite(loss) for loss in first["losses"])
    assert first["weights_changed"]


@pytest.mark.parametrize("name", per_family(CAUSAL))
def test_text_generation_pipeline_equals_generate(name):
    first, second = report(name)["first"], report(name)["second"]
    assert second["pipeline"] == first["greedy_each"]


def generated_ids(name: str) -> dict:
    """What the golden file holds for family `name`: greedy ids per prompt and the beam-search ids."""
    first = report(name)["first"]
    return {"greedy_each": first["greedy_each"], "beam": first["generate"]["beam"]["True"]}


@pytest.mark.parametrize("name", per_family(NAMES))
def test_generated_ids_equal_the_pinned_release(name):
    golden = json.loads(GOLDEN.read_text())
    assert generated_ids(name) == golden["ids"][name], (
        f"transformers {transformers.__version__}, {name}: generate() gives other ids than transformers "
        f"{golden['transformers']} did"
    )


if __name__ == "__main__":  # python tests/test_compat_matrix.py --write-golden (with the pinned transformers)
    import sys

    assert sys.argv[1:] == ["--write-golden"], "usage: python tests/test_compat_matrix.py --write-golden"
    ids = {name: generated_ids(name) for name in NAMES}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"transformers": transformers.__version__, "ids": ids}, indent=1) + "\n")
    print(f"wrote {GOLDEN} with transformers {transformers.__version__}")
