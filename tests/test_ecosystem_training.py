"""Fine-tuning every family with the tools people use (issue 9): transformers' `Trainer` (the loss goes down,
gradient checkpointing on and off give the same losses, `Trainer.save_model` output reloads through the Auto
classes) and PEFT LoRA (GLM targets `query_key_value`, as ChatGLM-6B adapters do; the adapter saves, reloads onto
the base model with the same outputs, and merges).

Training runs in this process on models loaded from their folders through the Auto classes; everything saved is
reloaded in one fresh process per topic.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.hub_folders import (
    FAMILIES,
    LORA_TARGETS,
    cpu_training_args,
    folder,
    load,
    run_fresh_here,
    training_examples,
)
from helpers import assert_close
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

STEPS = 3


def batch_of(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


@torch.no_grad()
def evaluate(model, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.eval()
    out = model(**batch)
    return float(out.loss), out.logits


def train(name: str, gradient_checkpointing: bool, output_dir) -> tuple[Trainer, list[float]]:
    model, tokenizer = load(name)
    args = cpu_training_args(
        output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=1,
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = Trainer(model=model, args=args, train_dataset=training_examples(name, tokenizer))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, dict]:
    """Per family: the losses of a Trainer run without and with gradient checkpointing, the eval loss before and
    after, and the folder Trainer.save_model wrote (from the checkpointed run)."""
    results = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(f"trainer_{name}")
        model, tokenizer = load(name)
        batch = batch_of(training_examples(name, tokenizer))
        before, _ = evaluate(model, batch)
        plain, plain_losses = train(name, False, root / "plain")
        checkpointed, checkpointed_losses = train(name, True, root / "checkpointed")
        assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
        _, plain_logits = evaluate(plain.model, batch)
        after, logits = evaluate(checkpointed.model, batch)
        checkpointed.save_model(str(root / "saved"))
        results[name] = dict(
            losses=(plain_losses, checkpointed_losses),
            before=before,
            after=after,
            logits=(plain_logits, logits),
            batch=batch,
            saved=root / "saved",
        )
    return results


@pytest.mark.parametrize("name", FAMILIES)
def test_trainer_lowers_the_loss(trained, name):
    result = trained[name]
    assert len(result["losses"][0]) == STEPS
    assert result["after"] < result["before"] - 0.1, (result["before"], result["after"])


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_gives_the_same_losses(trained, name):
    plain, checkpointed = trained[name]["losses"]
    assert_close(torch.tensor(checkpointed), torch.tensor(plain), atol=1e-5, msg="logged losses")
    # The weights agree too, up to parameters whose exact gradient is 0 (attention key biases: softmax ignores
    # them), where AdamW turns float noise into lr-sized steps; the trained models' logits show it.
    assert_close(trained[name]["logits"][1], trained[name]["logits"][0], atol=1e-4, msg="logits after training")


RELOAD = """
    import json, sys, torch, transformers
    from safetensors.torch import load_file, save_file
    jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
    out = {}
    for name, job in jobs.items():
        batch = load_file(job["batch"])
        for kind, path in job["folders"].items():
            model = getattr(transformers, job["auto"]).from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                out[f"{name}/{kind}"] = model(**batch).logits
        if "adapter" in job:  # PEFT's own way: the base from its folder, then the adapter onto it
            from peft import PeftModel
            base = getattr(transformers, job["auto"]).from_pretrained(job["base"], trust_remote_code=True)
            model = PeftModel.from_pretrained(base, job["adapter"]).eval()
            with torch.no_grad():
                out[f"{name}/peft"] = model(**batch).logits
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)
"""


@pytest.fixture(scope="module")
def reloaded(trained, adapters, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Logits of everything the Trainer and PEFT tests saved, loaded again in one fresh process: the Trainer's
    saved model, base + LoRA adapter through PEFT's PeftModel and through transformers' adapter loading (an Auto
    class on the adapter folder), and the merged model."""
    root = tmp_path_factory.mktemp("reload")
    jobs = {}
    for name in FAMILIES:
        save_file(trained[name]["batch"], str(root / f"{name}.safetensors"))
        jobs[name] = dict(
            auto=folder(name).auto_lm,
            batch=str(root / f"{name}.safetensors"),
            folders={
                "saved": str(trained[name]["saved"]),
                "auto_adapter": str(adapters[name]["adapter"]),
                "merged": str(adapters[name]["merged"]),
            },
            base=str(folder(name).path),
            adapter=str(adapters[name]["adapter"]),
        )
    run_fresh_here(RELOAD, json.dumps(jobs), str(root / "reloaded.safetensors"))
    return load_file(str(root / "reloaded.safetensors"))


@pytest.mark.parametrize("name", FAMILIES)
def test_trainer_save_model_reloads_through_auto_classes(trained, reloaded, name):
    assert_close(reloaded[f"{name}/saved"], trained[name]["logits"][1], atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------- PEFT
@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict]:
    """Per family: a LoRA adapter trained by Trainer (3 steps, gradient checkpointing) and saved, the logits with
    it, merged into the base, and the merged model saved."""
    from peft import LoraConfig, TaskType, get_peft_model

    results = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(f"lora_{name}")
        model, tokenizer = load(name)
        batch = batch_of(training_examples(name, tokenizer))
        _, base_logits = evaluate(model, batch)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        task = TaskType.SEQ_2_SEQ_LM if name == "bart_gen" else TaskType.CAUSAL_LM
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[name], task_type=task)
        peft_model = get_peft_model(model, config)
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        # LoRA + gradient checkpointing + Trainer, the usual combination. With reentrant checkpointing (4.57's
        # default) and frozen embeddings, the checkpointed layers need inputs that require grad, as for
        # transformers' own models: enable_input_require_grads() (a hook on the input embeddings) does that.
        peft_model.enable_input_require_grads()
        before, _ = evaluate(peft_model, batch)
        args = TrainingArguments(
            output_dir=str(root / "trainer"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            gradient_checkpointing=True,
        )
        Trainer(model=peft_model, args=args, train_dataset=training_examples(name, tokenizer)).train()
        after, lora_logits = evaluate(peft_model, batch)
        losses = [before, after]
        peft_model.save_pretrained(str(root / "adapter"))
        merged = peft_model.merge_and_unload()
        _, merged_logits = evaluate(merged, batch)
        merged.save_pretrained(str(root / "merged"))
        results[name] = dict(
            trainable=trainable,
            losses=losses,
            base_logits=base_logits,
            base_state=base_state,
            lora_logits=lora_logits,
            merged_logits=merged_logits,
            merged_type=type(merged).__name__,
            batch=batch,
            adapter=root / "adapter",
            merged=root / "merged",
        )
    return results


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_trains_only_the_adapter(adapters, name):
    result = adapters[name]
    targets = LORA_TARGETS[name]
    assert result["trainable"] and all("lora_" in n for n in result["trainable"]), result["trainable"]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in result["trainable"]} == set(targets)
    assert result["losses"][-1] < result["losses"][0]
    assert (result["lora_logits"] - result["base_logits"]).abs().max() > 1e-2, "the adapter changes nothing"
    adapter_config = json.loads((result["adapter"] / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(targets)
    assert adapter_config["base_model_name_or_path"] == str(folder(name).path)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_merge_gives_the_adapter_outputs(adapters, name):
    result = adapters[name]
    assert result["merged_type"] == type(load(name)[0]).__name__  # merge_and_unload returns the plain model
    assert_close(result["merged_logits"], result["lora_logits"], atol=1e-4, msg="merged vs adapter")
    merged_state = load_file(str(result["merged"] / "model.safetensors"))
    assert not any("lora" in key for key in merged_state)
    changed = [
        k
        for k in merged_state
        if k in result["base_state"] and not torch.equal(merged_state[k], result["base_state"][k])
    ]
    assert changed and all(any(t in k for t in LORA_TARGETS[name]) for k in changed), changed


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_adapter_and_merged_model_reload_fresh_process(adapters, reloaded, name):
    expected = adapters[name]["lora_logits"]
    assert_close(reloaded[f"{name}/peft"], expected, atol=1e-5, msg=f"{name}: PeftModel.from_pretrained")
    assert_close(reloaded[f"{name}/auto_adapter"], expected, atol=1e-5, msg=f"{name}: Auto class on the adapter")
    assert_close(reloaded[f"{name}/merged"], expected, atol=1e-4, msg=f"{name}: merged model")
