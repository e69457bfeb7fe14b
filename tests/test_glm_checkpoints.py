"""Save/load tests of the GLM model in fresh processes: Auto classes, and checkpoints crossing transformers 4.57 <-> 5.x.

Loading through the Auto classes must happen in a fresh process (the dynamic-module cache hides missing files).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from fixtures import GMASK, MASK, left_pad, prompt
from fixtures import spread_glm as tiny_model
from helpers import REPO_ROOT, assert_close, fresh_env, run_fresh
from safetensors.torch import load_file, save_file

# Several random models (different seeds, sizes, blanks, padding) checked in ONE fresh process: the save/load
# property over a handful of examples without paying a process start for each.
VARIANTS = [
    dict(seed=1, overrides={}, rows=[prompt([5, 6, 7]) + [8], prompt([9]) + [10, 11, 12]]),
    dict(seed=2, overrides=dict(num_layers=3, hidden_size=48, num_attention_heads=4), rows=[prompt([5, 6, 7], MASK)]),
    dict(seed=3, overrides=dict(pre_seq_len=3, prefix_projection=True), rows=[prompt([20, 21, 22, 23], GMASK)]),
    dict(seed=4, overrides=dict(variant="glm"), rows=[prompt([5, 6, 7], MASK) + [8], prompt([9]) + [10, 11]]),
]

LOAD_ALL = """
import sys, json, torch, transformers
from safetensors.torch import load_file, save_file
out = {}
for i, folder in enumerate(sys.argv[1:]):
    inputs = load_file(folder + "/inputs.safetensors")
    for auto in ("AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
        model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            result = model(**inputs)
        out[f"{i}-{auto}"] = (result.logits if auto != "AutoModel" else result.last_hidden_state).contiguous()
        if auto != "AutoModel":
            assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr(), "untied"
    if i == 0:  # the AutoModelForCausalLM model
        out["0-generate"] = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2).contiguous()
save_file(out, folder + "/../out.safetensors")
print(json.dumps({"version": transformers.__version__}))
"""


def test_save_then_fresh_process_auto_load_gives_the_same_outputs(tmp_path):
    folders, expected = [], {}
    for i, variant in enumerate(VARIANTS):
        model = tiny_model(seed=variant["seed"], **variant["overrides"])
        ids, mask = left_pad(variant["rows"])
        folder = tmp_path / f"model{i}"
        model.save_pretrained(folder)
        save_file({"input_ids": ids, "attention_mask": mask}, str(folder / "inputs.safetensors"))
        with torch.no_grad():
            expected[f"{i}-AutoModelForCausalLM"] = model(ids, attention_mask=mask).logits
            expected[f"{i}-AutoModel"] = model.transformer(ids, attention_mask=mask).last_hidden_state
        expected[f"{i}-AutoModelForSeq2SeqLM"] = expected[f"{i}-AutoModelForCausalLM"]
        folders.append(str(folder))
    run_fresh(LOAD_ALL, *folders)
    actual = load_file(str(tmp_path / "out.safetensors"))
    for key, value in expected.items():  # logits reach ~20, where fp32 steps are 2e-6 and thread counts may differ
        assert_close(actual[key], value, atol=1e-5, rtol=1e-6, msg=key)
    # generate() in the fresh process (beam search, left-padded batch) gives the same ids as here
    ids, mask = left_pad(VARIANTS[0]["rows"])
    model = tiny_model(seed=VARIANTS[0]["seed"])
    expected_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=2)
    assert torch.equal(actual["0-generate"], expected_ids)


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint saved under one transformers major version loads under the other, head tied, and back.
# ---------------------------------------------------------------------------------------------------------------
OTHER = "tf4" if transformers.__version__.startswith("5.") else "tf5"
OTHER_PYTHON = REPO_ROOT / ".venv" / OTHER / "bin" / "python"

OTHER_SIDE = """
import sys, json, torch, transformers
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:3]
model = transformers.AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
inputs = load_file(src + "/../inputs.safetensors")
with torch.no_grad():
    logits = model(**inputs).logits
tied = model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
save_file({"logits": logits.contiguous()}, src + "/../other_logits.safetensors")
model.save_pretrained(dst)
print(json.dumps({"version": transformers.__version__, "tied": tied}))
"""


def run_other_version(code: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="fresh_") as scratch:
        proc = subprocess.run(
            [str(OTHER_PYTHON), "-c", textwrap.dedent(code), *args],
            cwd=scratch,
            env=fresh_env(Path(scratch) / "hf_home"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    if proc.returncode != 0:
        raise AssertionError(f"{OTHER} process failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON.is_file(), reason=f"the other transformers venv ({OTHER_PYTHON}) is absent")
def test_checkpoint_crosses_transformers_versions_both_ways(tmp_path):
    model = tiny_model(seed=4)
    ids, mask = left_pad([prompt([5, 6, 7]) + [8, 9], prompt([10, 11])])
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "inputs.safetensors"))
    model.save_pretrained(tmp_path / "here")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits

    report = json.loads(run_other_version(OTHER_SIDE, str(tmp_path / "here"), str(tmp_path / "there")).splitlines()[-1])
    assert report["version"].split(".")[0] != transformers.__version__.split(".")[0]
    assert report["tied"], f"lm_head not tied after loading a {transformers.__version__} checkpoint in {report}"
    assert_close(
        load_file(str(tmp_path / "other_logits.safetensors"))["logits"],
        expected,
        atol=1e-5,
        msg=f"saved by {transformers.__version__}, loaded by {report['version']}",
    )

    # and back: the other version's save loads here with the head tied
    back = type(model).from_pretrained(tmp_path / "there").eval()
    assert back.lm_head.weight.data_ptr() == back.transformer.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        assert_close(back(ids, attention_mask=mask).logits, expected, atol=1e-5, msg="round trip")
    saved_config = json.loads((tmp_path / "there" / "config.json").read_text())
    assert saved_config["model_type"] == "glm_infill" and "AutoModelForSeq2SeqLM" in saved_config["auto_map"]
    assert sys.executable != str(OTHER_PYTHON)
