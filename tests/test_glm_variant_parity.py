"""Parity with GLM's original HF remote code (THUDM glm-10b / glm-large-chinese `modeling_glm.py`), GLM variant.

The golden data in tests/data/glm_reference/ was produced by running GLM's own code under transformers 4.33.3, in
float64, on a tiny random THUDM-style checkpoint; its README says how. Each test converts that checkpoint with
`scripts/convert_checkpoint.py --arch glm`, loads it through the Auto classes and compares, in fp32 (atol 1e-4):
logits under GLM's `sep` prefix-length convention (scalar and per row), under explicit 4-D masks (GLM's
fine-tuning format from `build_inputs_for_generation(targets=...)`) and with the masks built from the tokens;
greedy and beam-search ids for blanks filled from GLM's own `build_inputs_for_generation` output passed straight
to `generate()` (beam with `num_return_sequences` too, which transformers 5.x mis-expands for 3-D position_ids)
and from nothing but `input_ids`; the classification head and GLM's multiple-choice scores. A second conversion
reads the same weights from `pytorch_model-*.bin` shards written at test time and is checked in a fresh process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, TEST_DATA, assert_close, load_in_fresh_process, load_output
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification

DATA = TEST_DATA / "glm_reference"
GOLDEN_JSON = json.loads((DATA / "golden.json").read_text())
PROMPTS = list(GOLDEN_JSON["prompts"])
SOURCE_FILES = ["config.json", "model.safetensors", "added_tokens.json", "tokenizer_config.json"]
ATOL = 1e-4


def _convert_ok(src: Path, dst: Path) -> str:
    """Run the conversion command's main() in this process (the chatglm parity test runs it as a subprocess);
    returns what it printed to stderr."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "scripts/convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = module.main(["--arch", "glm", "--src", str(src), "--dst", str(dst), "--dtype", "float32"])
    assert code == 0, f"conversion failed (exit {code}):\n{stderr.getvalue()[-4000:]}"
    return stderr.getvalue()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "golden.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glm_ref")
    src = root / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(DATA / name, src / name)
    stderr = _convert_ok(src, root / "dst")
    # glm-2b ships a classification head next to the LM weights: it is reported, not silently dropped
    assert "sequence-classification head (dense, out_proj: 3 labels" in stderr
    return root / "dst"


@pytest.fixture(scope="module")
def model(converted):
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True)
    assert model.dtype == torch.float32 and model.config.variant == "glm"
    return model.eval()


def _generate(model, kind: str, **inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, **GOLDEN_JSON["settings"][kind])
    return out.sequences if hasattr(out, "sequences") else out


# ---------------------------------------------------------------------------------------------------
# Logits under GLM's mask conventions


@pytest.mark.parametrize("case", ["sep_scalar", "sep_rows"])
def test_logits_with_the_sep_convention_match_glm(model, golden, case):
    ids, positions, sep = golden[f"{case}.input_ids"], golden[f"{case}.position_ids"], golden[f"{case}.sep"]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=sep).logits
        assert_close(logits, golden[f"{case}.logits"], atol=ATOL, msg=f"{case}: sep as a tensor")
        if case == "sep_scalar":  # GLM also took a plain number
            logits = model(input_ids=ids, position_ids=positions, attention_mask=int(sep)).logits
            assert_close(logits, golden[f"{case}.logits"], atol=ATOL, msg="sep as an int")
            # the same prompt-LM mask and positions built from the tokens (context before <|startofpiece|>)
            assert_close(model(input_ids=ids).logits, golden[f"{case}.logits"], atol=ATOL, msg="from the tokens")


def test_logits_with_glms_4d_finetuning_masks_match_glm(model, golden):
    """GLM's fine-tuning inputs (build_inputs_for_generation with targets): right-padded contexts, 4-D 0/1 mask."""
    with torch.no_grad():
        out = model(
            input_ids=golden["mask4d.input_ids"],
            position_ids=golden["mask4d.position_ids"],
            attention_mask=golden["mask4d.attention_mask"],
            labels=golden["mask4d.labels"],
        )
    assert_close(out.logits, golden["mask4d.logits"], atol=ATOL, msg="4-D mask")
    # Same loss formula (logits[:, :-1] vs labels[:, 1:]); GLM's labels are already shifted, so on them both compute
    # GLM's off-by-one objective: fine-tune with this tokenizer's build_inputs_for_generation labels instead.
    assert_close(out.loss, golden["mask4d.reference_loss"][0], atol=ATOL, msg="loss on GLM's labels")


@pytest.mark.parametrize("case", PROMPTS)
def test_prompt_logits_match_glm_with_its_inputs_and_from_tokens(model, golden, case):
    ids = golden[f"gen.{case}.input_ids"]
    length = ids.shape[1]
    with torch.no_grad():
        given = model(
            input_ids=ids,
            position_ids=golden[f"gen.{case}.position_ids"][..., :length],
            attention_mask=golden[f"gen.{case}.generation_attention_mask"][..., :length, :length],
        ).logits
        built = model(input_ids=ids).logits
    assert_close(given, golden[f"gen.{case}.logits"], atol=ATOL, msg=f"{case}: GLM's positions and mask")
    assert_close(built, golden[f"gen.{case}.logits"], atol=ATOL, msg=f"{case}: built from the tokens")


# ---------------------------------------------------------------------------------------------------
# Blank filling: generate() on GLM's build_inputs_for_generation output, and on input_ids alone


def _glm_inputs(golden, case: str) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "position_ids", "generation_attention_mask")
    return {k: golden[f"gen.{case}.{k}"] for k in keys}


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@pytest.mark.parametrize("case", PROMPTS + ["batch"])
def test_blank_filling_from_glms_generation_inputs_matches_glm(model, golden, case, kind):
    ids = _generate(model, kind, **_glm_inputs(golden, case))
    assert ids.tolist() == golden[f"gen.{case}.{kind}"].tolist(), f"{kind} ids differ for {case}"


def test_beam_with_num_return_sequences_from_glms_inputs_matches_glm(model, golden):
    """transformers 5.x expands 3-D position_ids along dim 1 for beams / num_return_sequences; the model undoes it."""
    ids = _generate(model, "beam_n2", **_glm_inputs(golden, "batch"))
    assert ids.tolist() == golden["gen.batch.beam_n2"].tolist()


@pytest.mark.parametrize("kind", ["greedy", "beam"])
def test_blank_filling_from_input_ids_alone_matches_glm(model, golden, kind):
    """Nothing but input_ids (+ the 2-D mask the tokenizer returns): positions and mask come from the tokens."""
    for case in PROMPTS:
        ids = golden[f"gen.{case}.input_ids"]
        out = _generate(model, kind, input_ids=ids, attention_mask=torch.ones_like(ids))
        assert out.tolist() == golden[f"gen.{case}.{kind}"].tolist(), f"{kind} ids differ for {case}"


# ---------------------------------------------------------------------------------------------------
# Heads


def test_sequence_classification_matches_glm(converted, golden):
    model = AutoModelForSequenceClassification.from_pretrained(converted, trust_remote_code=True).eval()
    assert model.config.num_labels == 3  # taken from the checkpoint's out_proj by the converter
    with torch.no_grad():
        out = model(
            input_ids=golden["cls.input_ids"],
            position_ids=golden["cls.position_ids"],
            attention_mask=golden["cls.sep"],
            labels=golden["cls.labels"],
        )
    assert_close(out.logits, golden["cls.logits"], atol=ATOL, msg="classification logits")
    assert_close(out.loss, golden["cls.loss"][0], atol=ATOL, msg="classification loss")


def test_multiple_choice_matches_glm(converted, golden):
    model = AutoModelForMultipleChoice.from_pretrained(converted, trust_remote_code=True).eval()
    inputs = {k: golden[f"mc.{k}"] for k in ("input_ids", "position_ids", "attention_mask", "labels")}
    padded = {"choice_ids": golden["mc.choice_ids"], "choice_indices": golden["mc.choice_indices"]}
    valid = golden["mc.choice_ids"] != -100
    glm_lists = {  # GLM's own form: per example, a list of 1-D tensors
        key: [[row[valid[b, c]] for c, row in enumerate(example)] for b, example in enumerate(padded[key])]
        for key in padded
    }
    with torch.no_grad():
        for form, choices in (("padded", padded), ("GLM's lists", glm_lists)):
            out = model(**inputs, **choices)
            assert_close(out.logits, golden["mc.logits"], atol=ATOL, msg=f"choice scores, {form}")
            assert_close(out.loss, golden["mc.loss"][0], atol=ATOL, msg=f"multiple-choice loss, {form}")


# ---------------------------------------------------------------------------------------------------
# THUDM's published layout: pytorch_model-*.bin shards, checked in a fresh process


@pytest.mark.slow
def test_sharded_bin_checkpoint_matches_glm_in_a_fresh_process(converted, golden, tmp_path):
    src = tmp_path / "src_bin"
    src.mkdir()
    for name in SOURCE_FILES[:1] + SOURCE_FILES[2:]:
        shutil.copy(DATA / name, src / name)
    state = load_file(str(DATA / "model.safetensors"))
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, src / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    dst = tmp_path / "dst_bin"
    _convert_ok(src, dst)
    assert not list(dst.glob("*.bin"))
    ours, reference = load_file(str(dst / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)

    out_file = tmp_path / "greedy.safetensors"
    load_in_fresh_process(
        dst, "AutoModelForCausalLM", _glm_inputs(golden, "batch"), out_file, method="generate",
        **GOLDEN_JSON["settings"]["beam_n2"],
    )  # fmt: skip
    assert load_output(out_file).tolist() == golden["gen.batch.beam_n2"].tolist(), "fresh-process beam ids"
