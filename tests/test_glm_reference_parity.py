"""Parity with THUDM's original ChatGLM-6B code, through the fixed interfaces only.

The golden data in tests/data/chatglm_reference/ was produced by running THUDM's own modeling_chatglm.py
(final chatglm-6b revision) under transformers 4.33.3, in float64, on a tiny random checkpoint; its README
says how.
Each test converts that THUDM-style checkpoint with `scripts/convert_checkpoint.py --arch chatglm-6b`,
loads the result with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and compares:
full-forward logits (fp32, atol 1e-4), logits of one cached decoding step, greedy and beam-search ids
(sequences, not scores: their length normalisation changed between transformers versions), for single
prompts and for a left-padded batch built the way THUDM's tokenizer pads. A second conversion reads the
same weights from THUDM-style `pytorch_model-0000N-of-00002.bin` shards written at test time and is
checked in a fresh process. THUDM's 1-D rotary variant (`position_encoding_2d: false`) must either match
THUDM too or be refused by the converter with a message naming the field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, TEST_DATA, assert_close, load_in_fresh_process, load_output
from safetensors.torch import load_file

MODEL_FILES = [
    REPO_ROOT / "modeling_glm.py",
    REPO_ROOT / "configuration_glm.py",
    REPO_ROOT / "scripts/converters/glm.py",
]
if not all(path.is_file() for path in MODEL_FILES):
    pytest.skip(
        "GLM model code or its chatglm-6b converter is not in the repository yet "
        f"(needs {', '.join(str(p.relative_to(REPO_ROOT)) for p in MODEL_FILES)})",
        allow_module_level=True,
    )

from transformers import AutoModelForCausalLM  # noqa: E402

DATA = TEST_DATA / "chatglm_reference"
GOLDEN_JSON = json.loads((DATA / "golden.json").read_text())
SINGLE_CASES = ["gmask", "mask_mid", "mask_and_gmask", "long_gmask"]
ATOL = 1e-4


def _convert(src: Path, dst: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts/convert_checkpoint.py"), "--arch", "chatglm-6b"]
        + ["--src", str(src), "--dst", str(dst), "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _convert_ok(src: Path, dst: Path) -> Path:
    proc = _convert(src, dst)
    assert proc.returncode == 0, f"conversion failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return dst


def _thudm_folder(folder: Path, **config_changes) -> Path:
    """A copy of the reference checkpoint folder (config.json + model.safetensors), config edited."""
    folder.mkdir(parents=True)
    config = json.loads((DATA / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(DATA / "model.safetensors", folder / "model.safetensors")
    return folder


def _thudm_bin_shards(folder: Path) -> Path:
    """The same weights as THUDM publishes them: two pytorch_model-*.bin shards plus the index."""
    folder.mkdir(parents=True)
    shutil.copy(DATA / "config.json", folder / "config.json")
    state = load_file(str(DATA / "model.safetensors"))
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
    shards["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "golden.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chatglm_ref")
    return _convert_ok(_thudm_folder(root / "src"), root / "dst")


@pytest.fixture(scope="module")
def model(converted):
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True)
    assert model.dtype == torch.float32
    return model.eval()


def _generate(model, kind: str, **inputs) -> torch.Tensor:
    kwargs = dict(GOLDEN_JSON["settings"][kind])
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return out.sequences if hasattr(out, "sequences") else out


def _real_positions(logits: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Logits of each row's real (non-padding) tokens: THUDM's logits at pad positions are meaningless
    (every key is masked there, so the softmax is uniform over the whole row)."""
    return [logits[i, attention_mask[i].bool()] for i in range(logits.shape[0])]


# ---------------------------------------------------------------------------------------------------
# Forward logits


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_logits_match_thudm(model, golden, case):
    ids = golden[f"pe2d.{case}.input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert_close(logits.float(), golden[f"pe2d.{case}.logits"], atol=ATOL, msg=f"logits, prompt {case}")


def test_left_padded_batch_logits_match_thudm(model, golden):
    ids, mask = golden["pe2d.padded.input_ids"], golden["pe2d.padded.attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, (ours, ref) in enumerate(
        zip(_real_positions(logits.float(), mask), _real_positions(golden["pe2d.padded.logits"], mask))
    ):
        assert_close(ours, ref, atol=ATOL, msg=f"left-padded batch, row {row}")


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_cached_step_logits_match_thudm(model, golden, case):
    """One decoding step on top of the prompt's key/value cache, fed through the model's own
    prepare_inputs_for_generation exactly as the golden step was fed through THUDM's."""
    ids, nxt = golden[f"pe2d.{case}.input_ids"], golden[f"pe2d.{case}.cached_step_input_ids"]
    full = torch.cat([ids, nxt], dim=1)
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        step_inputs = model.prepare_inputs_for_generation(
            full, past_key_values=first.past_key_values, attention_mask=torch.ones_like(full), use_cache=True
        )
        assert step_inputs["input_ids"].tolist() == nxt.tolist(), "only the new token should be fed"
        step = model(**step_inputs)
    assert_close(step.logits.float(), golden[f"pe2d.{case}.cached_step_logits"], atol=ATOL, msg=f"{case} cached")


# ---------------------------------------------------------------------------------------------------
# Generation (token ids)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@pytest.mark.parametrize("case", SINGLE_CASES)
def test_generation_matches_thudm(model, golden, case, kind):
    ids = _generate(model, kind, input_ids=golden[f"pe2d.{case}.input_ids"])
    assert ids.tolist() == golden[f"pe2d.{case}.{kind}"].tolist(), f"{kind} ids differ for prompt {case}"


@pytest.mark.parametrize("kind", ["greedy", "beam"])
def test_left_padded_batch_generation_matches_thudm(model, golden, kind):
    """Rows finish at different steps (two hit <eop> early and are then filled with the pad id)."""
    inputs = {"input_ids": golden["pe2d.padded.input_ids"], "attention_mask": golden["pe2d.padded.attention_mask"]}
    ids = _generate(model, kind, **inputs)
    assert ids.tolist() == golden[f"pe2d.padded.{kind}"].tolist(), f"{kind} ids differ for the left-padded batch"


# ---------------------------------------------------------------------------------------------------
# Fresh processes and the sharded .bin source


@pytest.mark.slow
def test_sharded_bin_checkpoint_matches_thudm_in_a_fresh_process(converted, golden, tmp_path):
    """THUDM's published layout (.bin shards + index) converts to the same tensors as the safetensors copy,
    and the result, loaded in a fresh process, generates THUDM's greedy ids for the left-padded batch."""
    dst = _convert_ok(_thudm_bin_shards(tmp_path / "src_bin"), tmp_path / "dst_bin")
    assert not list(dst.glob("*.bin")), "the converted folder must hold safetensors only"

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        files = sorted(folder.glob("*.safetensors"))
        assert files, f"no safetensors weights in {folder}"
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    from_bin, from_safetensors = weights(dst), weights(converted)
    assert from_bin.keys() == from_safetensors.keys()
    for name, tensor in from_safetensors.items():
        assert torch.equal(from_bin[name], tensor), f"{name} differs between the .bin and safetensors sources"

    inputs = {"input_ids": golden["pe2d.padded.input_ids"], "attention_mask": golden["pe2d.padded.attention_mask"]}
    out_file = tmp_path / "greedy.safetensors"
    load_in_fresh_process(
        dst, "AutoModelForCausalLM", inputs, out_file, method="generate", **GOLDEN_JSON["settings"]["greedy"]
    )
    assert load_output(out_file).tolist() == golden["pe2d.padded.greedy"].tolist(), "fresh-process greedy ids"


# ---------------------------------------------------------------------------------------------------
# position_encoding_2d=False (THUDM's 1-D rotary path over the whole head)


def test_position_encoding_1d_matches_thudm_or_is_refused(golden, tmp_path):
    """THUDM's code also runs with position_encoding_2d=False (1-D rotary over the full head dimension,
    context positions 0..n-1 and every generated token at the blank's position). The converter must
    either reproduce that, or refuse the checkpoint with an error that names the field."""
    src = _thudm_folder(tmp_path / "src_1d", position_encoding_2d=False)
    proc = _convert(src, tmp_path / "dst_1d")
    if proc.returncode != 0:
        assert "position_encoding_2d" in proc.stderr, f"unclear refusal of a 1-D checkpoint:\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, f"a 1-D checkpoint crashed the converter:\n{proc.stderr[-2000:]}"
        return
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst_1d", trust_remote_code=True).eval()
    for case in SINGLE_CASES:
        ids = golden[f"pe1d.{case}.input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert_close(logits.float(), golden[f"pe1d.{case}.logits"], atol=ATOL, msg=f"1-D rotary logits, {case}")
        greedy = _generate(model, "greedy", input_ids=ids)
        assert greedy.tolist() == golden[f"pe1d.{case}.greedy"].tolist(), f"1-D rotary greedy ids, {case}"
