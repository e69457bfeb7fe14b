"""`scripts/convert_checkpoint.py --arch chatglm-6b` / `--arch glm` on THUDM-style folders built at test time.

The command's main() runs in-process (the parity test runs the same command as a subprocess); the converted
folder is loaded in a fresh process.

(Parity with THUDM's own outputs on a converted checkpoint: tests/test_glm_reference_parity.py for ChatGLM-6B,
tests/test_glm_variant_parity.py for the GLM-10B family.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import pytest
import torch
from fixtures import GLM_TINY as TINY
from fixtures import left_pad, prompt
from fixtures import spread_glm as tiny_model
from helpers import REPO_ROOT, TOKENIZER_DATA, assert_close, code_files, load_in_fresh_process, load_output
from safetensors.torch import load_file, save_file

THUDM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def thudm_config(**changes) -> dict:
    """A THUDM chatglm-6b config.json for the tiny model (THUDM field names, no smask_token_id)."""
    config = {k: v for k, v in TINY.items() if k != "smask_token_id"}
    config.update(
        model_type="chatglm", architectures=["ChatGLMModel"], auto_map=THUDM_AUTO_MAP, torch_dtype="float16",
        position_encoding_2d=True, use_cache=True, transformers_version="4.23.1",
    )  # fmt: skip
    config.update(changes)
    return config


def thudm_state(model) -> dict[str, torch.Tensor]:
    """The tiny model's weights as THUDM's state_dict() has them: an explicit lm_head copy and inv_freq buffers."""
    state = {k: v.detach().clone().half() for k, v in model.state_dict().items()}
    for i in range(TINY["num_layers"]):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.tensor([1.0, 0.01]).half()
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    return state


def write_bin_shards(folder, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    names = list(state)
    weight_map = {}
    for s in range(shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        keys = names[s::shards]
        torch.save({k: state[k] for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def converter_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "scripts/convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def model():
    """The tiny model with fp16-representable weights (THUDM publishes float16 checkpoints)."""
    model = tiny_model()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def test_sharded_bin_folder_converts_and_loads_in_a_fresh_process(model, tmp_path):
    src = tmp_path / "chatglm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config()))
    write_bin_shards(src, thudm_state(model))
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst), "--dtype", "float32"]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "configuration_glm.py",
            "modeling_glm.py"} <= {p.name for p in dst.iterdir()}  # fmt: skip
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "glm_infill" and config["smask_token_id"] == TINY["gmask_token_id"] + 1
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_glm.GLMForConditionalGeneration"
    assert config["tie_word_embeddings"] is True
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == TINY["eos_token_id"] and generation["bos_token_id"] == TINY["bos_token_id"]
    weights = load_file(dst / "model.safetensors")
    assert "lm_head.weight" not in weights and not any("inv_freq" in k for k in weights)
    assert all(t.dtype == torch.float32 for t in weights.values())

    ids, mask = left_pad([prompt([5, 6, 7]) + [8], prompt([9, 10])])
    load_in_fresh_process(dst, "AutoModelForSeq2SeqLM", {"input_ids": ids, "attention_mask": mask},
                          tmp_path / "out.safetensors")  # fmt: skip
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    assert_close(load_output(tmp_path / "out.safetensors"), expected, atol=1e-5, msg="converted logits")


def test_safetensors_source_with_dtype_and_bare_keys(model, tmp_path, capsys):
    src = tmp_path / "chatglm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config()))
    state = thudm_state(model)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}  # a bare ChatGLMModel state dict
    save_file(state, src / "model.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16"]) == 0
    weights = load_file(dst / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert_close(weights["transformer.word_embeddings.weight"].float(),
                 model.transformer.word_embeddings.weight.bfloat16().float(), atol=0, msg="embeddings")  # fmt: skip
    config = json.loads((dst / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_tokenizer_files_are_written_when_src_has_ice_text(tmp_path):
    ice_text = TOKENIZER_DATA / "ice_text.model"
    if not ice_text.is_file():
        pytest.skip(f"{ice_text} is absent")
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))  # as convert_checkpoint.py does
    glm = importlib.import_module("converters.glm")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    assert glm.convert_chatglm_tokenizer(src, out) == []  # no ice_text.model: nothing written
    shutil.copy(ice_text, src / "ice_text.model")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"num_image_tokens": 0, "tokenizer_class": "ChatGLMTokenizer"})
    )
    (src / "config.json").write_text(json.dumps({"bos_token_id": 130004, "max_sequence_length": 2048}))
    written = glm.convert_chatglm_tokenizer(src, out)
    assert "tokenizer.model" in written
    assert (out / "tokenizer.model").read_bytes() == ice_text.read_bytes()
    if (REPO_ROOT / "tokenization_glm.py").is_file():
        tok_config = json.loads((out / "tokenizer_config.json").read_text())
        assert "AutoTokenizer" in tok_config["auto_map"]
        assert set(code_files("tokenization_glm.py")) <= set(written)  # the tokenizer's sibling modules too


BAD_SOURCES = [
    ("unknown tensor", dict(extra={"transformer.layers.0.attention.bogus.weight": torch.zeros(2)}),
     "have no place in the converted model: transformer.layers.0.attention.bogus.weight"),
    ("wrong shape", dict(replace={"transformer.final_layernorm.weight": torch.zeros(7)}),
     r"transformer.final_layernorm.weight has shape \[7\]"),
    ("missing tensor", dict(drop="transformer.layers.1.mlp.dense_4h_to_h.bias"),
     "missing from .*transformer.layers.1.mlp.dense_4h_to_h.bias"),
    ("quantised config", dict(config=dict(quantization_bit=4)), "quantization_bit"),
    ("1-D rotary", dict(config=dict(position_encoding_2d=False)), "position_encoding_2d"),
    ("not chatglm", dict(config=dict(model_type="glm")), "model_type 'chatglm'"),
    ("int8 weights", dict(replace={"transformer.layers.0.mlp.dense_h_to_4h.weight": torch.zeros(64, 16, dtype=torch.int8)}),
     "quantised weights"),
]  # fmt: skip


@pytest.mark.parametrize("case,change,message", BAD_SOURCES, ids=[c[0] for c in BAD_SOURCES])
def test_bad_sources_fail_with_a_clear_message(model, tmp_path, capsys, case, change, message):
    src = tmp_path / "chatglm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config(**change.get("config", {}))))
    state = thudm_state(model)
    state.update(change.get("extra", {}))
    state.update(change.get("replace", {}))
    state.pop(change.get("drop", ""), None)
    save_file(state, src / "model.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not dst.exists(), "a failed conversion must not leave a destination folder"


# ---------------------------------------------------------------------------------------------------------------
# --arch glm: THUDM/glm-* folders (GLM-10B family). Parity with GLM's own outputs: tests/test_glm_variant_parity.py.
# ---------------------------------------------------------------------------------------------------------------
GLM_DATA = REPO_ROOT / "tests" / "data" / "glm_reference"
GLM_FILES = ["config.json", "added_tokens.json", "tokenizer_config.json"]


def glm_folder(folder, config_changes: dict | None = None, state_changes: dict | None = None, drop=(), files=GLM_FILES):
    """A THUDM/glm-* style folder: the reference checkpoint's files, optionally edited."""
    folder.mkdir()
    for name in files:
        shutil.copy(GLM_DATA / name, folder / name)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    state = load_file(GLM_DATA / "model.safetensors")
    state.update(state_changes or {})
    for name in drop:
        state.pop(name)
    save_file(state, folder / "model.safetensors")
    return folder


def test_glm_folder_with_bare_keys_converts(tmp_path, capsys):
    """A bare GLMModel state dict (no `glm.` prefix) converts to the same tensors; bfloat16 on request."""
    state = load_file(GLM_DATA / "model.safetensors")
    bare = {k.removeprefix("glm."): v for k, v in state.items() if k.startswith("glm.")}
    src = glm_folder(tmp_path / "glm", drop=list(state))
    save_file(bare, src / "model.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "glm", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16"]) == 0
    weights = load_file(dst / "model.safetensors")
    assert "transformer.word_embeddings.weight" in weights and "dense.weight" not in weights
    assert weights["transformer.position_embeddings.weight"].shape == (65, 32)  # max_sequence_length + 1 rows
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    config = json.loads((dst / "config.json").read_text())
    assert config["variant"] == "glm" and config["inner_hidden_size"] == 4 * config["hidden_size"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (151, 152, 150)
    assert (config["mask_token_id"], config["gmask_token_id"], config["smask_token_id"]) == (154, 157, 158)
    assert config["embedding_dropout_prob"] == config["output_dropout_prob"] == 0.1
    assert "sequence-classification head" not in capsys.readouterr().err


def test_glm_token_ids_without_tokenizer_files_follow_glms_layouts(tmp_path, capsys):
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    glm = importlib.import_module("converters.glm")
    src = tmp_path / "glm-10b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "glm", "vocab_size": 50304}))
    ids, _ = glm.glm_token_ids(src, 50304)  # glm-10b / glm-2b: the English (GPT-2 BPE) layout
    assert (ids["<|startofpiece|>"], ids["<|endofpiece|>"], ids["[MASK]"], ids["[gMASK]"]) == (
        50257,
        50258,
        50260,
        50263,
    )
    assert "vocab_size 50304" in capsys.readouterr().err
    ids, _ = glm.glm_token_ids(src, 50048)  # glm-10b-chinese / glm-large-chinese
    assert (ids["<|endoftext|>"], ids["[MASK]"], ids["[sMASK]"], ids["[gMASK]"]) == (50000, 50003, 50008, 50009)


def test_glm_english_tokenizer_files_are_converted(tmp_path):
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from converters.tokenizer_files import convert_glm_tokenizer
    from transformers import AutoTokenizer

    src, out = tmp_path / "glm-10b", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    assert convert_glm_tokenizer(src, out) == []  # no vocabulary files: nothing written
    shutil.copy(TOKENIZER_DATA / "gpt2-vocab.json", src / "vocab.json")
    shutil.copy(TOKENIZER_DATA / "gpt2-merges.txt", src / "merges.txt")
    golden = json.loads((GLM_DATA / "tokenizer_en.json").read_text(encoding="utf-8"))
    (src / "tokenizer_config.json").write_text(json.dumps(golden["tokenizer_config"]))
    (src / "added_tokens.json").write_text(json.dumps(golden["added_tokens"]))
    written = convert_glm_tokenizer(src, out)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", *code_files("tokenization_glm.py")} <= set(written)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    case = golden["cases"][-3]
    assert tok(case["text"])["input_ids"] == case["ids"]
    (src / "added_tokens.json").write_text(json.dumps({**golden["added_tokens"], "[gMASK]": 50262}))
    with pytest.raises(ValueError, match=r"\[gMASK\]: 50262 in added_tokens.json, 50263 here"):
        convert_glm_tokenizer(src, tmp_path)


GLM_BAD_SOURCES = [
    ("not glm", dict(config=dict(model_type="chatglm")), "model_type 'glm'"),
    ("1-D positions", dict(config=dict(block_position_encoding=False)), "block_position_encoding=False"),
    ("relative", dict(config=dict(relative_encoding=True)), "relative_encoding=True"),
    ("attention_scale", dict(config=dict(attention_scale=2.0)), "attention_scale=2.0"),
    ("unknown tensor", dict(extra={"glm.transformer.layers.0.attention.bogus.weight": torch.zeros(2)}),
     "have no place in the converted model: glm.transformer.layers.0.attention.bogus.weight"),
    ("wrong shape", dict(extra={"glm.transformer.position_embeddings.weight": torch.zeros(64, 32)}),
     r"glm.transformer.position_embeddings.weight has shape \[64, 32\]"),
    ("missing tensor", dict(drop=["glm.transformer.block_position_embeddings.weight"]),
     "missing from .*transformer.block_position_embeddings.weight"),
    ("half a head", dict(drop=["out_proj.weight", "out_proj.bias"]), "incomplete classification head"),
    ("bert tokenizer", dict(tokenizer=dict(tokenizer_class="GLMBertTokenizer")), "GLMBertTokenizer.*not supported"),
    ("unknown layout", dict(files=["config.json"], config=dict(vocab_size=160)), "cannot tell the special-token ids"),
]  # fmt: skip


@pytest.mark.parametrize("case,change,message", GLM_BAD_SOURCES, ids=[c[0] for c in GLM_BAD_SOURCES])
def test_bad_glm_sources_fail_with_a_clear_message(tmp_path, capsys, case, change, message):
    src = glm_folder(
        tmp_path / "glm",
        change.get("config"),
        change.get("extra"),
        change.get("drop", ()),
        change.get("files", GLM_FILES),
    )
    if "tokenizer" in change:
        (src / "tokenizer_config.json").write_text(json.dumps(change["tokenizer"]))
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "glm", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not dst.exists(), "a failed conversion must not leave a destination folder"
