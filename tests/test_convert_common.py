"""The shared conversion IO: safe reading, sharded writing, atomic output folders, clear errors."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, assert_close
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from converters import common  # noqa: E402


def test_sharded_writer_round_trip(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}
    writer = common.SafetensorsWriter(tmp_path, dtype=torch.bfloat16, max_shard_bytes=64 * 64 * 2 * 2)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    for name, t in tensors.items():
        assert loaded[name].dtype == torch.bfloat16
        assert_close(loaded[name].float(), t.bfloat16().float(), atol=0, msg=name)


def test_single_shard_is_model_safetensors(tmp_path):
    writer = common.SafetensorsWriter(tmp_path)
    writer.add("a", torch.ones(2, dtype=torch.int64))
    assert writer.close() == ["model.safetensors"]
    assert load_file(str(tmp_path / "model.safetensors"))["a"].dtype == torch.int64  # ints never cast


def test_writer_refuses_duplicate_names(tmp_path):
    writer = common.SafetensorsWriter(tmp_path)
    writer.add("a", torch.ones(2))
    with pytest.raises(common.ConversionError, match="'a' would be written twice"):
        writer.add("a", torch.ones(2))


def test_iter_tensors_reads_bin_shards_through_the_index(tmp_path):
    torch.save({"x": torch.arange(3)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"y": torch.ones(2)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert dict(common.iter_tensors(tmp_path)).keys() == {"x", "y"}


def test_missing_shard_named(tmp_path):
    save_file({"x": torch.ones(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(common.ConversionError, match="model-00002-of-00002.safetensors"):
        common.list_weight_files(tmp_path)


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (Path("/nonexistent").write_text, ("owned",))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(common.ConversionError, match="weights_only=True"):
        list(common.iter_tensors(tmp_path))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_file({"x": torch.randn(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.ConversionError, match="cannot read .*model.safetensors as safetensors"):
        list(common.iter_tensors(tmp_path))


def test_output_dir_is_atomic(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with common.output_dir(dst) as out:
            (out / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert not dst.exists() and list(tmp_path.iterdir()) == []  # nothing that looks complete is left
    with common.output_dir(dst) as out:
        (out / "config.json").write_text("{}")
    assert (dst / "config.json").is_file()
    with pytest.raises(common.ConversionError, match="not empty"):
        with common.output_dir(dst):
            pass


def test_unplaced_tensors_are_listed():
    with pytest.raises(common.ConversionError, match="2 tensor.*a, b"):
        common.check_all_placed(["b", "a"], Path("src"))


def test_command_reports_errors_cleanly(tmp_path):
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "convert_checkpoint.py"),
            "--arch",
            "x",
            "--src",
            "a",
            "--dst",
            "b",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--arch" in proc.stderr
