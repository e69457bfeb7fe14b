"""BART-gen checkpoints on disk: conversion from transformers BART, fresh-process Auto loading, the pipeline,
and checkpoints crossing transformers versions (4.57 <-> 5.x, via the other virtual environment's python).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fixtures import repo_module
from helpers import REPO_ROOT, assert_close, fresh_env, run_fresh
from safetensors import safe_open
from transformers import BartConfig, BartForConditionalGeneration, BartModel, BartTokenizer

SIZES = dict(
    vocab_size=48, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40, dropout=0.0,
    init_std=0.2,
)  # fmt: skip
IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
OTHER_PYTHON = REPO_ROOT / ".venv" / ("tf4" if IS_V5 else "tf5") / "bin" / "python"


def _convert_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _repo_model_class():
    """BartGenForConditionalGeneration imported from the repository root (as a package: relative imports)."""
    return repo_module("modeling_bart_gen").BartGenForConditionalGeneration


def write_tiny_tokenizer(folder) -> None:
    """A real BartTokenizer over a 36-token byte-level BPE vocabulary (a-z . , Ġ and two merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.,", "Ġ", "th", "Ġt", "<mask>"]:
        vocab[piece] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nĠ t\n")
    BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


@pytest.fixture(scope="module")
def native_src(tmp_path_factory):
    """A transformers BART folder as an old hub checkpoint looks: generation params inside config.json."""
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("bart_src")
    native = BartForConditionalGeneration(BartConfig(**SIZES)).eval()
    with torch.no_grad():
        native.final_logits_bias.normal_(std=0.5)
    native.save_pretrained(src)
    write_tiny_tokenizer(src)
    config = json.loads((src / "config.json").read_text())
    config.update(forced_bos_token_id=0, num_beams=3, no_repeat_ngram_size=2, length_penalty=0.8)
    (src / "config.json").write_text(json.dumps(config))
    (src / "generation_config.json").unlink()
    return src, native


@pytest.fixture(scope="module")
def converted(native_src, tmp_path_factory):
    src, _ = native_src
    dst = tmp_path_factory.mktemp("bart_dst") / "converted"
    assert _convert_main()(["--arch", "bart", "--src", str(src), "--dst", str(dst)]) == 0
    return dst


def test_converted_folder_layout(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "bart_gen"
    assert config["tie_word_embeddings"] is True
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_bart_gen.BartGenForConditionalGeneration"
    assert config["auto_map"]["AutoModel"] == "modeling_bart_gen.BartGenModel"
    for key in ("forced_bos_token_id", "forced_eos_token_id", "num_beams", "no_repeat_ngram_size", "length_penalty"):
        assert key not in config, key
    generation = json.loads((converted / "generation_config.json").read_text())
    expected = dict(
        forced_bos_token_id=0, forced_eos_token_id=2, num_beams=3, no_repeat_ngram_size=2, length_penalty=0.8
    )
    assert {k: generation[k] for k in expected} == expected
    assert generation["decoder_start_token_id"] == 2 and generation["pad_token_id"] == 1
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.shared.weight" in keys and "final_logits_bias" in keys
    assert not keys & {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    for name in ("configuration_bart_gen.py", "modeling_bart_gen.py", "tokenizer_config.json"):
        assert (converted / name).is_file(), name


def test_generation_config_precedence(tmp_path):
    """SRC's generation_config.json wins; config.json's generation params and token ids fill the gaps."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from converters import bart as bart_converter

    src_config = {"model_type": "bart", "d_model": 32, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
                  "decoder_start_token_id": 2, "num_beams": 4, "max_length": 142, "force_bos_token_to_be_generated": True,
                  "task_specific_params": {"summarization": {"num_beams": 4}}}  # fmt: skip
    fields, from_config = bart_converter.split_config(
        src_config, bart_converter._import_code()[0].GENERATION_PARAMETERS
    )
    assert from_config == {"num_beams": 4, "max_length": 142, "forced_bos_token_id": 0}
    assert "num_beams" not in fields and "force_bos_token_to_be_generated" not in fields and "model_type" not in fields
    assert fields["tie_word_embeddings"] is True and "task_specific_params" in fields
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 6, "min_length": 56}))
    generation = bart_converter.build_generation_config(tmp_path, fields, from_config)
    assert generation["num_beams"] == 6 and generation["min_length"] == 56 and generation["max_length"] == 142
    assert generation["forced_bos_token_id"] == 0 and generation["decoder_start_token_id"] == 2


FRESH_LOAD = """
    import json, sys, torch, transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer
    folder, out = sys.argv[1:3]
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    enc = tok(["the cat sat.", "a hat."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    ids = model.generate(**enc, max_new_tokens=8)  # generation_config.json: 3 beams, no 2-gram repeats, forced BOS
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    text = tok.batch_decode(ids, skip_special_tokens=True)
    # 5.x removed the native task; config.json's custom_pipelines serves it on both versions
    pipe = transformers.pipeline("text2text-generation", model=folder, trust_remote_code=True)
    piped = [r["generated_text"] for r in pipe(["the cat sat.", "a hat."], max_new_tokens=8)]
    tied = model.lm_head.weight is model.model.shared.weight
    tensors = {"logits": logits, "ids": ids, "input_ids": enc.input_ids, "mask": enc.attention_mask}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print(json.dumps(dict(tied=tied, base=type(base).__name__, text=text, piped=piped)))
"""


def test_fresh_process_auto_load_generate_and_pipeline(native_src, converted, tmp_path):
    _, native = native_src
    report = json.loads(run_fresh(FRESH_LOAD, str(converted), str(tmp_path / "out.safetensors")).splitlines()[-1])
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
    assert report["tied"] and report["base"] == "BartGenModel"
    with torch.no_grad():
        expected = native(input_ids=out["input_ids"], attention_mask=out["mask"]).logits
    assert_close(out["logits"], expected, atol=1e-5, msg="converted vs native logits")
    # the parameters moved from config.json to generation_config.json are in force
    native_ids = native.generate(
        input_ids=out["input_ids"], attention_mask=out["mask"], max_new_tokens=8, num_beams=3,
        no_repeat_ngram_size=2, length_penalty=0.8, forced_bos_token_id=0, forced_eos_token_id=2,
    )  # fmt: skip
    assert torch.equal(out["ids"], native_ids)
    assert (out["ids"][:, 1] == 0).all()  # forced BOS
    assert report["piped"] == report["text"]


def test_base_model_checkpoint_converts(tmp_path):
    """A BartModel folder (keys without the `model.` prefix, no LM head) gets the head tied to `shared`."""
    torch.manual_seed(0)
    base = BartModel(BartConfig(**SIZES)).eval()
    base.save_pretrained(tmp_path / "src")
    assert _convert_main()(["--arch", "bart", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 0
    full = BartForConditionalGeneration(BartConfig(**SIZES)).eval()
    full.model.load_state_dict(base.state_dict())
    ours = _repo_model_class().from_pretrained(tmp_path / "dst").eval()
    assert ours.lm_head.weight is ours.model.shared.weight
    input_ids = torch.tensor([[0, 5, 9, 7, 2]])
    with torch.no_grad():
        assert_close(ours(input_ids=input_ids).logits, full(input_ids=input_ids).logits, atol=1e-5)


def test_conversion_errors_are_clear(native_src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src, _ = native_src
    convert = _convert_main()
    # an LM head that is not a copy of the shared embedding although the config ties them
    bad = tmp_path / "untied"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = torch.randn(SIZES["vocab_size"], SIZES["d_model"])
    save_file(tensors, str(bad / "model.safetensors"))
    assert convert(["--arch", "bart", "--src", str(bad), "--dst", str(tmp_path / "out1")]) == 2
    assert "tie_word_embeddings" in capsys.readouterr().err
    # a tensor with no place in BART
    tensors.pop("lm_head.weight")
    tensors["model.encoder.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(bad / "model.safetensors"))
    assert convert(["--arch", "bart", "--src", str(bad), "--dst", str(tmp_path / "out2")]) == 2
    assert "model.encoder.extra.weight" in capsys.readouterr().err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


SAVE_AND_LOAD = """
    import json, sys, torch, transformers
    source, save_to, seed, *to_load = sys.argv[1:]
    if save_to != "-":  # load the converted folder, give it new random weights, save it with this version
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source, trust_remote_code=True)
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.2)
        model.save_pretrained(save_to)
    report = {"version": transformers.__version__}
    for folder in to_load:
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[0, 5, 9, 7, 2]])).logits
        report[folder] = dict(tied=model.lm_head.weight is model.model.shared.weight, logits=logits.flatten().tolist())
    print(json.dumps(report))
"""


def _run_other(code: str, *args: str) -> str:
    import tempfile
    import textwrap

    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run(
            [str(OTHER_PYTHON), "-c", textwrap.dedent(code), *args], cwd=scratch, env=fresh_env(f"{scratch}/hf"),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON.is_file(), reason="the other transformers virtual environment is not built")
def test_checkpoints_cross_transformers_versions_with_head_tied(converted, tmp_path):
    """Saved by this version -> loaded by the other one, and saved by the other -> loaded by this one."""
    here, there = str(tmp_path / "here"), str(tmp_path / "there")
    run_fresh(SAVE_AND_LOAD, str(converted), here, "1")
    other = json.loads(_run_other(SAVE_AND_LOAD, str(converted), there, "2", here, there).splitlines()[-1])
    this = json.loads(run_fresh(SAVE_AND_LOAD, str(converted), "-", "0", here, there).splitlines()[-1])
    assert this["version"] != other["version"]
    for folder in (here, there):
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # one copy of the tied embedding
        assert this[folder]["tied"] and other[folder]["tied"], folder
        # an untied (randomly initialised) head in either version would make these differ
        assert_close(torch.tensor(this[folder]["logits"]), torch.tensor(other[folder]["logits"]), atol=1e-5, msg=folder)
    # the two saves hold different random weights, so each load really read its own file
    assert this[here]["logits"] != this[there]["logits"]


def test_module_docstrings_and_no_forbidden_calls():
    for name in ("configuration_bart_gen.py", "modeling_bart_gen.py"):
        text = (REPO_ROOT / name).read_text()
        assert text.startswith('"""'), name
        for forbidden in ("print(", "subprocess", "eval(", "exec(", "_reorder_cache("):
            assert forbidden not in text, (name, forbidden)
    assert sys.version_info >= (3, 10)
