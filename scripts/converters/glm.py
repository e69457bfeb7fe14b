"""`--arch chatglm-6b` and `--arch glm`: THUDM's ChatGLM-6B and GLM checkpoints -> this repository's GLM model.

`--arch chatglm-6b`: a THUDM/chatglm-6b style folder -> the ChatGLM-6B variant.

SRC holds THUDM's `config.json` (`model_type` "chatglm"), the weights as `pytorch_model*.bin` shards (with
`pytorch_model.bin.index.json`) or safetensors, and usually `ice_text.model` + `tokenizer_config.json`.
Our state-dict keys are THUDM's, so tensors are copied, not renamed; what the conversion does:
- config.json: THUDM's fields are kept (our GLMConfig accepts them unchanged), `model_type` becomes
  "glm_infill" with our `auto_map`, `smask_token_id` is added (`gmask_token_id + 1` in ChatGLM's layout),
  `tie_word_embeddings` and THUDM's residual scale are written out; the config validates itself, so a
  1-D rotary (`position_encoding_2d` false) checkpoint is refused with a message naming the field;
- THUDM's int4/int8 checkpoints (THUDM/chatglm-6b-int4, -int8: config `quantization_bit` 4 or 8) are
  dequantized: see `dequantize_thudm` for their storage format. The output is an ordinary float checkpoint
  (bfloat16 unless `--dtype` says otherwise; `--dtype float32` holds int * scale exactly, `float16` equals
  the half-precision product THUDM's CUDA kernel computes). With `--keep-quantized` the result is instead
  saved quantized, torchao int8 weight-only (see below);
- weights: every tensor's name and shape is checked against the model; the per-layer rotary `inv_freq`
  buffers are dropped (recomputed on load), `lm_head.weight` is dropped because THUDM's code ties it to the
  word embeddings on load (a differing copy is reported); anything else that has no place is an error;
- tokenizer: `convert_chatglm_tokenizer` writes `tokenizer.model` (ice_text.model) and our GLMTokenizer's
  tokenizer_config.json when SRC has ice_text.model;
- generation_config.json with `<sop>`/`<eop>`/`<pad>` ids, and the model code files.

`--arch chatglm-6b --keep-quantized`: DST holds the model quantized by torchao, int8 weight-only with one scale per
output row (transformers' `TorchAoConfig(Int8WeightOnlyConfig())`), as safetensors, with `quantization_config` in
config.json, so `AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)` loads it quantized with no
further argument (torchao must be installed where it is loaded, with transformers 5.x: 4.57's torchao loader
cannot read it). The flow:
1. the ordinary conversion above is written into a subfolder of the temporary output folder (for a THUDM int4/int8
   source, THUDM's row scales are kept aside as the weights are dequantized);
2. the repository's own GLMForConditionalGeneration (imported from this checkout, the same files DST gets, so no
   trust_remote_code, dynamic-module cache or network is involved) loads that subfolder with
   `quantization_config`: transformers' torchao quantizer quantizes every nn.Linear of the body; the word
   embeddings and the head tied to them stay in the converted dtype (TorchAoConfig's default);
3. for a THUDM int4/int8 source, each int8 weight then gets THUDM's own integers and row scales back: torchao
   chooses absmax(row) / 127.5 (range -128..127), THUDM absmax(row) / 127, so torchao's own choice would shrink
   every weight by 1/255 (half a step at the row's largest weight; measured 1% of the largest logit on the tiny test
   model). The integers are recovered exactly as round(converted weight / THUDM scale), also from bfloat16: an int8
   value (at most 127) times the scale, rounded to bfloat16 (relative error at most 2^-8), stays within 0.4961 of a
   step, and every layer is checked to give the converted weight back bit for bit. int4 values (-8..7) are stored
   one per int8 byte: twice THUDM's int4 bytes, half of bfloat16. The output then computes with exactly THUDM's
   weights; a float16 source keeps torchao's own scales (ordinary int8 weight-only quantization);
4. `save_pretrained` writes the quantized weights (torchao's tensors flattened into safetensors:
   `<layer>._weight_qdata` int8, `_weight_scale` float32, `_weight_zero_point`) and config.json with
   `quantization_config`;
5. everything else (code files, tokenizer files, generation_config.json) is copied from the ordinary conversion, so
   those files are byte for byte what a conversion without the flag writes; the subfolder is deleted.
Why this way: the ordinary conversion stays the one path from THUDM's format to ours (every check above applies),
and transformers' own quantizer and writer produce the layout its loader reads, instead of an imitation of
torchao's serialisation that each release could break; only the integers and scales of step 3 are ours, written into
torchao's tensors in place, and if the installed torchao lays its int8 tensors out otherwise, a note says so and
torchao's own scales are saved. `set_inductor_config=False`: torchao would otherwise change torch.compile's inductor
settings process-wide while quantizing; loading a saved folder never applies it either way. The cost: disk space for
the ordinary conversion while it runs, and memory for transformers' quantizing load (measured for a 109M-parameter
model, 218 MB in bfloat16, from a THUDM int8 source: the conversion peaked at 0.99 GB RSS, 0.75 GB without the flag).
Refused up front, before DST or a temporary folder is made: transformers 4.x (it saves a torchao model only as a
pickle, `safe_serialization=False`, which this project never writes or loads; convert without the flag and pass
`quantization_config` at load time, or use transformers 5.x), a missing torchao (the `quant` extra), and any other
`--arch` (quantize at load time instead). A float16 ChatGLM-6B source works too: DST is int8 of its conversion.

`--arch glm`: a THUDM/glm-* folder (glm-10b, glm-10b-chinese, glm-large-chinese, glm-2b; `model_type` "glm",
weights under GLM's `glm.` prefix, `pytorch_model*.bin` shards or safetensors) -> the GLM variant:
- config.json: GLM's sizes and dropouts (GLM's GLMConfig defaults for fields left out), `variant` "glm", the
  MLP width 4 * hidden and LayerNorm eps 1e-5 GLM hard-codes, and the special-token ids, which GLM's
  config.json does not carry: from `added_tokens.json` when SRC has it, else the layout of the tokenizer
  named in `tokenizer_config.json` (GLMGPT2Tokenizer: English, GLMChineseTokenizer: Chinese), else guessed
  from the vocabulary size (50304: English, 50048: Chinese) with a note. Settings this model does not
  implement (`block_position_encoding` false, `relative_encoding`, `attention_scale` != 1) are refused;
- weights: `glm.word_embeddings.weight` -> `transformer.word_embeddings.weight`, `glm.transformer.*` ->
  `transformer.*` (bare GLMModel keys without `glm.` too), shapes checked; a classification head (`dense`,
  `out_proj`, e.g. the one glm-2b ships) is reported and kept, with `num_labels` set from it, for
  `AutoModelForSequenceClassification` (the causal-LM class ignores it); anything else is an error;
- tokenizer: GLMTokenizer files (flavour "glm-english" from `vocab.json` + `merges.txt`, "glm-chinese" from
  `cog-pretrain.model`) when SRC has them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import re
import shutil
import sys
import types
from pathlib import Path

import torch

from .common import (
    REPO_ROOT,
    ConversionError,
    SafetensorsWriter,
    check_all_placed,
    code_files,
    copy_code_files,
    iter_tensors,
    list_weight_files,
    read_json,
    write_json,
)

CODE_FILES = code_files("configuration_glm.py", "modeling_glm.py")

# THUDM's ChatGLMConfig defaults (configuration_chatglm.py): used for fields a config.json leaves out.
THUDM_DEFAULTS = dict(
    vocab_size=150528,
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    layernorm_epsilon=1e-5,
    use_cache=False,
    bos_token_id=150004,
    eos_token_id=150005,
    mask_token_id=150000,
    gmask_token_id=150001,
    pad_token_id=0,
    max_sequence_length=2048,
    inner_hidden_size=16384,
    position_encoding_2d=True,
    quantization_bit=0,
    pre_seq_len=None,
    prefix_projection=False,
)
# config.json keys that describe the source checkpoint or THUDM's loader, not the converted model
DROPPED_CONFIG_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
}
THUDM_RESIDUAL_ALPHA = math.sqrt(2 * 28)  # GLMBlock(num_layers=28) default that ChatGLMModel never overrides

# GLM's GLMConfig defaults (THUDM's glm-* remote code, configuration_glm.py), for fields a config.json leaves out.
GLM_DEFAULTS = dict(
    num_layers=24,
    vocab_size=30592,
    hidden_size=1024,
    num_attention_heads=16,
    embedding_dropout_prob=0.1,
    attention_dropout_prob=0.1,
    output_dropout_prob=0.1,
    max_sequence_length=512,
    block_position_encoding=True,
    relative_encoding=False,
    attention_scale=1.0,
    initializer_range=0.02,
)
# Special-token ids of GLM's tokenizers: the layout the checkpoints were trained with (GLM's command tokens).
GLM_TOKEN_LAYOUTS = {
    "GLMGPT2Tokenizer": {
        "<|endoftext|>": 50256, "<|startofpiece|>": 50257, "<|endofpiece|>": 50258, "[MASK]": 50260,
        "[gMASK]": 50263, "[sMASK]": 50264,
    },
    "GLMChineseTokenizer": {
        "<|endoftext|>": 50000, "[MASK]": 50003, "<|startofpiece|>": 50006, "<|endofpiece|>": 50007,
        "[sMASK]": 50008, "[gMASK]": 50009,
    },
}  # fmt: skip
GLM_VOCAB_SIZES = {50304: "GLMGPT2Tokenizer", 50048: "GLMChineseTokenizer"}  # glm-10b / glm-2b, *-chinese
GLM_HEAD_KEYS = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")


# THUDM's quantised checkpoints (chatglm-6b-int4 / -int8, quantization.py there): the four linear layers of every
# block are QuantizedLinear modules; embeddings, LayerNorms and biases stay float16.
THUDM_QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def dequantize_thudm(name: str, weight: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The float32 weight [out, in] of one THUDM QuantizedLinear: `weight * weight_scale[:, None]`, exact in fp32.

    THUDM's storage (quantization.py and its CPU kernel quantization_kernels.c in THUDM/chatglm-6b-int4):
    - `weight_scale` [out]: float16, one per output row, absmax(row) / (2**(bits - 1) - 1);
    - 8 bit: `weight` [out, in] int8, round(w / scale);
    - 4 bit: `weight` [out, in / 2] int8, two signed (two's complement) 4-bit values per byte along the input
      dimension: byte j of a row holds input column 2j in its high nibble and column 2j + 1 in its low nibble.
    """
    out_features = scale.shape[0] if scale.dim() == 1 else -1
    packed_in = in_features if bits == 8 else in_features // 2
    if weight.dtype != torch.int8 or tuple(weight.shape) != (out_features, packed_in):
        raise ConversionError(
            f"{name}: a {bits}-bit THUDM weight must be int8 of shape [{out_features}, {packed_in}] (weight_scale has "
            f"shape {list(scale.shape)}), got {weight.dtype} {list(weight.shape)}"
        )
    if bits == 8:
        values = weight.to(torch.int32)
    else:
        byte = weight.to(torch.int32) & 0xFF  # the raw byte, 0..255
        high, low = byte >> 4, byte & 0x0F  # unsigned nibbles, 0..15
        nibbles = torch.stack([high, low], dim=-1).reshape(out_features, in_features)  # column 2j, then 2j + 1
        values = torch.where(nibbles >= 8, nibbles - 16, nibbles)  # two's complement: 8..15 -> -8..-1
    return values.to(torch.float32) * scale.to(torch.float32)[:, None]


def _load_config_class():
    """GLMConfig from the repository root (configuration_glm.py has no relative imports)."""
    name = "configuration_glm"
    if name not in sys.modules:
        path = REPO_ROOT / "configuration_glm.py"
        if not path.is_file():
            raise ConversionError("repository file configuration_glm.py is missing: is this a complete checkout?")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].GLMConfig


def quantization_bits(src: Path) -> int:
    """THUDM's `quantization_bit` of the checkpoint in `src`: 0 (float16), 4 or 8."""
    thudm = read_json(src / "config.json")
    bits = thudm.get("quantization_bit") or 0
    if bits not in (0, 4, 8):
        raise ConversionError(
            f"{src / 'config.json'}: quantization_bit must be 0, 4 or 8 (THUDM's checkpoints), got {bits!r}"
        )
    if thudm.get("quantization_embeddings"):
        raise ConversionError(
            f"{src / 'config.json'}: quantization_embeddings=true (THUDM's int4-qe checkpoint, quantized word "
            "embeddings) is not supported; convert THUDM/chatglm-6b-int4 or -int8"
        )
    return bits


def chatglm_config(src: Path, dtype: torch.dtype | None):
    """Our GLMConfig for THUDM's config.json in `src`; a ConversionError names any field we cannot honour.
    A quantised checkpoint's `quantization_bit` is dropped: the converted weights are floating point."""
    thudm = read_json(src / "config.json")
    if quantization_bits(src):
        thudm = {k: v for k, v in thudm.items() if k not in ("quantization_bit", "quantization_embeddings")}
    if thudm.get("model_type") != "chatglm":
        raise ConversionError(
            f"{src / 'config.json'} has model_type {thudm.get('model_type')!r}; --arch chatglm-6b expects THUDM's "
            "ChatGLM-6B config (model_type 'chatglm')"
        )
    fields = {**THUDM_DEFAULTS, **{k: v for k, v in thudm.items() if k not in DROPPED_CONFIG_KEYS}}
    fields.setdefault("smask_token_id", fields["gmask_token_id"] + 1)  # [MASK] [gMASK] [sMASK] are consecutive
    fields["residual_alpha"] = THUDM_RESIDUAL_ALPHA
    fields["tie_word_embeddings"] = True  # THUDM's config relied on the transformers default (True)
    fields["variant"] = "chatglm"
    fields["use_cache"] = True
    source_dtype = thudm.get("torch_dtype")
    fields["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else source_dtype
    if fields["torch_dtype"] is None:
        del fields["torch_dtype"]
    try:
        config = _load_config_class()(**fields)
    except ValueError as err:
        raise ConversionError(f"{src / 'config.json'}: {err}") from err
    config.architectures = ["GLMForConditionalGeneration"]
    return config


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the converted model (THUDM's key names) with its shape."""
    h, inner, vocab = config.hidden_size, config.inner_hidden_size, config.vocab_size
    shapes = {"transformer.word_embeddings.weight": (vocab, h)}
    for i in range(config.num_layers):
        layer = f"transformer.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (h,), f"{layer}.input_layernorm.bias": (h,),
            f"{layer}.attention.query_key_value.weight": (3 * h, h), f"{layer}.attention.query_key_value.bias": (3 * h,),
            f"{layer}.attention.dense.weight": (h, h), f"{layer}.attention.dense.bias": (h,),
            f"{layer}.post_attention_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.bias": (h,),
            f"{layer}.mlp.dense_h_to_4h.weight": (inner, h), f"{layer}.mlp.dense_h_to_4h.bias": (inner,),
            f"{layer}.mlp.dense_4h_to_h.weight": (h, inner), f"{layer}.mlp.dense_4h_to_h.bias": (h,),
        })  # fmt: skip
    shapes.update({"transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)})
    if config.pre_seq_len is not None:  # a P-tuning v2 checkpoint with its prefix encoder
        kv_size = config.num_layers * 2 * h
        if config.prefix_projection:
            shapes.update({
                "transformer.prefix_encoder.embedding.weight": (config.pre_seq_len, h),
                "transformer.prefix_encoder.trans.0.weight": (h, h), "transformer.prefix_encoder.trans.0.bias": (h,),
                "transformer.prefix_encoder.trans.2.weight": (kv_size, h),
                "transformer.prefix_encoder.trans.2.bias": (kv_size,),
            })  # fmt: skip
        else:
            shapes["transformer.prefix_encoder.embedding.weight"] = (config.pre_seq_len, kv_size)
    return shapes


def _thudm_name(name: str) -> str:
    """Keys of a bare ChatGLMModel state dict lack the `transformer.` prefix."""
    if name.startswith(("word_embeddings.", "layers.", "final_layernorm.", "prefix_encoder.")):
        return "transformer." + name
    return name


def _is_quantized_linear(name: str) -> bool:
    return (
        name.startswith("transformer.layers.")
        and name.removesuffix(".weight").removesuffix(".weight_scale").split(".", 3)[-1] in THUDM_QUANTIZED_LINEARS
    )


def _thudm_tensors(src: Path, shapes: dict, bits: int, scales: dict | None = None):
    """(name, raw_name, tensor) of a THUDM checkpoint with every quantized linear weight already dequantized to float32:
    a weight waits for its `weight_scale` (they may sit in different shards). `scales`, when given, receives each
    dequantized weight's `weight_scale` under the weight's name."""
    pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for raw_name, tensor in iter_tensors(src):
        name = _thudm_name(raw_name)
        quantized_part = name.endswith(".weight_scale") or (tensor.dtype == torch.int8 and name.endswith(".weight"))
        if quantized_part and not bits:
            raise ConversionError(
                f"{raw_name}: quantised weights (THUDM's int4/int8 QuantizedLinear), but config.json has no "
                "quantization_bit (4 or 8); is this a THUDM/chatglm-6b-int4 or -int8 folder with its own config.json?"
            )
        if not bits or not _is_quantized_linear(name):
            yield name, raw_name, tensor
            continue
        module = name.removesuffix("_scale").removesuffix(".weight")
        part = "scale" if name.endswith(".weight_scale") else "weight"
        if part in pending.setdefault(module, {}):
            raise ConversionError(f"{raw_name} appears twice in {src}")
        pending[module][part] = (raw_name, tensor)
        if len(pending[module]) == 2:
            parts = pending.pop(module)
            (weight_name, weight), (_, scale) = parts["weight"], parts["scale"]
            in_features = shapes.get(module + ".weight", (0, 0))[1]
            if not in_features:
                yield module + ".weight", weight_name, weight  # no place in the model: reported by the caller
                continue
            if scales is not None:
                scales[module + ".weight"] = scale.clone()
            yield module + ".weight", weight_name, dequantize_thudm(weight_name, weight, scale, bits, in_features)
    for module, parts in pending.items():
        missing = "weight_scale" if "weight" in parts else "weight"
        raise ConversionError(
            f"{module}.{missing} is missing from {src}: with quantization_bit={bits} in config.json, THUDM stores "
            "every quantized linear layer as weight (int8) + weight_scale"
        )


def convert_chatglm_weights(
    src: Path, out: Path, config, dtype: torch.dtype | None, bits: int = 0, scales: dict | None = None
) -> None:
    shapes = expected_shapes(config)
    writer = SafetensorsWriter(out, dtype)
    unplaced, lm_head, embeddings = [], None, None
    for name, raw_name, tensor in _thudm_tensors(src, shapes, bits, scales):
        if name.endswith(".rotary_emb.inv_freq"):
            continue  # a buffer THUDM saved by accident; ours is recomputed (fp16-rounded) on load
        if name == "lm_head.weight":
            lm_head = tensor
            continue
        if name not in shapes:
            unplaced.append(raw_name)
            continue
        if tuple(tensor.shape) != shapes[name]:
            raise ConversionError(
                f"{raw_name} has shape {list(tensor.shape)}, but config.json implies {list(shapes[name])}"
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{raw_name} has dtype {tensor.dtype}; expected floating-point weights")
        if name == "transformer.word_embeddings.weight":
            embeddings = tensor.clone()
        writer.add(name, tensor)
    check_all_placed(unplaced, src)
    missing = sorted(set(shapes) - writer.names)
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConversionError(f"{len(missing)} tensor(s) the model needs are missing from {src}: {shown}")
    if lm_head is not None:
        if tuple(lm_head.shape) != shapes["transformer.word_embeddings.weight"]:
            raise ConversionError(f"lm_head.weight has shape {list(lm_head.shape)}, expected the embedding's shape")
        if not torch.equal(lm_head.to(embeddings.dtype), embeddings):
            print(
                "convert_checkpoint.py: note: lm_head.weight differs from transformer.word_embeddings.weight; "
                "THUDM's code ties the head to the embeddings on load, so the embeddings are kept (as THUDM does)",
                file=sys.stderr,
            )
    writer.close()


def convert_chatglm_tokenizer(src: Path, out: Path) -> list[str]:
    """Tokenizer files for a THUDM/chatglm-6b folder: `tokenizer.model` (ice_text.model) and, when this
    repository has tokenization_glm.py, our GLMTokenizer's tokenizer_config.json and code files.
    Returns the names written (nothing when SRC has no ice_text.model)."""
    if not (src / "ice_text.model").is_file():
        return []
    if (REPO_ROOT / "tokenization_glm.py").is_file():
        from .tokenizer_files import convert_chatglm_tokenizer as write_glm_tokenizer

        return write_glm_tokenizer(src, out)
    shutil.copy2(src / "ice_text.model", out / "tokenizer.model")
    return ["tokenizer.model"]


KEEP_QUANTIZED_ARCHS = ("chatglm-6b",)
LOAD_TIME_QUANTIZATION = (
    "from_pretrained(DST, trust_remote_code=True, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())) "
    '(README "Quantized models")'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-quantized",
        action="store_true",
        help="chatglm-6b: save DST quantized, torchao int8 weight-only, as safetensors (needs transformers 5.x and "
        "torchao: pip install -e '.[quant]')",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse `--keep-quantized` before any folder is made: on an --arch without it, on transformers 4.x, without torchao."""
    if not getattr(args, "keep_quantized", False):
        return
    if args.arch not in KEEP_QUANTIZED_ARCHS:
        raise ConversionError(
            f"--keep-quantized is implemented for --arch {', '.join(KEEP_QUANTIZED_ARCHS)} only, not {args.arch}; "
            f"convert without it and quantize when loading: {LOAD_TIME_QUANTIZATION}"
        )
    keep_quantized_config()


def keep_quantized_config():
    """transformers' TorchAoConfig for int8 weight-only, or a ConversionError saying why `--keep-quantized` cannot work."""
    import transformers

    version = transformers.__version__
    if int(version.split(".")[0]) < 5:
        raise ConversionError(
            f"--keep-quantized needs transformers 5.x (installed: {version}): transformers 4.x saves a "
            "torchao-quantized model only as a pickle (save_pretrained(safe_serialization=False)), which this project "
            "never writes or loads. Run the converter with transformers 5.x (.venv/tf5), or convert without "
            f"--keep-quantized and quantize when loading: {LOAD_TIME_QUANTIZATION}"
        )
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as err:
        raise ConversionError(
            f"--keep-quantized needs torchao, which cannot be imported ({type(err).__name__}: {err}); install the "
            "`quant` extra (pip install -e '.[quant]', torchao>=0.17,<0.19), or convert without --keep-quantized"
        ) from err
    from transformers import TorchAoConfig

    try:
        return TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False))  # see the module docstring
    except (ImportError, ValueError) as err:  # e.g. a torchao release this transformers does not accept
        raise ConversionError(
            f"--keep-quantized: transformers {version} refuses the installed torchao ({type(err).__name__}: {err}); "
            "install the `quant` extra's torchao (pip install -e '.[quant]', torchao>=0.17,<0.19)"
        ) from err


def _glm_model_class():
    """GLMForConditionalGeneration from this checkout (imported as a package: modeling_glm.py imports relatively)."""
    name = "glm_repo"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(REPO_ROOT)]
        sys.modules[name] = pkg
    from glm_repo.modeling_glm import GLMForConditionalGeneration

    return GLMForConditionalGeneration


WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def _restore_thudm_scales(model, plain: Path, scales: dict[str, torch.Tensor]) -> bool:
    """Give torchao's int8 weights THUDM's own integers and row scales (module docstring); False, changing nothing,
    when the installed torchao's int8 tensors are not laid out as `qdata` [out, in] + `scale` [out, 1]."""
    from safetensors import safe_open

    handles = {}
    with contextlib.ExitStack() as stack:
        for path in list_weight_files(plain):
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            handles.update(dict.fromkeys(f.keys(), f))
        layers = {name: model.get_submodule(name.removesuffix(".weight")).weight for name in scales}
        for name, weight in layers.items():
            rows, columns = handles[name].get_slice(name).get_shape()
            qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
            zero_point = getattr(weight, "zero_point", None)
            if not (
                isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8 and tuple(qdata.shape) == (rows, columns)
                and isinstance(scale, torch.Tensor) and tuple(scale.shape) == (rows, 1)
                and (zero_point is None or not bool(zero_point.any()))
            ):  # fmt: skip
                return False
        with torch.no_grad():
            for name, weight in layers.items():
                stored = handles[name].get_tensor(name)  # int * scale as the ordinary conversion wrote it
                row_scale = scales[name].to(torch.float32)[:, None]
                safe_scale = torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
                integers = torch.round(stored.to(torch.float32) / safe_scale)  # exact: see the module docstring
                if (
                    not torch.equal((integers * row_scale).to(stored.dtype), stored)
                    or not -128 <= integers.min() <= integers.max() <= 127
                ):
                    raise ConversionError(
                        f"{name}: THUDM's integers cannot be recovered from the converted weight (internal error)"
                    )
                weight.qdata.copy_(integers.to(torch.int8))
                weight.scale.copy_(row_scale)
    return True


def save_quantized(plain: Path, out: Path, quantization_config, scales: dict[str, torch.Tensor]) -> None:
    """The converted folder `plain` -> `out`, int8 weight-only (module docstring, `--keep-quantized`): quantized
    weights and config.json from transformers' save_pretrained, every other file copied from `plain` unchanged.
    `scales`: THUDM's row scale of each weight that was dequantized (empty for a float16 source)."""
    model = _glm_model_class().from_pretrained(str(plain), dtype="auto", quantization_config=quantization_config)
    body = {
        name: type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"  # the head is the tied word embeddings
    }
    float_weights = sorted(name for name, kind in body.items() if kind in ("Tensor", "Parameter"))
    if not body or float_weights:
        raise ConversionError(
            f"--keep-quantized: torchao left {len(float_weights)} of {len(body)} linear layers unquantized "
            f"({', '.join(float_weights[:5])}); is the installed torchao one the `quant` extra names (>=0.17,<0.19)?"
        )
    if scales and not _restore_thudm_scales(model, plain, scales):
        print(
            "convert_checkpoint.py: note: the installed torchao's int8 weights are not laid out as qdata + per-row "
            "scale, so THUDM's integers and scales could not be kept; torchao's own (absmax / 127.5) are saved, "
            "which moves each weight by up to half an int8 step",
            file=sys.stderr,
        )
    model.save_pretrained(str(out))
    del model
    for path in sorted(plain.iterdir()):
        if path.name != "config.json" and not WEIGHT_FILES.fullmatch(path.name):
            shutil.copy2(path, out / path.name)  # code, tokenizer and generation_config.json as converted


def convert_chatglm(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None:
    src, out = Path(src), Path(out)
    if not getattr(args, "keep_quantized", False):
        _convert_chatglm(src, out, dtype)
        return
    quantization_config = keep_quantized_config()  # refuses before anything is read
    plain, scales = out / "dequantized", {}
    plain.mkdir()
    _convert_chatglm(src, plain, dtype, scales)
    save_quantized(plain, out, quantization_config, scales)
    shutil.rmtree(plain)


def _convert_chatglm(src: Path, out: Path, dtype: torch.dtype | None, scales: dict | None = None) -> None:
    """The ordinary conversion; `scales` receives THUDM's row scales of the weights it dequantizes."""
    bits = quantization_bits(src)
    if bits and dtype is None:
        dtype = torch.bfloat16  # the dequantized weights are written in bfloat16 unless --dtype says otherwise
    config = chatglm_config(src, dtype)
    convert_chatglm_weights(src, out, config, dtype, bits, scales)
    config.save_pretrained(str(out))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id},
    )
    copy_code_files(out, CODE_FILES)
    written = convert_chatglm_tokenizer(src, out)
    if not written:
        print(f"convert_checkpoint.py: note: no ice_text.model in {src}; no tokenizer written", file=sys.stderr)


def glm_token_ids(src: Path, vocab_size: int) -> tuple[dict[str, int], str]:
    """GLM's special-token ids for the checkpoint in `src`, and where they came from."""
    tok_config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    tokenizer_class = tok_config.get("tokenizer_class")
    if tokenizer_class in GLM_TOKEN_LAYOUTS:
        ids, source = dict(GLM_TOKEN_LAYOUTS[tokenizer_class]), f"the {tokenizer_class} layout"
    elif tokenizer_class is not None:
        raise ConversionError(
            f"{src / 'tokenizer_config.json'}: tokenizer_class {tokenizer_class!r} is not supported (GLM's BERT / "
            "RoBERTa vocabularies have no [gMASK]/[sMASK]); supported: " + ", ".join(sorted(GLM_TOKEN_LAYOUTS))
        )
    elif vocab_size in GLM_VOCAB_SIZES:
        tokenizer_class = GLM_VOCAB_SIZES[vocab_size]
        ids, source = dict(GLM_TOKEN_LAYOUTS[tokenizer_class]), f"the {tokenizer_class} layout (from vocab_size)"
        print(
            f"convert_checkpoint.py: note: no tokenizer_config.json in {src}; vocab_size {vocab_size} is taken for "
            f"{tokenizer_class}'s special-token ids",
            file=sys.stderr,
        )
    else:
        raise ConversionError(
            f"cannot tell the special-token ids of {src}: it has no tokenizer_config.json naming GLM's tokenizer "
            f"and vocab_size {vocab_size} is none of {sorted(GLM_VOCAB_SIZES)}"
        )
    if (src / "added_tokens.json").is_file():  # the files shipped with the checkpoint win
        added = read_json(src / "added_tokens.json")
        ids.update({k: int(v) for k, v in added.items() if k in ids})
        source += " and added_tokens.json"
    return ids, source


def glm_config(src: Path, dtype: torch.dtype | None):
    """Our GLMConfig (variant "glm") for GLM's config.json in `src`; a ConversionError names any field we cannot honour."""
    glm = read_json(src / "config.json")
    if glm.get("model_type") != "glm":
        raise ConversionError(
            f"{src / 'config.json'} has model_type {glm.get('model_type')!r}; --arch glm expects GLM's config "
            "(model_type 'glm', THUDM/glm-10b and its siblings)"
        )
    fields = {**GLM_DEFAULTS, **{k: v for k, v in glm.items() if k in GLM_DEFAULTS}}
    for name, supported in (("block_position_encoding", True), ("relative_encoding", False), ("attention_scale", 1.0)):
        if fields.pop(name) != supported:
            raise ConversionError(
                f"{src / 'config.json'}: {name}={glm[name]!r} is not supported (GLM's published checkpoints use "
                f"{name}={supported!r})"
            )
    ids, source = glm_token_ids(src, fields["vocab_size"])
    fields.update(
        variant="glm",
        inner_hidden_size=4 * fields["hidden_size"],  # GLM's MLP is hard-coded to 4 * hidden
        layernorm_epsilon=1e-5,  # hard-coded in GLM's GLMStack
        bos_token_id=ids["<|startofpiece|>"],
        eos_token_id=ids["<|endofpiece|>"],
        pad_token_id=ids["<|endoftext|>"],
        mask_token_id=ids["[MASK]"],
        gmask_token_id=ids["[gMASK]"],
        smask_token_id=ids["[sMASK]"],
        tie_word_embeddings=True,
        use_cache=True,
    )
    source_dtype = glm.get("torch_dtype")
    fields["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else source_dtype
    if fields["torch_dtype"] is None:
        del fields["torch_dtype"]
    try:
        config = _load_config_class()(**fields)
    except ValueError as err:
        raise ConversionError(f"{src / 'config.json'} (special-token ids from {source}): {err}") from err
    config.architectures = ["GLMForConditionalGeneration"]
    return config


def expected_glm_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the converted GLM-variant model (our key names) with its shape."""
    rows = (config.max_sequence_length + 1, config.hidden_size)  # GLM's position tables
    shapes = expected_shapes(config)  # word embeddings, blocks, final LayerNorm: the ChatGLM names and shapes
    shapes.update(
        {"transformer.position_embeddings.weight": rows, "transformer.block_position_embeddings.weight": rows}
    )
    return shapes


def _glm_name(name: str) -> str:
    """GLM's key -> ours: drop the `glm.` prefix; a bare GLMModel's word embeddings move under `transformer.`."""
    name = name.removeprefix("glm.")
    return "transformer." + name if name.startswith("word_embeddings.") else name


def convert_glm_weights(src: Path, out: Path, config, dtype: torch.dtype | None) -> None:
    shapes = expected_glm_shapes(config)
    writer = SafetensorsWriter(out, dtype)
    unplaced, head = [], {}
    for raw_name, tensor in iter_tensors(src):
        name = _glm_name(raw_name)
        if name in GLM_HEAD_KEYS:
            head[name] = tensor
            continue
        if name == "lm_head.weight":  # not in GLM's models (the head is tied); accept an identical copy
            continue
        if name not in shapes:
            unplaced.append(raw_name)
            continue
        if tuple(tensor.shape) != shapes[name]:
            raise ConversionError(
                f"{raw_name} has shape {list(tensor.shape)}, but config.json implies {list(shapes[name])}"
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{raw_name} has dtype {tensor.dtype}; expected floating-point weights")
        writer.add(name, tensor)
    check_all_placed(unplaced, src)
    missing = sorted(set(shapes) - writer.names)
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConversionError(f"{len(missing)} tensor(s) the model needs are missing from {src}: {shown}")
    if head:
        h = config.hidden_size
        if set(head) != set(GLM_HEAD_KEYS):
            raise ConversionError(f"{src}: an incomplete classification head ({', '.join(sorted(head))}); expected "
                                  f"{', '.join(GLM_HEAD_KEYS)}")  # fmt: skip
        num_labels = head["out_proj.weight"].shape[0]
        expected = {"dense.weight": (h, h), "dense.bias": (h,), "out_proj.weight": (num_labels, h),
                    "out_proj.bias": (num_labels,)}  # fmt: skip
        for name, tensor in head.items():
            if tuple(tensor.shape) != expected[name]:
                raise ConversionError(f"{name} has shape {list(tensor.shape)}, expected {list(expected[name])}")
            writer.add(name, tensor)
        config.num_labels = num_labels
        print(
            f"convert_checkpoint.py: note: {src} also holds a sequence-classification head (dense, out_proj: "
            f"{num_labels} labels, as glm-2b ships); it is kept for AutoModelForSequenceClassification and ignored "
            "by AutoModelForCausalLM",
            file=sys.stderr,
        )
    writer.close()


def convert_glm(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None:
    src, out = Path(src), Path(out)
    config = glm_config(src, dtype)
    convert_glm_weights(src, out, config, dtype)
    config.save_pretrained(str(out))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id},
    )
    copy_code_files(out, CODE_FILES)
    written = []
    if (REPO_ROOT / "tokenization_glm.py").is_file():
        from .tokenizer_files import convert_glm_tokenizer

        written = convert_glm_tokenizer(src, out)
    if not written:
        print(f"convert_checkpoint.py: note: no GLM tokenizer files in {src}; no tokenizer written", file=sys.stderr)


ARCHS = {"chatglm-6b": convert_chatglm, "glm": convert_glm}
