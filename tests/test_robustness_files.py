"""Damaged files: what a user sees when a model folder is truncated, corrupted, incomplete or points at the wrong code.

Every damaged folder is loaded through the Auto classes (trust_remote_code=True) in ONE fresh process (loading is
transformers' `from_pretrained`, which we do not control; the dynamic-module cache of this process must not hide
anything). Where transformers already fails clearly, the test pins that error; where it would half-load silently,
our classes' `from_pretrained` now refuses:
- weights of the model body missing from the checkpoint (transformers only warns and initialises them randomly:
  ChatGLM-6B#1159's NaN) -> ValueError naming the keys; new heads and the P-tuning prefix encoder may be missing;
- parameters or stored buffers (BART's `final_logits_bias`) holding NaN / inf (a corrupted file) -> ValueError
  naming them;
- a weight file safetensors cannot read (truncated, empty, corrupted header, a pickle under the safetensors name)
  or a tensor of another shape than the model's (4.57 names neither tensor nor file) -> ValueError naming the file
  and, for a shape, the tensor and both shapes.
What remains undetectable: corruption of the tensor bytes that still decodes to finite numbers (safetensors has no
checksum; hub downloads are verified by their sha256, local copies are not).

The convert command writes to a hidden temporary folder and renames it at the end: an interrupted conversion (Ctrl-C,
or a kill before the rename) never leaves a destination folder. tests/test_convert_common.py covers the damaged
*source* checkpoints (truncated safetensors, pickles with code, missing shards) given to the converter.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import bart_model, glm_model, sparse_model
from helpers import REPO_ROOT, code_files, fresh_env, run_fresh
from safetensors.torch import load, save_file

CODE_FILES = {
    "glm": code_files("configuration_glm.py", "modeling_glm.py"),
    "bart": code_files("configuration_bart_gen.py", "modeling_bart_gen.py"),
    "sparse": code_files("configuration_gpt2_sparse.py", "modeling_gpt2_sparse.py"),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", *code_files("tokenization_glm.py"))


class _Evil:
    """Unpickling this runs a shell command that leaves a marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save(model, folder: Path, family: str) -> Path:
    model.save_pretrained(folder)
    for name in CODE_FILES[family]:
        shutil.copy(REPO_ROOT / name, folder / name)  # what the converter ships next to the weights
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load((folder / "model.safetensors").read_bytes())  # from bytes: no mmap of a file we rewrite


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _variant(base: Path, root: Path, name: str, damage) -> Path:
    folder = root / name
    shutil.copytree(base, folder)
    damage(folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "auto_map":
            config["auto_map"].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _nan(key: str):
    def damage(folder: Path) -> None:
        tensors = _weights(folder)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        _rewrite(folder, tensors)

    return damage


def _drop(key: str):
    def damage(folder: Path) -> None:
        tensors = _weights(folder)
        del tensors[key]
        _rewrite(folder, tensors)

    return damage


def _narrow(key: str):
    def damage(folder: Path) -> None:
        tensors = _weights(folder)
        tensors[key] = tensors[key][:, : tensors[key].shape[1] // 2].contiguous()
        _rewrite(folder, tensors)

    return damage


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bad_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\x00" * 32
    (folder / "model.safetensors").write_bytes(bytes(data))


def _missing_shard(folder: Path) -> None:
    tensors = _weights(folder)
    names = sorted(tensors)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: tensors[k] for k in names[::2]}, str(folder / first), metadata={"format": "pt"})
    weight_map = {k: first if i % 2 == 0 else second for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def _pickle_named_safetensors(folder: Path) -> None:
    torch.save(_weights(folder), folder / "model.safetensors")


def _evil_pickle(marker: Path):
    def damage(folder: Path) -> None:
        tensors = _weights(folder)
        (folder / "model.safetensors").unlink()
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump({**tensors, "evil": _Evil(marker)}, f)

    return damage


def _other_family_class(folder: Path) -> None:
    for name in CODE_FILES["bart"]:
        shutil.copy(REPO_ROOT / name, folder / name)
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_bart_gen.BartGenForConditionalGeneration"})


def _tokenizer_folder(root: Path, name: str, vocab_bytes: bytes) -> Path:
    folder = root / name
    folder.mkdir()
    for file in TOKENIZER_FILES:
        shutil.copy(REPO_ROOT / file, folder / file)
    (folder / "tokenizer.model").write_bytes(vocab_bytes)
    return folder


# a file safetensors cannot read: our ValueError names it, its size and safetensors' own reason
SAFETENSORS_DAMAGE = r"the weight file \S+model\.safetensors cannot be read \(\d+ bytes: .*(?i:deserializ)"
# case -> (Auto class, from_pretrained kwargs, expected: ("error", exception type names, regex) or ("loads", class))
EXPECTED = {
    "glm truncated safetensors": ("AutoModelForCausalLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "glm corrupted header": ("AutoModelForCausalLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "glm empty weights file": ("AutoModelForCausalLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "glm pickle named model.safetensors": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), SAFETENSORS_DAMAGE),
    ),
    "glm NaN in a weight": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"NaN or inf values in transformer\.layers\.0\.attention\.dense\.weight"),
    ),
    "glm body weight missing": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"lacks 1 weight.*transformer\.layers\.1\.attention\.query_key_value\.weight"),
    ),
    "glm shard listed in the index missing": (
        "AutoModelForCausalLM",
        {},
        ("error", ("FileNotFoundError", "OSError"), r"model-00002-of-00002\.safetensors"),
    ),
    "glm shape mismatch": (
        "AutoModelForCausalLM",
        {},
        (
            "error",
            ("ValueError",),
            r"weight file \S+model\.safetensors holds transformer\.layers\.0\.mlp\.dense_h_to_4h\.weight of shape "
            r"\[64, 16\], but the model .* expects \[64, 32\]",
        ),
    ),
    "glm auto_map names a missing class": (
        "AutoModelForCausalLM",
        {},
        ("error", ("AttributeError",), r"has no attribute 'NoSuchModel'"),
    ),
    "glm auto_map names a missing module": (
        "AutoModelForCausalLM",
        {},
        ("error", ("OSError", "FileNotFoundError"), r"modeling_nothere\.py"),
    ),
    "glm auto_map names another family's class": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"config_class.*not consistent"),
    ),
    "glm config.json not JSON": ("AutoModelForCausalLM", {}, ("error", ("OSError",), r"not a valid JSON")),
    "glm pickle with code as pytorch_model.bin": (
        "AutoModelForCausalLM",
        {},
        ("error", ("UnpicklingError", "OSError"), r"(?i)weights only load failed|unable to load weights"),
    ),
    "glm new classification head (allowed)": (
        "AutoModelForSequenceClassification",
        {},
        ("loads", "GLMForSequenceClassification"),
    ),
    "glm P-tuning prefix not in the checkpoint (allowed)": (
        "AutoModelForCausalLM",
        {"pre_seq_len": 4},
        ("loads", "GLMForConditionalGeneration"),
    ),
    "bart truncated safetensors": ("AutoModelForSeq2SeqLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "bart body weight missing": (
        "AutoModelForSeq2SeqLM",
        {},
        ("error", ("ValueError",), r"lacks 1 weight.*model\.encoder\.layers\.0\.fc1\.weight"),
    ),
    "bart empty weights file": ("AutoModelForSeq2SeqLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "bart NaN in final_logits_bias (a buffer)": (
        "AutoModelForSeq2SeqLM",
        {},
        ("error", ("ValueError",), r"NaN or inf values in final_logits_bias"),
    ),
    "sparse truncated safetensors": ("AutoModelForCausalLM", {}, ("error", ("ValueError",), SAFETENSORS_DAMAGE)),
    "sparse shape mismatch": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"holds model\.layers\.1\.attention\.dense\.weight of shape \[32, 16\]"),
    ),
    "bart NaN in a weight": (
        "AutoModelForSeq2SeqLM",
        {},
        ("error", ("ValueError",), r"NaN or inf values in model\.decoder\.layers\.1\.fc2\.weight"),
    ),
    "sparse body weight missing": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"lacks 1 weight.*model\.layers\.0\.mlp\.dense_h_to_4h\.weight"),
    ),
    "sparse NaN in a weight": (
        "AutoModelForCausalLM",
        {},
        ("error", ("ValueError",), r"NaN or inf values in model\.layers\.1\.attention\.dense\.weight"),
    ),
    "tokenizer.model not SentencePiece": (
        "AutoTokenizer",
        {},
        ("error", ("ValueError",), r"vocab_file=.*is not a SentencePiece model"),
    ),
    "tokenizer.model a pickle": ("AutoTokenizer", {}, ("error", ("ValueError",), r"is not a SentencePiece model")),
}

LOAD_ALL = """
import json, sys, torch, transformers
transformers.logging.set_verbosity_error()
cases = json.loads(open(sys.argv[1]).read())
results = {}
for case, (auto_class, folder, kwargs) in cases.items():
    try:
        obj = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True, **kwargs)
    except BaseException as err:
        results[case] = {"error": type(err).__name__, "message": str(err)}
        continue
    finite = all(bool(torch.isfinite(p).all()) for p in getattr(obj, "parameters", lambda: [])())
    results[case] = {"loads": type(obj).__name__, "finite": finite}
print(json.dumps(results))
"""


def build_damaged_folders(root: Path, marker: Path) -> dict[str, Path]:
    glm = _save(glm_model(), root / "glm", "glm")
    bart = _save(bart_model(), root / "bart", "bart")
    sparse = _save(sparse_model(), root / "sparse", "sparse")
    qkv = "transformer.layers.1.attention.query_key_value.weight"
    mlp = "transformer.layers.0.mlp.dense_h_to_4h.weight"

    def shape_mismatch(folder: Path) -> None:
        tensors = _weights(folder)
        tensors[mlp] = tensors[mlp][:, :16].contiguous()
        _rewrite(folder, tensors)

    damages = {
        "glm truncated safetensors": (glm, _truncate),
        "glm corrupted header": (glm, _bad_header),
        "glm empty weights file": (glm, lambda f: (f / "model.safetensors").write_bytes(b"")),
        "glm pickle named model.safetensors": (glm, _pickle_named_safetensors),
        "glm NaN in a weight": (glm, _nan("transformer.layers.0.attention.dense.weight")),
        "glm body weight missing": (glm, _drop(qkv)),
        "glm shard listed in the index missing": (glm, _missing_shard),
        "glm shape mismatch": (glm, shape_mismatch),
        "glm auto_map names a missing class": (
            glm,
            lambda f: _edit_config(f, auto_map={"AutoModelForCausalLM": "modeling_glm.NoSuchModel"}),
        ),
        "glm auto_map names a missing module": (
            glm,
            lambda f: _edit_config(
                f, auto_map={"AutoModelForCausalLM": "modeling_nothere.GLMForConditionalGeneration"}
            ),
        ),
        "glm auto_map names another family's class": (glm, _other_family_class),
        "glm config.json not JSON": (glm, lambda f: (f / "config.json").write_text('{"model_type": "glm_infill", ')),
        "glm pickle with code as pytorch_model.bin": (glm, _evil_pickle(marker)),
        "glm new classification head (allowed)": (glm, lambda f: None),
        "glm P-tuning prefix not in the checkpoint (allowed)": (glm, lambda f: None),
        "bart truncated safetensors": (bart, _truncate),
        "bart body weight missing": (bart, _drop("model.encoder.layers.0.fc1.weight")),
        "bart NaN in a weight": (bart, _nan("model.decoder.layers.1.fc2.weight")),
        "bart empty weights file": (bart, lambda f: (f / "model.safetensors").write_bytes(b"")),
        "bart NaN in final_logits_bias (a buffer)": (bart, _nan("final_logits_bias")),
        "sparse truncated safetensors": (sparse, _truncate),
        "sparse shape mismatch": (sparse, _narrow("model.layers.1.attention.dense.weight")),
        "sparse body weight missing": (sparse, _drop("model.layers.0.mlp.dense_h_to_4h.weight")),
        "sparse NaN in a weight": (sparse, _nan("model.layers.1.attention.dense.weight")),
    }
    folders = {}
    for i, (case, (base, damage)) in enumerate(damages.items()):
        folders[case] = _variant(base, root, f"case{i:02d}", damage)
    folders["tokenizer.model not SentencePiece"] = _tokenizer_folder(root, "tok_text", b"this is not a model")
    folders["tokenizer.model a pickle"] = _tokenizer_folder(root, "tok_pickle", pickle.dumps({"pieces": [1, 2]}))
    return folders


@pytest.mark.slow
def test_damaged_folders_fail_clearly_and_nothing_half_loads(tmp_path):
    marker = tmp_path / "PICKLE_CODE_RAN"
    folders = build_damaged_folders(tmp_path / "folders", marker)
    assert set(folders) == set(EXPECTED)
    cases = {case: (auto, str(folders[case]), kwargs) for case, (auto, kwargs, _) in EXPECTED.items()}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    results = json.loads(run_fresh(LOAD_ALL, str(tmp_path / "cases.json")).strip().splitlines()[-1])

    problems = []
    for case, (_, _, expected) in EXPECTED.items():
        got = results[case]
        if expected[0] == "loads":
            if got.get("loads") != expected[1] or not got.get("finite"):
                problems.append(f"{case}: expected a finite {expected[1]}, got {got}")
        elif got.get("error") not in expected[1] or not re.search(expected[2], got.get("message", ""), re.S):
            problems.append(f"{case}: expected {expected[1]} matching {expected[2]!r}, got {got}")
    assert not problems, "\n".join(problems)
    assert not marker.exists(), "unpickling the checkpoint ran code"


# ---------------------------------------------------------------------------------------------------- convert command
def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


KILLED_BEFORE_RENAME = """
import os, pathlib, signal, sys
sys.path.insert(0, sys.argv[1])
import convert_checkpoint
rename = pathlib.Path.rename
def kill_before_rename(self, target):
    if ".partial-" in self.name:  # the finished temporary folder is about to become the destination
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
pathlib.Path.rename = kill_before_rename
convert_checkpoint.main(["--arch", "gpt2", "--src", sys.argv[2], "--dst", sys.argv[3]])
"""


def test_a_conversion_killed_before_the_end_leaves_no_destination(tmp_path):
    src, dst = _tiny_gpt2(tmp_path / "src"), tmp_path / "out" / "converted"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RENAME, str(REPO_ROOT / "scripts"), str(src), str(dst)],
        env=fresh_env(tmp_path / "hf_home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not dst.exists(), "a killed conversion left a destination folder"
    leftovers = [p.name for p in dst.parent.iterdir()]
    assert all(name.startswith(".converted.partial-") for name in leftovers), leftovers  # hidden and named partial
    # the leftover does not block a new conversion, which completes normally
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import convert_checkpoint

    assert convert_checkpoint.main(["--arch", "gpt2", "--src", str(src), "--dst", str(dst)]) == 0
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()


def test_an_interrupted_conversion_cleans_up(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import convert_checkpoint
    from converters import common

    src, dst = _tiny_gpt2(tmp_path / "src"), tmp_path / "out" / "converted"
    added = []

    def add_then_interrupt(self, name, tensor):
        added.append(name)
        if len(added) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights
        return add(self, name, tensor)

    add = common.SafetensorsWriter.add
    monkeypatch.setattr(common.SafetensorsWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint.main(["--arch", "gpt2", "--src", str(src), "--dst", str(dst)])
    assert len(added) == 3
    assert list(dst.parent.iterdir()) == [], "an interrupted conversion left files behind"
