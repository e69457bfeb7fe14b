"""Converters into the sparse GPT-2 model (configuration_gpt2_sparse.py / modeling_gpt2_sparse.py).

--arch cogview: SRC holds CogView's DeepSpeed checkpoint `mp_rank_00_model_states.pt` (directly, or in the
    iteration folder named by `latest_checkpointed_iteration.txt`), weights under `module` (model-parallel size 1).
    The keys map one-to-one: `word_embeddings.*` -> `model.word_embeddings.*`, `transformer.X` -> `model.X`; the
    LM head is tied. `--num-attention-heads` is required; the other sizes come from the tensor shapes. Sandwich LN
    follows the presence of `third_layernorm` weights, PB-relax is on (CogView's LayerNorm), and the sparse
    settings come from the flags (defaults are CogView's arguments.py: w=128, t=6, P=768, 8192 image tokens).
    The file is read with torch.load(weights_only=True): a checkpoint that also pickles an argparse Namespace or
    optimizer objects must first be re-saved as a plain dict of tensors (`{"module": state_dict}`).
--arch gpt2: SRC is a transformers GPT2LMHeadModel / GPT2Model folder. Conv1D weights ([in, out]) are transposed
    into the Linear layout, sandwich LN and PB-relax are off, so the converted model computes exactly GPT-2.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

import torch

from converters.common import (
    REPO_ROOT,
    ConversionError,
    SafetensorsWriter,
    check_all_placed,
    code_files,
    copy_code_files,
    copy_files,
    iter_tensors,
    load_torch_file,
    read_json,
    write_json,
)

CODE_FILES = code_files("configuration_gpt2_sparse.py", "modeling_gpt2_sparse.py")
AUTO_MAP = {
    "AutoConfig": "configuration_gpt2_sparse.GPT2SparseConfig",
    "AutoModel": "modeling_gpt2_sparse.GPT2SparseModel",
    "AutoModelForCausalLM": "modeling_gpt2_sparse.GPT2SparseLMHeadModel",
}
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
]


def _add(parser: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    try:
        parser.add_argument(*names, **kwargs)
    except argparse.ArgumentError:  # another family already declared the same flag
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cogview")
    _add(group, "--num-attention-heads", type=int, default=None, help="cogview: attention heads (required)")
    _add(group, "--query-window", type=int, default=128, help="cogview: sparse block size w (default 128)")
    _add(group, "--key-window-times", type=int, default=6, help="cogview: window blocks t (default 6)")
    _add(group, "--num-pivot", type=int, default=768, help="cogview: pivots per row P (default 768)")
    _add(group, "--num-image-tokens", type=int, default=8192, help="cogview: ids below are image tokens")
    _add(group, "--max-memory-length", type=int, default=0, help="cogview: Transformer-XL memory length")
    _add(group, "--layernorm-epsilon", type=float, default=1e-5, help="cogview: LayerNorm eps")
    _add(group, "--is-sparse", type=int, default=0, choices=[0, 1, 2], help="cogview: default attention mode")
    _add(group, "--no-pb-relax", action="store_true", help="cogview: plain LayerNorm instead of PB-relax")


def _model_classes():
    """The repository's config and model classes (imported as a package: the files use relative imports)."""
    name = "gpt2_sparse_repo"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(REPO_ROOT)]
        sys.modules[name] = pkg
    from gpt2_sparse_repo.configuration_gpt2_sparse import GPT2SparseConfig
    from gpt2_sparse_repo.modeling_gpt2_sparse import GPT2SparseLMHeadModel

    return GPT2SparseConfig, GPT2SparseLMHeadModel


def _expected_shapes(config) -> dict[str, torch.Size]:
    _, model_cls = _model_classes()
    with torch.device("meta"):
        model = model_cls(config)
    return {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _write(out: Path, config, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, src: Path) -> None:
    """Check every tensor against the model, write weights, config.json and code files."""
    try:
        expected = _expected_shapes(config)
    except ValueError as err:
        raise ConversionError(f"the checkpoint gives an inconsistent config: {err}") from err
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConversionError(f"{len(missing)} model tensor(s) have no source in {src}: {shown}")
    check_all_placed(set(tensors) - set(expected), src)
    writer = SafetensorsWriter(out, dtype)
    for name in sorted(tensors):
        if tensors[name].shape != expected[name]:
            raise ConversionError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, the model expects {tuple(expected[name])}"
            )
        writer.add(name, tensors[name])
    writer.close()
    config_dict = config.to_dict()
    config_dict["auto_map"] = dict(AUTO_MAP)
    config_dict["architectures"] = ["GPT2SparseLMHeadModel"]
    if dtype is not None:
        config_dict["torch_dtype"] = config_dict["dtype"] = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", config_dict)
    copy_code_files(out, CODE_FILES)


def _find_cogview_file(src: Path) -> Path:
    direct = src / "mp_rank_00_model_states.pt"
    if direct.is_file():
        return direct
    latest = src / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        candidate = src / latest.read_text().strip() / "mp_rank_00_model_states.pt"
        if candidate.is_file():
            return candidate
    found = sorted(src.glob("*/mp_rank_00_model_states.pt"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConversionError(
            f"{src} holds several checkpoints ({', '.join(str(p.parent.name) for p in found)}); point --src at one"
        )
    if sorted(src.glob("mp_rank_0[1-9]_model_states.pt")) or sorted(src.glob("*/mp_rank_0[1-9]_model_states.pt")):
        raise ConversionError("model-parallel CogView checkpoints (mp_rank_01, ...) are not supported; merge first")
    raise ConversionError(f"no mp_rank_00_model_states.pt in {src}")


def convert_cogview(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None:
    heads = getattr(args, "num_attention_heads", None)
    if not heads:
        raise ConversionError("--arch cogview needs --num-attention-heads (CogView-4B: 40)")
    path = _find_cogview_file(src)
    print(f"reading {path}", file=sys.stderr)
    state = load_torch_file(path)
    if "module" in state:
        state = state["module"]
        if not isinstance(state, dict):
            raise ConversionError(f"{path}: 'module' holds a {type(state).__name__}, expected a dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        name = name.removeprefix("module.")
        if name.startswith("transformer."):
            target = "model." + name.removeprefix("transformer.")
        elif name.startswith("word_embeddings."):
            target = "model." + name
        else:
            target = name  # left for check_all_placed to name
        tensors[target] = tensor

    def shape(key: str) -> torch.Size:
        if key not in tensors:
            raise ConversionError(f"{path} has no {key.replace('model.', 'transformer.', 1)} tensor")
        return tensors[key].shape

    vocab, hidden = shape("model.word_embeddings.weight")
    layer_ids = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise ConversionError(f"{path} has no transformer.layers.* tensors")
    config_cls, _ = _model_classes()
    try:
        config = config_cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=max(layer_ids) + 1,
            num_attention_heads=heads,
            intermediate_size=shape("model.layers.0.mlp.dense_h_to_4h.weight")[0],
            max_position_embeddings=shape("model.position_embeddings.weight")[0],
            layernorm_epsilon=args.layernorm_epsilon,
            sandwich_ln="model.layers.0.third_layernorm.weight" in tensors,
            pb_relax=not args.no_pb_relax,
            is_sparse=args.is_sparse,
            query_window=args.query_window,
            key_window_times=args.key_window_times,
            num_pivot=args.num_pivot,
            num_image_tokens=min(args.num_image_tokens, vocab),
            max_memory_length=args.max_memory_length,
            tie_word_embeddings=True,
        )
    except ValueError as err:
        raise ConversionError(f"invalid CogView settings: {err}") from err
    _write(out, config, tensors, dtype, src)
    copy_files(src, out, TOKENIZER_FILES)


_GPT2_RENAMES = [
    (r"wte\.weight", "model.word_embeddings.weight", False),
    (r"wpe\.weight", "model.position_embeddings.weight", False),
    (r"ln_f\.(weight|bias)", r"model.final_layernorm.\1", False),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"model.layers.\1.input_layernorm.\2", False),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"model.layers.\1.post_attention_layernorm.\2", False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", r"model.layers.\1.attention.query_key_value.weight", True),
    (r"h\.(\d+)\.attn\.c_attn\.bias", r"model.layers.\1.attention.query_key_value.bias", False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.attention.dense.weight", True),
    (r"h\.(\d+)\.attn\.c_proj\.bias", r"model.layers.\1.attention.dense.bias", False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.dense_h_to_4h.weight", True),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", r"model.layers.\1.mlp.dense_h_to_4h.bias", False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.dense_4h_to_h.weight", True),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", r"model.layers.\1.mlp.dense_4h_to_h.bias", False),
]
_GPT2_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # old causal-mask buffers, not weights


def convert_gpt2(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None:
    hf = read_json(src / "config.json")
    if hf.get("model_type") != "gpt2":
        raise ConversionError(
            f"--arch gpt2 expects a transformers GPT-2 folder, config.json has {hf.get('model_type')!r}"
        )
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ConversionError(f"GPT-2 config {field}={value!r} is not supported (expected one of {allowed})")

    tensors: dict[str, torch.Tensor] = {}
    lm_head = None
    unplaced = []
    for name, tensor in iter_tensors(src):
        short = name.removeprefix("transformer.")
        if short == "lm_head.weight":
            lm_head = tensor
            continue
        if _GPT2_BUFFERS.fullmatch(short):
            continue
        for pattern, target, transpose in _GPT2_RENAMES:
            if re.fullmatch(pattern, short):
                tensors[re.sub(pattern, target, short)] = tensor.t().contiguous() if transpose else tensor
                break
        else:
            unplaced.append(name)
    check_all_placed(unplaced, src)
    if lm_head is not None and "model.word_embeddings.weight" in tensors:
        if not torch.equal(lm_head, tensors["model.word_embeddings.weight"]):
            raise ConversionError(
                "lm_head.weight differs from transformer.wte.weight: untied GPT-2 heads are not supported"
            )

    config_cls, _ = _model_classes()
    hidden = hf.get("n_embd", 768)
    try:
        config = config_cls(
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=hidden,
            num_layers=hf.get("n_layer", 12),
            num_attention_heads=hf.get("n_head", 12),
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=hf.get("n_positions", 1024),
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            hidden_dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1),
            init_method_std=hf.get("initializer_range", 0.02),
            sandwich_ln=False,
            pb_relax=False,
            is_sparse=0,
            num_image_tokens=0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
    except ValueError as err:
        raise ConversionError(f"invalid GPT-2 config: {err}") from err
    _write(out, config, tensors, dtype, src)
    copy_files(src, out, TOKENIZER_FILES)
    if not copy_files(src, out, ["generation_config.json"]):
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        write_json(out / "generation_config.json", gen)


ARCHS = {"cogview": convert_cogview, "gpt2": convert_gpt2}
