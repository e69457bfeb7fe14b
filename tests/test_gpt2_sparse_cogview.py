"""CogView parity: golden outputs of THUDM CogView's own code (tests/data/cogview_reference, see its README) against
the repository's model loaded through `convert_checkpoint.py --arch cogview`, in modes 0, 1 and 2."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
from fixtures import repo_module
from helpers import REPO_ROOT, TEST_DATA, assert_close
from safetensors.torch import load_file

GOLDEN = TEST_DATA / "cogview_reference" / "golden.safetensors"


def _model_class():
    return repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel


@pytest.fixture(scope="module")
def golden_and_model(tmp_path_factory):
    golden = load_file(str(GOLDEN))
    tmp = tmp_path_factory.mktemp("cogview")
    src = tmp / "src"
    src.mkdir()
    weights = {k.removeprefix("weights."): v for k, v in golden.items() if k.startswith("weights.")}
    torch.save({"module": weights}, src / "mp_rank_00_model_states.pt")  # written at test time, never committed
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import convert_checkpoint

    err = io.StringIO()
    args = ["--arch", "cogview", "--src", str(src), "--dst", str(tmp / "dst"), "--num-attention-heads", "4",
            "--query-window", "4", "--key-window-times", "2", "--num-pivot", "8", "--num-image-tokens", "32",
            "--max-memory-length", "32"]  # fmt: skip
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert convert_checkpoint.main(args) == 0, err.getvalue()
    model = _model_class().from_pretrained(tmp / "dst", attn_implementation="eager").eval()
    return golden, model


def test_mode0_dense_and_sep_prefix(golden_and_model):
    golden, model = golden_and_model
    ids = golden["input_ids"]
    with torch.no_grad():
        assert_close(model(ids, use_cache=False).logits, golden["logits_mode0"], atol=1e-4, msg="mode 0")
        assert_close(model(ids, sep=5, use_cache=False).logits, golden["logits_mode0_sep5"], atol=1e-4, msg="sep=5")


def test_mode1_sparse_training(golden_and_model):
    golden, model = golden_and_model
    with torch.no_grad():
        out = model(golden["input_ids"], is_sparse=1, pivot_idx=golden["pivots_mode1"], use_cache=False).logits
    assert_close(out, golden["logits_mode1"], atol=1e-4, msg="mode 1")


def test_mode2_incremental_decoding_with_memory(golden_and_model):
    golden, model = golden_and_model
    ids = golden["input_ids"]
    steps = []
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=False)
        for i in range(20, 24):
            out = model(ids[:, i : i + 1], mems=out.mems, is_sparse=2, pivot_idx=golden[f"pivots_mode2_step{i}"])
            steps.append(out.logits)
        assert_close(torch.cat(steps, 1), golden["logits_mode2_decode"], atol=1e-4, msg="mode 2 decode")
        # the same decoding through a KV cache instead of CogView's memory
        out = model(ids[:, :20], use_cache=True)
        cache, steps = out.past_key_values, []
        for i in range(20, 24):
            out = model(
                ids[:, i : i + 1], past_key_values=cache, is_sparse=2, pivot_idx=golden[f"pivots_mode2_step{i}"]
            )
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), golden["logits_mode2_decode"], atol=1e-4, msg="mode 2 decode (cache)")
