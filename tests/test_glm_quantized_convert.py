"""`convert_checkpoint.py --arch chatglm-6b` on THUDM's int4 / int8 checkpoints (THUDM/chatglm-6b-int4, -int8).

The quantized folders are built here, in THUDM's storage format as documented (read from THUDM's
quantization.py and quantization_kernels.c; nothing of theirs is copied):
- the four linear layers of every block (`attention.query_key_value`, `attention.dense`, `mlp.dense_h_to_4h`,
  `mlp.dense_4h_to_h`) hold `weight` (int8) and `weight_scale` (float16, one per output row,
  absmax(row) / (2**(bits - 1) - 1)); embeddings, LayerNorms and biases stay float16;
- int8: weight = round(w / scale); int4: the same rounded values (clipped to [-8, 7]) packed two per byte
  along the input dimension, input column 2j in the byte's high nibble, 2j + 1 in its low nibble, each a
  two's-complement 4-bit number.
`pack_int4` below is written from that description with plain integer arithmetic on Python ints (the converter
unpacks with tensor bit operations, independently), and is itself checked against hand-made bytes and a round trip.

The reference for the converted logits is THUDM's dequantized math, `weight_int * weight_scale` in float32, put
into our fp32 model: the converted (float32) folder must give the same logits in a fresh process.

`--keep-quantized` (transformers 5.x; the int4, int8 and a float16 source, in bfloat16 and float32): the folder holds
the ordinary conversion's files byte for byte apart from the weights (int8 on disk) and config.json (plus
`quantization_config`); loaded in a fresh process through AutoModelForCausalLM with no extra argument, every linear
layer of the body is a torchao `Int8Tensor` (int8 `qdata`, one float32 scale per row) holding THUDM's own integers
and scales, the logits are close to the ordinary conversion's and to THUDM's math (bounds at the test), greedy
generation runs, and the float16 source's tokenizer turns text into text. On transformers 4.x the flag is refused
before the source is read; without torchao, and with another --arch, it is refused with a message too.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
import transformers
from fixtures import GLM_TINY as TINY
from fixtures import GMASK, SOP, left_pad, prompt
from fixtures import spread_glm as tiny_model
from helpers import REPO_ROOT, TOKENIZER_DATA, assert_close, load_in_fresh_process, load_output, run_fresh
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_glm_converter import converter_main, thudm_config

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from converters.glm import dequantize_thudm  # noqa: E402

QUANTIZED = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's symmetric per-row quantization: (int values as int8, float16 scale)."""
    scale = (weight.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
    values = torch.round(weight / scale.float()[:, None])
    if bits == 4:
        values = values.clamp(-8, 7)
    return values.to(torch.int8), scale


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[out, in] ints in [-8, 7] -> [out, in / 2] int8 bytes: column 2j in the high nibble, 2j + 1 in the low one."""
    rows = []
    for row in values.tolist():
        packed = []
        for j in range(0, len(row), 2):
            byte = ((row[j] % 16) << 4) | (row[j + 1] % 16)  # Python's % gives the two's-complement nibble
            packed.append(byte - 256 if byte >= 128 else byte)  # the same byte read as a signed int8
        rows.append(packed)
    return torch.tensor(rows, dtype=torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4, on Python ints (for the round-trip check)."""
    rows = []
    for row in packed.tolist():
        values = []
        for byte in row:
            byte %= 256
            for nibble in (byte >> 4, byte & 15):
                values.append(nibble - 16 if nibble >= 8 else nibble)
        rows.append(values)
    return torch.tensor(rows, dtype=torch.int8)


def test_int4_packing_follows_the_documented_layout():
    # hand-made bytes: (-8, 7) -> 0x87, (7, -8) -> 0x78, (-1, 1) -> 0xF1, (0, -1) -> 0x0F
    values = torch.tensor([[-8, 7, 7, -8], [-1, 1, 0, -1]])
    expected = torch.tensor([[0x87 - 256, 0x78], [0xF1 - 256, 0x0F]], dtype=torch.int8)
    assert torch.equal(pack_int4(values), expected)
    every = torch.arange(-8, 8).repeat(3, 2)[:, torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(unpack_int4(pack_int4(every)), every.to(torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
def test_converter_dequantizes_hand_made_rows(bits):
    values = torch.tensor([[-8, 7, 1, -1], [3, -2, 0, 5]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25], dtype=torch.float16)
    stored = pack_int4(values) if bits == 4 else values
    got = dequantize_thudm("w", stored, scale, bits, in_features=4)
    expected = torch.tensor([[-4.0, 3.5, 0.5, -0.5], [0.75, -0.5, 0.0, 1.25]])
    assert torch.equal(got, expected)


def thudm_quantized_state(model, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(THUDM's quantized state dict of `model`, THUDM's dequantized float32 weights of the quantized layers)."""
    state, dequantized = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".", 3)[-1] in QUANTIZED:
            values, scale = quantize_rows(tensor.float(), bits)
            state[name] = pack_int4(values) if bits == 4 else values
            state[module + ".weight_scale"] = scale
            dequantized[name] = values.float() * scale.float()[:, None]
        else:
            state[name] = tensor.detach().clone().half()
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    return state, dequantized


@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_quantized_folder_converts_to_thudms_dequantized_math(bits, tmp_path):
    model = tiny_model()
    state, dequantized = thudm_quantized_state(model, bits)
    src = tmp_path / f"chatglm-6b-int{bits}"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config(quantization_bit=bits)))
    names = sorted(state)  # two shards, a weight and its scale may land in different ones
    save_file({k: state[k] for k in names[::2]}, src / "model-1.safetensors")
    save_file({k: state[k] for k in names[1::2]}, src / "model-2.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst), "--dtype", "float32"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_bit" not in config or config["quantization_bit"] in (0, None)
    weights = load_file(dst / "model.safetensors")
    assert not any(k.endswith("weight_scale") for k in weights)

    reference = tiny_model()  # THUDM's math: float16 tensors as stored, quantized layers as int * scale
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            tensor.copy_(dequantized[name] if name in dequantized else state[name].float())
    for name, expected in dequantized.items():
        assert torch.equal(weights[name], expected), name
    ids, mask = left_pad([prompt([5, 6, 7]) + [8], prompt([9, 10])])
    load_in_fresh_process(dst, "AutoModelForSeq2SeqLM", {"input_ids": ids, "attention_mask": mask},
                          tmp_path / "out.safetensors")  # fmt: skip
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    assert_close(load_output(tmp_path / "out.safetensors"), expected, atol=1e-5, msg=f"int{bits} converted logits")


def test_default_dtype_of_a_quantized_conversion_is_bfloat16(tmp_path):
    model = tiny_model()
    state, dequantized = thudm_quantized_state(model, 8)
    src = tmp_path / "chatglm-6b-int8"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config(quantization_bit=8)))
    save_file(state, src / "model.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst)]) == 0
    weights = load_file(dst / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    name = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    assert torch.equal(weights[name], dequantized[name].bfloat16())  # one rounding of the exact product


QUANTIZED_BAD = [
    ("missing scale", 4, lambda s: s.pop("transformer.layers.0.attention.dense.weight_scale"),
     "transformer.layers.0.attention.dense.weight_scale is missing"),
    ("int4 shape", 4, lambda s: s.update({"transformer.layers.0.attention.dense.weight": torch.zeros(32, 32, dtype=torch.int8)}),
     r"4-bit THUDM weight must be int8 of shape \[32, 16\]"),
    ("bit width", 3, lambda s: None, "quantization_bit must be 0, 4 or 8"),
]  # fmt: skip


@pytest.mark.parametrize("case,bits,change,message", QUANTIZED_BAD, ids=[c[0] for c in QUANTIZED_BAD])
def test_bad_quantized_sources_fail_with_a_clear_message(tmp_path, capsys, case, bits, change, message):
    state, _ = thudm_quantized_state(tiny_model(), 4)
    change(state)
    src = tmp_path / "chatglm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(thudm_config(quantization_bit=bits)))
    save_file(state, src / "model.safetensors")
    dst = tmp_path / "converted"
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------ --keep-quantized
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
needs_5x = pytest.mark.skipif(
    TRANSFORMERS_4, reason="--keep-quantized needs transformers 5.x (4.x: see the refusal test)"
)

KEEP_SCRIPT = """
import json, os, sys, torch, transformers
from safetensors.torch import load_file, save_file

quantized, plain, in_file, out_file = sys.argv[1:5]
inputs = load_file(in_file)
tensors, report, models = {}, {}, {}
for name, folder in (("quantized", quantized), ("plain", plain)):
    model = models[name] = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        tensors[name + "_logits"] = model(**inputs).logits.float()
        tensors[name + "_greedy"] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    report[name + "_dtype"] = str(model.dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report[name + "_types"] = {n: type(m.weight).__name__ for n, m in linears.items()}
    if name == "quantized":
        config = model.config.quantization_config
        report["quant_method"] = config["quant_method"] if isinstance(config, dict) else config.quant_method
        for n, m in linears.items():
            if hasattr(m.weight, "qdata"):
                tensors[n + ".qdata"] = m.weight.qdata.contiguous()
                tensors[n + ".scale"] = m.weight.scale.float().contiguous()
if os.path.isfile(os.path.join(quantized, "tokenizer_config.json")):  # text in, text out, all from the folder
    tok = transformers.AutoTokenizer.from_pretrained(quantized, trust_remote_code=True)
    batch = tok(["你好", "Hello world"], return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = models["quantized"].generate(**batch, max_new_tokens=4, do_sample=False)
    report["text_prompt_ids"] = batch["input_ids"].tolist()
    report["text_generated_ids"] = generated.tolist()
    report["text"] = tok.batch_decode(generated[:, batch["input_ids"].shape[1]:])
save_file(tensors, out_file)
print(json.dumps(report))
"""
# The float16 source carries ChatGLM-6B's real tokenizer (tests/data/tokenizers/ice_text.model), so its model has
# ChatGLM-6B's vocabulary size and special-token ids (the THUDM "slim" layout); the int4 / int8 ones the tiny ids.
CHATGLM_IDS = dict(
    vocab_size=130528, bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001,
    smask_token_id=130002, pad_token_id=3,
)  # fmt: skip


def thudm_source(tmp_path, bits: int):
    """A THUDM-format chatglm-6b folder of the tiny model: int4 / int8 (`bits`), or float16 (`bits` 0, with
    ChatGLM-6B's tokenizer); returns (folder, {quantized weight name: (THUDM's integers, THUDM's float16 row
    scales)}, the tiny model in float32 holding what THUDM's code computes with: int * scale for the quantized
    layers, the float16 tensors elsewhere)."""
    ids = {} if bits else CHATGLM_IDS
    model = tiny_model(**ids)
    src = tmp_path / (f"chatglm-6b-int{bits}" if bits else "chatglm-6b")
    src.mkdir()
    thudm, dequantized = {}, {}
    if bits:
        state, dequantized = thudm_quantized_state(model, bits)
        for name, tensor in state.items():
            scale = state.get(name.removesuffix(".weight") + ".weight_scale")
            if scale is not None and name.endswith(".weight"):
                thudm[name] = (unpack_int4(tensor) if bits == 4 else tensor, scale)
        config = thudm_config(quantization_bit=bits)
    else:
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        config = thudm_config(**{k: v for k, v in ids.items() if k != "smask_token_id"})
        shutil.copy(TOKENIZER_DATA / "ice_text.model", src / "ice_text.model")
        (src / "tokenizer_config.json").write_text(
            json.dumps({"num_image_tokens": 0, "tokenizer_class": "ChatGLMTokenizer"})
        )
    (src / "config.json").write_text(json.dumps(config))
    save_file(state, src / "model.safetensors")
    reference = tiny_model(**ids)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            tensor.copy_(dequantized[name] if name in dequantized else state[name].float())
    return src, thudm, reference


def convert(src, dst, *flags) -> None:
    assert converter_main()(["--arch", "chatglm-6b", "--src", str(src), "--dst", str(dst), *flags]) == 0


@needs_5x
@pytest.mark.parametrize(
    "bits,dtype",
    [(8, None), (4, None), (8, "float32"), (4, "float32"), (0, None)],
    ids=["int8", "int4", "int8-float32", "int4-float32", "float16"],
)
def test_keep_quantized_saves_torchao_int8_that_loads_quantized(tmp_path, bits, dtype):
    src, thudm, reference = thudm_source(tmp_path, bits)
    flags = ["--dtype", dtype] if dtype else []
    plain, quantized = tmp_path / "plain", tmp_path / "quantized"
    convert(src, plain, *flags)
    convert(src, quantized, *flags, "--keep-quantized")
    assert not list(tmp_path.glob(".*partial*")) and not (quantized / "dequantized").exists()

    # the folder: the same files as the ordinary conversion, byte for byte except weights and config.json
    files = {p.name for p in quantized.iterdir()}
    assert files == {p.name for p in plain.iterdir()}, files ^ {p.name for p in plain.iterdir()}
    assert {"generation_config.json", "modeling_glm.py", "configuration_glm.py"} <= files
    if not bits:
        assert {"tokenizer.model", "tokenizer_config.json", "tokenization_glm.py"} <= files
    for name in sorted(files - {"config.json", "model.safetensors"}):
        assert (quantized / name).read_bytes() == (plain / name).read_bytes(), name
    config, plain_config = (json.loads((f / "config.json").read_text()) for f in (quantized, plain))
    assert config.pop("quantization_config")["quant_method"] == "torchao"
    assert config == plain_config
    with safe_open(str(quantized / "model.safetensors"), "pt") as f:  # int8 on disk: torchao's flattened tensors
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for layer in QUANTIZED:
        assert stored[f"transformer.layers.0.{layer}._weight_qdata"] == "I8", stored
        assert f"transformer.layers.0.{layer}.weight" not in stored
    assert (quantized / "model.safetensors").stat().st_size < (plain / "model.safetensors").stat().st_size

    gmask, sop = (GMASK, SOP) if bits else (CHATGLM_IDS["gmask_token_id"], CHATGLM_IDS["bos_token_id"])
    ids, mask = left_pad([[5, 6, 7, gmask, sop, 8], [9, 10, gmask, sop]])
    in_file = tmp_path / "inputs.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(in_file))
    report = json.loads(
        run_fresh(KEEP_SCRIPT, quantized, plain, in_file, tmp_path / "out.safetensors").strip().splitlines()[-1]
    )
    out = load_file(tmp_path / "out.safetensors")

    # loaded with no extra argument, every linear layer of the body holds torchao's int8 tensor
    assert report["quant_method"] == "torchao"
    body = {n: t for n, t in report["quantized_types"].items() if n != "lm_head"}
    assert len(body) == 4 * TINY["num_layers"] and set(body.values()) == {"Int8Tensor"}, report["quantized_types"]
    assert report["quantized_types"]["lm_head"] != "Int8Tensor"  # tied to the float word embeddings
    assert "Int8Tensor" not in report["plain_types"].values()
    expected_dtype = dtype or ("bfloat16" if bits else "float16")  # a quantized source: bfloat16 by default
    assert report["quantized_dtype"] == report["plain_dtype"] == f"torch.{expected_dtype}"
    plain_weights = load_file(plain / "model.safetensors")
    roundoff = {"bfloat16": 2**-8, "float16": 2**-11, "float32": 2**-24}[expected_dtype]
    for name in body:
        qdata, scale = out[name + ".qdata"], out[name + ".scale"]
        assert qdata.dtype == torch.int8 and scale.shape == (qdata.shape[0], 1), (name, qdata.dtype, scale.shape)
        if bits:  # THUDM's own integers and float16 row scales, kept (int4 values stored one per int8)
            integers, thudm_scale = thudm[name + ".weight"]
            assert torch.equal(qdata, integers), name
            assert torch.equal(scale, thudm_scale.float()[:, None]), name
        else:
            # torchao's symmetric per-row int8 of the float16 weights: scale = absmax(row) / 127.5, computed in the
            # weights' dtype, so every weight is within half a step of the converted one, plus up to 127.5 rounding
            # units of that dtype in the scale
            error = (qdata.float() * scale - plain_weights[name + ".weight"].float()).abs()
            bound = (0.5 + 128 * roundoff) * scale * (1 + 1e-5)  # 1e-5: float32 rounding of our check's product
            assert bool((error <= bound).all()), (name, float((error / scale).max()))

    # logits, against the ordinary (dequantized) conversion's, both loaded the same way, and against THUDM's math in
    # float32 (`reference`: int * scale for the quantized layers, the float16 tensors elsewhere):
    # - every case: int8 weight-only moves a weight by at most half a step (absmax(row) / 255, 0.4% of the row's
    #   largest weight); tests/test_quantization.py bounds the logits of such a model by 5% of their largest
    #   magnitude, and so do we (measured: float16 source 1.2%, THUDM sources in bfloat16 1.3-1.7%: there the weights
    #   are the same and the difference is bfloat16 rounding, amplified by the tiny model's spread weights);
    # - THUDM int4 / int8 in float32: the same weights (int * scale); torchao computes (x @ int) * scale where the
    #   ordinary model computes x @ (int * scale), which agree to float32 rounding: 1e-5 (measured 3e-7, 5e-7);
    # - THUDM int4 / int8 in bfloat16: keeping the quantization costs no more than writing the weights in bfloat16
    #   does: the distance to THUDM's float32 math is at most 1.5 x the dequantized bfloat16 conversion's (measured
    #   1.15 x, 1.16 x; the two round in different places, so they are not equal).
    scale = float(out["plain_logits"].abs().max())
    with torch.no_grad():
        thudm_logits = reference(ids, attention_mask=mask).logits
    assert_close(out["quantized_logits"], out["plain_logits"], atol=0.05 * scale, msg=f"int{bits} logits")
    if bits and dtype == "float32":
        assert_close(out["quantized_logits"], thudm_logits, atol=1e-5 * scale, msg=f"int{bits} vs THUDM's math")
        assert torch.equal(out["quantized_greedy"], out["plain_greedy"])
    elif bits:
        kept, dequantized = ((out[k] - thudm_logits).abs().max() for k in ("quantized_logits", "plain_logits"))
        assert kept <= 1.5 * dequantized, (float(kept / scale), float(dequantized / scale))
    else:
        assert not torch.equal(out["quantized_logits"], out["plain_logits"]), "not quantized at all?"

    # greedy generation: the prompt kept, new tokens, the first one the argmax of the quantized forward pass
    greedy = out["quantized_greedy"]
    assert greedy.shape[0] == 2 and ids.shape[1] < greedy.shape[1] <= ids.shape[1] + 6
    assert torch.equal(greedy[:, : ids.shape[1]], ids)
    assert torch.equal(greedy[:, ids.shape[1]], out["quantized_logits"][:, -1].argmax(-1))
    if not bits:  # the tokenizer files came along: text in, text out
        prompt_ids, generated = report["text_prompt_ids"], report["text_generated_ids"]
        assert all(g[: len(p)] == p and len(p) < len(g) for p, g in zip(prompt_ids, generated)), report
        assert len(report["text"]) == 2 and all(isinstance(t, str) for t in report["text"]), report["text"]


def refused(tmp_path, capsys, argv) -> str:
    """Run the command expecting the clear refusal (exit 2, no traceback, nothing left behind); return stderr."""
    dst = tmp_path / "converted"
    assert converter_main()([*argv, "--dst", str(dst), "--keep-quantized"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not dst.exists() and not list(tmp_path.glob(".*partial*"))
    return err


@pytest.mark.skipif(not TRANSFORMERS_4, reason="the transformers 4.x refusal")
def test_keep_quantized_is_refused_up_front_on_transformers_4(tmp_path, capsys):
    src, _, _ = thudm_source(tmp_path, 8)
    (src / "model.safetensors").unlink()  # refused before the source is read: no complaint about missing weights
    err = refused(tmp_path, capsys, ["--arch", "chatglm-6b", "--src", str(src)])
    assert f"--keep-quantized needs transformers 5.x (installed: {transformers.__version__})" in err, err
    assert "only as a pickle" in err and "quantization_config=TorchAoConfig(Int8WeightOnlyConfig())" in err, err


@needs_5x
def test_keep_quantized_without_torchao_names_the_extra(tmp_path, capsys, monkeypatch):
    src, _, _ = thudm_source(tmp_path, 8)
    monkeypatch.setitem(sys.modules, "torchao", None)  # an import of torchao now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    err = refused(tmp_path, capsys, ["--arch", "chatglm-6b", "--src", str(src)])
    assert "--keep-quantized needs torchao" in err and "pip install -e '.[quant]'" in err, err


def test_keep_quantized_is_refused_for_other_architectures(tmp_path, capsys):
    src = tmp_path / "glm"
    src.mkdir()  # empty: the flag is refused before the source is looked at
    err = refused(tmp_path, capsys, ["--arch", "glm", "--src", str(src)])
    assert "--keep-quantized is implemented for --arch chatglm-6b only, not glm" in err, err
    assert "quantization_config=TorchAoConfig(Int8WeightOnlyConfig())" in err, err
