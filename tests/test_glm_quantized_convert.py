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
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from fixtures import left_pad, prompt
from fixtures import spread_glm as tiny_model
from helpers import REPO_ROOT, assert_close, load_in_fresh_process, load_output
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
