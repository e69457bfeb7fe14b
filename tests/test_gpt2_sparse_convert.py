"""Conversion into the sparse GPT-2 model: transformers GPT-2 (--arch gpt2) and CogView (--arch cogview) through
scripts/convert_checkpoint.py, then loaded with the Auto classes in a fresh process."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types

import pytest
import torch
from fixtures import repo_module
from helpers import REPO_ROOT, assert_close, run_fresh
from safetensors.torch import load_file, save_file

FRESH_CODE = """
import json, sys, torch, transformers
from safetensors.torch import load_file, save_file
folder, in_file, out_file, gen_json = sys.argv[1:5]
inp = load_file(in_file)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__name__ == "GPT2SparseLMHeadModel" and type(base).__name__ == "GPT2SparseModel"
assert model.lm_head.weight.data_ptr() == model.model.word_embeddings.weight.data_ptr(), "head not tied"
out = {}
with torch.no_grad():
    out["logits"] = model(inp["ids"]).logits
    out["hidden"] = base(inp["ids"]).last_hidden_state
    for name, kw in json.loads(gen_json).items():
        if kw.pop("_padded", False):
            kw.update(input_ids=inp["padded"], attention_mask=inp["padded_mask"])
        else:
            kw.update(input_ids=inp["ids"])
        if "pivot_idx" in kw:
            kw["pivot_idx"] = torch.tensor(kw["pivot_idx"])
        torch.manual_seed(0)
        out[name] = model.generate(**kw)
save_file({k: v.contiguous() for k, v in out.items()}, out_file)
"""


def convert(arch: str, src, dst, *extra: str) -> types.SimpleNamespace:
    """Run scripts/convert_checkpoint.py's main() in-process (a subprocess would cost seconds of imports)."""
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import convert_checkpoint

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = convert_checkpoint.main(["--arch", arch, "--src", str(src), "--dst", str(dst), *extra])
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def run_converted(folder, tmp_path, inputs: dict, generations: dict) -> dict:
    in_file, out_file = tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(in_file))
    run_fresh(FRESH_CODE, str(folder), str(in_file), str(out_file), json.dumps(generations))
    return load_file(str(out_file))


GENERATIONS = {
    "greedy": {"max_new_tokens": 8, "do_sample": False},
    "beam": {"max_new_tokens": 6, "num_beams": 3, "do_sample": False},
    "sampled": {"max_new_tokens": 8, "do_sample": True, "top_k": 20},
    "batched": {"max_new_tokens": 6, "do_sample": False, "_padded": True},
}


def test_converted_gpt2_equals_transformers_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    gpt2 = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a misplaced tensor shows
        for name, p in gpt2.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    gpt2.save_pretrained(tmp_path / "gpt2")
    proc = convert("gpt2", tmp_path / "gpt2", tmp_path / "converted")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "gpt2_sparse" and config["auto_map"]["AutoModel"].endswith("GPT2SparseModel")
    assert (config["sandwich_ln"], config["pb_relax"]) == (False, False)

    ids = torch.randint(3, 99, (2, 7))
    padded = torch.randint(3, 99, (2, 7))
    padded_mask = torch.ones(2, 7, dtype=torch.long)
    padded[1, :3], padded_mask[1, :3] = 0, 0
    ours = run_converted(
        tmp_path / "converted", tmp_path, {"ids": ids, "padded": padded, "padded_mask": padded_mask}, GENERATIONS
    )
    with torch.no_grad():
        ref = gpt2(ids, output_hidden_states=True)
        assert_close(ours["logits"], ref.logits, atol=1e-5, msg="logits")
        assert_close(ours["hidden"], ref.hidden_states[-1], atol=1e-5, msg="base model hidden states")
        for name, kw in GENERATIONS.items():
            kw = dict(kw)
            if kw.pop("_padded", False):
                kw.update(input_ids=padded, attention_mask=padded_mask)
            else:
                kw.update(input_ids=ids)
            torch.manual_seed(0)
            expected = gpt2.generate(**kw)
            assert torch.equal(ours[name], expected), f"{name}: {ours[name].tolist()} != {expected.tolist()}"


def _import_ours():
    return repo_module("configuration_gpt2_sparse").GPT2SparseConfig, repo_module(
        "modeling_gpt2_sparse"
    ).GPT2SparseLMHeadModel


def cogview_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under CogView's names (model-parallel size 1), as CogView's GPT2Model.state_dict() has them."""
    sd = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("model.")
        sd[name if name.startswith("word_embeddings") else "transformer." + name] = tensor.clone()
    return sd


def test_convert_cogview_checkpoint(tmp_path):
    config_cls, model_cls = _import_ours()
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=80,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        max_position_embeddings=33,
        num_image_tokens=64,
        query_window=4,
        key_window_times=2,
        num_pivot=8,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.1,
    )
    model = model_cls(config).eval()
    src = tmp_path / "cogview" / "release"
    src.mkdir(parents=True)
    (tmp_path / "cogview" / "latest_checkpointed_iteration.txt").write_text("release")
    # A plain dict of tensors written at test time, never committed (the converter reads it with weights_only).
    torch.save({"module": cogview_state_dict(model)}, src / "mp_rank_00_model_states.pt")

    proc = convert("cogview", tmp_path / "cogview", tmp_path / "bad")
    assert proc.returncode == 2 and "--num-attention-heads" in proc.stderr
    proc = convert(
        "cogview",
        tmp_path / "cogview",
        tmp_path / "converted",
        "--num-attention-heads",
        "4",
        "--query-window",
        "4",
        "--key-window-times",
        "2",
        "--num-pivot",
        "8",
        "--num-image-tokens",
        "64",
    )
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert (saved["num_layers"], saved["hidden_size"], saved["max_position_embeddings"]) == (2, 32, 33)
    assert (saved["sandwich_ln"], saved["pb_relax"], saved["query_window"], saved["num_pivot"]) == (True, True, 4, 8)

    ids = torch.randint(0, 80, (2, 12))
    gens = {"greedy_sparse": {"max_new_tokens": 10, "do_sample": False, "is_sparse": 2, "pivot_idx": [[0, 2, 5]]}}
    ours = run_converted(
        tmp_path / "converted", tmp_path, {"ids": ids, "padded": ids.clone(), "padded_mask": torch.ones_like(ids)}, gens
    )
    with torch.no_grad():
        assert_close(ours["logits"], model(ids).logits, atol=1e-5, msg="converted CogView logits")
        expected = model.generate(
            ids, max_new_tokens=10, do_sample=False, is_sparse=2, pivot_idx=torch.tensor([[0, 2, 5]])
        )
    assert torch.equal(ours["greedy_sparse"], expected)


def test_convert_rejects_unplaced_and_misshapen_tensors(tmp_path):
    config_cls, model_cls = _import_ours()
    config = config_cls(
        vocab_size=80,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        num_image_tokens=64,
    )
    sd = cogview_state_dict(model_cls(config))
    sd["transformer.layers.0.attention.rotary.weight"] = torch.zeros(3)
    (tmp_path / "a").mkdir()
    torch.save({"module": sd}, tmp_path / "a" / "mp_rank_00_model_states.pt")
    proc = convert("cogview", tmp_path / "a", tmp_path / "out", "--num-attention-heads", "4")
    assert proc.returncode == 2 and "rotary" in proc.stderr, proc.stderr
    del sd["transformer.layers.0.attention.rotary.weight"]
    sd["transformer.layers.0.attention.dense.bias"] = torch.zeros(31)
    torch.save({"module": sd}, tmp_path / "a" / "mp_rank_00_model_states.pt")
    proc = convert("cogview", tmp_path / "a", tmp_path / "out", "--num-attention-heads", "4")
    assert proc.returncode == 2 and "dense.bias" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True)])
def test_convert_gpt2_rejects_unsupported_configs(tmp_path, field, value):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, **{field: value})
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g")
    proc = convert("gpt2", tmp_path / "g", tmp_path / "out")
    assert proc.returncode == 2 and field in proc.stderr, proc.stderr


def test_directly_built_config_saves_every_auto_class(tmp_path):
    import json

    from configuration_gpt2_sparse import GPT2SparseConfig

    GPT2SparseConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_image_tokens=32
    ).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_gpt2_sparse.GPT2SparseLMHeadModel"
    assert auto_map["AutoModel"] == "modeling_gpt2_sparse.GPT2SparseModel"
