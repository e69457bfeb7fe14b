"""Shared input/output for the checkpoint converters.

Every converter reads tensors one file at a time (safetensors, or `torch.load(weights_only=True)` for
PyTorch pickles, so no code in a checkpoint ever runs), renames/reshapes them, and writes safetensors
shards into a temporary folder that is renamed to the destination only when everything succeeded: an
interrupted conversion never leaves a folder that looks complete.

A family module (`scripts/converters/<family>.py`) defines `ARCHS = {"arch-name": convert_fn}` with
`convert_fn(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None`, which
writes everything into `out` (already a fresh temporary folder), and optionally
`add_arguments(parser)` for its own flags (e.g. `--num-attention-heads`) and `check_arguments(args)`, called
for every module before DST is touched, to refuse a flag that cannot work (e.g. `--keep-quantized` with an
--arch that lacks it). Raise `ConversionError` for anything the user must fix; the command prints it and exits
with status 2.

API used by the family modules:
- `ConversionError`: a ValueError subclass; its message is shown to the user as is.
- `list_weight_files(src)`: the checkpoint's weight files in order (index-aware).
- `iter_tensors(src, files=None)`: yields (name, tensor) over all weight files, one file in memory at a time,
  with a progress bar.
- `load_torch_file(path)`: a PyTorch pickle read with weights_only=True.
- `SafetensorsWriter(out_dir, dtype)`: `.add(name, tensor)` then `.close()`; shards by size and writes the index.
- `output_dir(dst, overwrite)`: context manager yielding the temporary folder.
- `copy_code_files(out, names)`: copies model code files from the repository root.
- `copy_files(src, out, names, rename=None)`: copies optional tokenizer/generation files that exist in src.
- `read_json(path)`, `write_json(path, obj)`, `parse_dtype(name)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what and why."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"expected {path.name} in {path.parent}, but it does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):  # every file read here is a JSON object of named fields
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(data), "a number")
        raise ConversionError(f"{path} must hold a JSON object {{...}} of named fields, got {kind}")
    return data


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load_torch_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a PyTorch checkpoint without unpickling arbitrary objects (weights_only=True)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        raise ConversionError(
            f"cannot read {path} as a PyTorch weights file with weights_only=True ({type(err).__name__}: {err}). "
            "Only plain tensor checkpoints are accepted; re-save untrusted pickles as safetensors."
        ) from err
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def list_weight_files(src: str | os.PathLike) -> list[Path]:
    """Weight files of a checkpoint folder: safetensors preferred, then PyTorch .bin (index files honoured)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"--src must be a folder, got {src}")
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not names:
                raise ConversionError(f"{index} has an empty weight_map")
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shard(s) missing from {src}: {', '.join(missing)}")
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
    found = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not found:
        raise ConversionError(f"no weights found in {src} (expected *.safetensors or pytorch_model*.bin)")
    return found


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise ConversionError(f"cannot read {path} as safetensors ({type(err).__name__}: {err})") from err
    return load_torch_file(path)


def iter_tensors(
    src: str | os.PathLike, files: Iterable[Path] | None = None, prefix_filter: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the checkpoint, holding one weight file in memory at a time."""
    files = list(files) if files is not None else list_weight_files(src)
    for path in tqdm(files, desc="reading shards", unit="file", disable=len(files) < 2):
        state = _read_weight_file(path)
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"{path.name}: entry {name!r} is a {type(value).__name__}, not a tensor")
            if prefix_filter is None or name.startswith(prefix_filter):
                yield name, value
        del state


class SafetensorsWriter:
    """Collect tensors and write them as safetensors shards of at most `max_shard_bytes` each.

    One shard is written as `model.safetensors`; several as `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`, the layout `from_pretrained` reads.
    """

    def __init__(
        self, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, max_shard_bytes: int = 2 * 1024**3
    ):
        self.out_dir, self.dtype, self.max_shard_bytes = Path(out_dir), dtype, max_shard_bytes
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | Path] = []
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ConversionError(f"tensor {name!r} would be written twice")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().contiguous().clone()  # own the memory (inputs may be mmapped)
        size = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + size > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor
        self._current_bytes += size
        self.total_bytes += size
        self.names.add(name)

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._current, str(path), metadata={"format": "pt"})
        self._shards.append(path)
        self._current, self._current_bytes = {}, 0

    def close(self) -> list[str]:
        if self._current or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = ["model.safetensors"]
        else:
            final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for tmp, name in zip(self._shards, final):
            tmp.rename(self.out_dir / name)
            if n > 1:
                from safetensors import safe_open

                with safe_open(str(self.out_dir / name), framework="pt") as f:
                    weight_map.update({k: name for k in f.keys()})
        if n > 1:
            write_json(
                self.out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        return final


@contextlib.contextmanager
def output_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `dst`; on success it replaces `dst`, on error it is deleted."""
    dst = Path(dst).resolve()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"--dst {dst} exists and is not empty (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def code_files(*entry_files: str) -> list[str]:
    """`entry_files` (e.g. a configuration and a modeling file at the repository root) and every root module they
    import relatively, recursively: the files transformers' remote-code loader needs beside the weights."""
    files, todo = [], list(entry_files)
    while todo:
        name = todo.pop(0)
        if name in files:
            continue
        files.append(name)
        source = (REPO_ROOT / name).read_text(encoding="utf-8")
        todo += [f"{module}.py" for module in re.findall(r"^from \.(\w+) import", source, flags=re.M)]
    return files


def copy_code_files(out: Path, names: Iterable[str]) -> None:
    """Copy model code files (flat, as the dynamic-module loader expects) from the repository root."""
    for name in names:
        path = REPO_ROOT / name
        if not path.is_file():
            raise ConversionError(f"repository file {name} is missing: is this a complete checkout?")
        shutil.copy2(path, out / name)


def copy_files(src: Path, out: Path, names: Iterable[str], rename: dict[str, str] | None = None) -> list[str]:
    """Copy the files of `names` that exist in `src` (optionally renamed); return the names written."""
    written = []
    for name in names:
        if (src / name).is_file():
            target = (rename or {}).get(name, name)
            shutil.copy2(src / name, out / target)
            written.append(target)
    return written


def check_all_placed(unplaced: Iterable[str], src: Path) -> None:
    """Fail, naming them, when some source tensors had no place in the converted model."""
    unplaced = sorted(unplaced)
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f" (+{len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise ConversionError(f"{len(unplaced)} tensor(s) in {src} have no place in the converted model: {shown}")
