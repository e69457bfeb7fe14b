"""Loading every family the ways accelerate and transformers offer (issue 9): `device_map="auto"` with a
`max_memory` that puts part of the model on the CPU and the rest in a disk `offload_folder`, `low_cpu_mem_usage`,
`_no_split_modules` naming each family's block, and fp32 / bf16 / fp16 checkpoints loaded with `dtype="auto"`,
`torch_dtype="auto"` or an explicit dtype, then generating on CPU.

Everything that loads runs in one fresh process; the reference is the same folder loaded plainly in memory there.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from fixtures.hub_folders import FAMILIES, folder, load, run_fresh_here
from helpers import assert_close
from safetensors.torch import load_file, save_file

IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
BLOCKS = {
    "glm": {"GLMBlock"},
    "glm-10b": {"GLMBlock"},
    "gpt2_sparse": {"GPT2SparseLayer"},
    "bart_gen": {"BartGenEncoderLayer", "BartGenDecoderLayer"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LOAD = """
    import json, sys, tempfile, torch, transformers
    from accelerate import infer_auto_device_map
    from safetensors.torch import load_file, save_file
    jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
    tensors, report = {}, {}

    def run(model, batch, prompt):
        with torch.no_grad():
            logits = model(**batch).logits.float()
            ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)
        return logits, ids

    for name, job in jobs.items():
        auto = getattr(transformers, job["auto"])
        batch, prompt = load_file(job["batch"]), load_file(job["prompt"])
        ref = auto.from_pretrained(job["path"], trust_remote_code=True).eval()
        tensors[f"{name}/ref/logits"], tensors[f"{name}/ref/ids"] = run(ref, batch, prompt)
        no_split = sorted(ref._no_split_modules)

        # the smallest CPU budget (a share of the weights) whose map keeps something on the CPU and offloads the rest
        size = sum(p.numel() * p.element_size() for p in ref.parameters())
        for share in (0.5, 0.6, 0.75, 0.9):
            planned = infer_auto_device_map(ref, max_memory={"cpu": int(size * share), "disk": 10 * size},
                                            no_split_module_classes=no_split)
            if {"cpu", "disk"} <= set(planned.values()):
                break
        offload = tempfile.mkdtemp()
        model = auto.from_pretrained(job["path"], trust_remote_code=True, device_map="auto",
                                     max_memory={"cpu": int(size * share)}, offload_folder=offload).eval()
        device_map = dict(model.hf_device_map)
        splits = []  # device-map entries that cut inside a block that must stay whole
        for key in device_map:
            parts = key.split(".")
            for i in range(1, len(parts)):
                if type(model.get_submodule(".".join(parts[:i]))).__name__ in no_split:
                    splits.append(key)
        tensors[f"{name}/offload/logits"], tensors[f"{name}/offload/ids"] = run(model, batch, prompt)
        low = auto.from_pretrained(job["path"], trust_remote_code=True, low_cpu_mem_usage=True).eval()
        tensors[f"{name}/low_cpu/logits"], _ = run(low, batch, prompt)

        dtypes = {}
        folders = job["dtype_folders"]
        loads = [  # (label, folder, kwargs, generate?)
            ("bfloat16/dtype", folders["bfloat16"], {"dtype": "auto"}, True),
            ("bfloat16/torch_dtype", folders["bfloat16"], {"torch_dtype": "auto"}, False),
            ("bfloat16/default", folders["bfloat16"], {}, False),
            ("float16/dtype", folders["float16"], {"dtype": "auto"}, True),
            ("float32->bfloat16", job["path"], {"dtype": torch.bfloat16}, True),
            ("float32->float16", job["path"], {"dtype": torch.float16}, True),
        ]
        dtypes["float32/default"] = sorted({str(p.dtype).split(".")[-1] for p in ref.parameters()})
        for label, path, kwargs, generate in loads:
            model = auto.from_pretrained(path, trust_remote_code=True, **kwargs).eval()
            dtypes[label] = sorted({str(p.dtype).split(".")[-1] for p in model.parameters()})
            if generate:
                tensors[f"{name}/{label.split('/')[0]}/logits"], tensors[f"{name}/{label.split('/')[0]}/ids"] = run(
                    model, batch, prompt
                )
        report[name] = dict(no_split=no_split, device_map=device_map, share=share, splits=splits, dtypes=dtypes)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_file)
    print(json.dumps(report))
"""


def inputs_for(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A padded forward batch and a one-prompt generation input."""
    _, tokenizer = load(name)
    prompts = folder(name).prompts
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    if name == "bart_gen":
        batch["decoder_input_ids"] = tokenizer(["a cat."] * len(prompts), return_tensors="pt")["input_ids"]
    batch.pop("token_type_ids", None)
    prompt = dict(tokenizer(prompts[:1], return_tensors="pt"))
    prompt.pop("token_type_ids", None)
    return batch, prompt


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("loading")
    jobs = {}
    for name in FAMILIES:
        batch, prompt = inputs_for(name)
        save_file(batch, str(root / f"{name}_batch.safetensors"))
        save_file(prompt, str(root / f"{name}_prompt.safetensors"))
        dtype_folders = {"float32": str(folder(name).path)}
        for stored in ("bfloat16", "float16"):
            path = root / f"{name}_{stored}"
            load(name)[0].to(DTYPES[stored]).save_pretrained(str(path))  # config.json records the dtype
            dtype_folders[stored] = str(path)
        jobs[name] = dict(
            auto=folder(name).auto_lm,
            path=str(folder(name).path),
            batch=str(root / f"{name}_batch.safetensors"),
            prompt=str(root / f"{name}_prompt.safetensors"),
            dtype_folders=dtype_folders,
        )
    out = root / "out.safetensors"
    report = json.loads(run_fresh_here(LOAD, json.dumps(jobs), str(out)).splitlines()[-1])
    return report, load_file(str(out))


@pytest.mark.parametrize("name", FAMILIES)
def test_no_split_modules_name_the_blocks(name):
    model, _ = load(name)
    assert set(model._no_split_modules) == BLOCKS[name]
    present = {type(m).__name__ for m in model.modules()}
    assert BLOCKS[name] <= present
    # every repeated layer (the unit gradient checkpointing wraps) is one of them
    layers = {
        type(m).__name__
        for m in model.modules()
        if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)
    }
    assert layers == BLOCKS[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_device_map_auto_with_cpu_and_disk_offload_equals_in_memory(loaded, name):
    report, tensors = loaded
    device_map = report[name]["device_map"]
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    assert report[name]["splits"] == [], f"device map cuts inside a block: {report[name]['splits']}"
    assert_close(tensors[f"{name}/offload/logits"], tensors[f"{name}/ref/logits"], atol=1e-6, msg="offloaded logits")
    assert torch.equal(tensors[f"{name}/offload/ids"], tensors[f"{name}/ref/ids"])
    assert_close(tensors[f"{name}/low_cpu/logits"], tensors[f"{name}/ref/logits"], atol=0, msg="low_cpu_mem_usage")
    # and the in-memory model of the fresh process is the one this process sees (up to float summation order:
    # the processes may run different thread counts)
    batch, _ = inputs_for(name)
    with torch.no_grad():
        assert_close(tensors[f"{name}/ref/logits"], load(name)[0](**batch).logits, atol=1e-4, msg="fresh vs here")


@pytest.mark.parametrize("name", FAMILIES)
def test_dtype_auto_keeps_the_checkpoint_dtype(loaded, name):
    dtypes = loaded[0][name]["dtypes"]
    assert dtypes["bfloat16/dtype"] == ["bfloat16"] and dtypes["float16/dtype"] == ["float16"], dtypes
    assert dtypes["bfloat16/torch_dtype"] == ["bfloat16"], dtypes  # the pre-4.56 name still works
    # without a dtype argument 5.x loads the checkpoint's dtype (its default is "auto"), 4.57 loads float32
    assert dtypes["bfloat16/default"] == ["bfloat16" if IS_V5 else "float32"], dtypes
    assert dtypes["float32/default"] == ["float32"], dtypes
    for wanted in ("bfloat16", "float16"):
        assert dtypes[f"float32->{wanted}"] == [wanted], dtypes


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float32->bfloat16", "float32->float16"])
def test_half_precision_loads_and_generates_on_cpu(loaded, name, stored):
    _, tensors = loaded
    reference, logits = tensors[f"{name}/ref/logits"], tensors[f"{name}/{stored}/logits"]
    assert torch.isfinite(logits).all()
    scale = float(reference.abs().max())
    tolerance = 0.1 if "bfloat16" in stored else 0.02  # relative to the largest logit: bf16 keeps 8 bits
    assert_close(logits, reference, atol=tolerance * scale, msg=f"{stored} vs float32 logits")
    ids = tensors[f"{name}/{stored}/ids"]
    assert ids.shape == tensors[f"{name}/ref/ids"].shape  # 5 new tokens, generated in that dtype
