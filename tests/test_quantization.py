"""transformers' quantizers on every family: `from_pretrained(..., quantization_config=TorchAoConfig(...))`.

CPU (torchao int8 weight-only, `Int8WeightOnlyConfig`), per family (GLM, sparse GPT-2, BART-gen), in a fresh process
that loads the family's Hub-style folder through its Auto class:
- the linear layers hold torchao's quantized tensors and the logits stay close to the float32 model's (int8
  per-row weights: a relative error of about 1 / 255 per weight);
- greedy and beam generation run; `num_beams=1` beam search equals greedy;
- save_pretrained -> from_pretrained reproduces the quantized model's logits exactly (GLM, sparse GPT-2; BART-gen:
  see BART_RELOAD);
- QLoRA-style: a PEFT LoRA adapter on the int8 base trains (only adapter weights require grad, the base's
  quantized weights stay as they were) and the loss goes down.
GPU cases (bitsandbytes 4/8-bit, torchao int4 weight-only) are marked `gpu` and skip without CUDA.
The whole module skips when torchao is not installed (the README's test environment installs it: the `test` extra).
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.hub_folders import LORA_TARGETS, folder, run_fresh_here

torchao = pytest.importorskip(
    "torchao", reason="torchao is not installed (pip install -e '.[quant]'; the test extra has it)"
)

FAMILIES = ("glm", "gpt2_sparse", "bart_gen")

SCRIPT = """
import json, sys, torch, transformers
from transformers import TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig

path, auto_class, family, saved, tests_dir, targets = sys.argv[1:7]
sys.path.insert(0, tests_dir)
from fixtures.hub_folders import PROMPTS, training_examples

cls = getattr(transformers, auto_class)
tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
reference = cls.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
model = cls.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                            quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
out = {}
linears = {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
out["linear_weight_types"] = linears
batch = tok(PROMPTS[family], return_tensors="pt", padding=True)
single = tok(PROMPTS[family][:1], return_tensors="pt")
with torch.no_grad():
    logits, expected = model(**batch).logits, reference(**batch).logits
    out["logit_error"] = (logits - expected).abs().max().item()
    out["logit_scale"] = expected.abs().max().item()
    out["greedy"] = model.generate(**single, max_new_tokens=5, do_sample=False).tolist()
    out["beam1"] = model.generate(**single, max_new_tokens=5, do_sample=False, num_beams=1, early_stopping=False).tolist()
    out["beam3"] = model.generate(**single, max_new_tokens=5, do_sample=False, num_beams=3).tolist()
from peft import LoraConfig, get_peft_model
# LoRA first: after from_pretrained of a saved torchao folder (below), new nn.Linear weights come out non-leaf
# (transformers 5.23 + torchao 0.18), and an optimizer refuses them
base_model = cls.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
torch.manual_seed(0)
lora = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets.split(",")))
lora.train()
trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
out["trainable_all_lora"] = bool(trainable) and all("lora_" in name for name in trainable)
base = {n: m.weight.dequantize().clone() for n, m in base_model.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight.detach()) is not torch.Tensor}  # the quantized ones
examples = training_examples(family, tok)
train = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
losses = []
for _ in range(8):
    loss = lora(**train).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
out["losses"] = losses
out["base_unchanged"] = all(torch.equal(m.weight.dequantize(), base[n]) for n, m in base_model.named_modules() if n in base)
try:
    model.save_pretrained(saved)
    reloaded = cls.from_pretrained(saved, trust_remote_code=True).eval()
    with torch.no_grad():
        out["reload_equal"] = torch.equal(reloaded(**batch).logits, logits)
except Exception as err:
    out["reload_error"] = f"{type(err).__name__}: {str(err)[:200]}"

print(json.dumps(out))
"""

# BART-gen's save -> reload of a torchao-quantized model fails inside transformers 5.23's torchao deserializer
# (`unflatten_tensor_state_dict` gets a key without a module path); loading, generation and LoRA work.
BART_RELOAD = "known failure on transformers 5.x: BART-gen save/reload of a torchao model"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from helpers import REPO_ROOT

    found = {}
    for family in FAMILIES:
        f = folder(family)
        saved = tmp_path_factory.mktemp(f"{family}_int8") / "saved"
        stdout = run_fresh_here(
            SCRIPT, f.path, f.auto_lm, family, saved, REPO_ROOT / "tests", ",".join(LORA_TARGETS[family])
        )
        found[family] = json.loads(stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_weight_only_loads_and_stays_close(results, family):
    out = results[family]
    types = out["linear_weight_types"]
    body = {
        name: kind for name, kind in types.items() if name != "lm_head"
    }  # the tied head stays float (transformers' default)
    assert body and set(body.values()) == {"Int8Tensor"}, types
    assert out["logit_error"] <= 0.05 * out["logit_scale"], (out["logit_error"], out["logit_scale"])
    assert out["logit_error"] > 0, "the quantized model's logits equal the float model's: was it quantized at all?"


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_greedy_and_beam_generation(results, family):
    out = results[family]
    assert out["beam1"] == out["greedy"]
    prompt_len = len(out["greedy"][0]) - 5
    assert len(out["beam3"][0]) > prompt_len and out["beam3"][0][:prompt_len] == out["greedy"][0][:prompt_len]


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_save_and_reload(results, family):
    out = results[family]
    if "not serializable" in out.get("reload_error", ""):
        # transformers 4.x writes a torchao model only as a pickle (safe_serialization=False), which this project
        # never loads (weights_only, safetensors); 5.x writes safetensors
        pytest.xfail(f"transformers 4.x: torchao models are not serialised as safetensors ({out['reload_error']})")
    if family == "bart_gen" and "reload_error" in out:
        pytest.xfail(f"{BART_RELOAD}: {out['reload_error']}")
    assert out.get("reload_equal") is True, out.get("reload_error")


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_the_int8_base_trains_only_the_adapter(results, family):
    out = results[family]
    assert out["trainable_all_lora"]
    assert out["base_unchanged"]
    assert out["losses"][-1] < out["losses"][0], out["losses"]


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-4bit", "torchao-int4"])
def test_gpu_quantizers(family, scheme):
    _cuda()
    import transformers
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if scheme.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
        config = (
            BitsAndBytesConfig(load_in_8bit=True)
            if scheme == "bnb-8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        )
    else:
        from torchao.quantization import Int4WeightOnlyConfig

        config = TorchAoConfig(Int4WeightOnlyConfig(group_size=32))
    f = folder(family)
    tok = transformers.AutoTokenizer.from_pretrained(f.path, trust_remote_code=True)
    model = getattr(transformers, f.auto_lm).from_pretrained(
        f.path, trust_remote_code=True, dtype=torch.bfloat16, device_map="cuda", quantization_config=config
    )
    inputs = tok(f.prompts[:1], return_tensors="pt").to("cuda")
    greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    beam = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=3)
    assert greedy.shape[1] > inputs["input_ids"].shape[1] and beam.shape[0] == 1


ACCURACY_SCRIPT = """
import json, sys, torch
root, scripts = sys.argv[1], sys.argv[2]
sys.path.insert(0, scripts)
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig
import make_corpus
from demo import heldout_accuracy, select_items

tok = AutoTokenizer.from_pretrained(root, trust_remote_code=True)
items = make_corpus.build_corpus(0)["heldout"]
items = select_items([i for i in items if i.kind == "fact"], 80) + select_items([i for i in items if i.kind == "arith"], 80)
out = {}
for name, kwargs in (("fp32", {}), ("int8", {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())})):
    model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True, dtype=torch.float32, **kwargs).eval()
    result = heldout_accuracy(model, tok, items, progress=False)
    out[name] = [result["fact"], result["arith"]]
print(json.dumps(out))
"""


def test_default_model_int8_accuracy_within_one_point_of_fp32():
    """The embedded default model on a sample of the held-out split (80 facts + 80 sums, as
    tests/test_default_model.py): int8 weight-only exact-match accuracy within 1 point of float32."""
    from helpers import REPO_ROOT, run_fresh

    if not (REPO_ROOT / "model.safetensors").is_file():
        pytest.skip("no embedded default model (model.safetensors)")
    out = json.loads(run_fresh(ACCURACY_SCRIPT, REPO_ROOT, REPO_ROOT / "scripts", timeout=600).strip().splitlines()[-1])

    def accuracy(runs):
        return 100 * sum(ok for ok, _ in runs) / sum(n for _, n in runs)

    assert sum(n for _, n in out["int8"]) == 160
    assert abs(accuracy(out["int8"]) - accuracy(out["fp32"])) <= 1.0, out


COMPILE_SCRIPT = """
import json, sys, torch, torch._inductor.config, transformers
from torch._dynamo.utils import counters
from torchao.quantization import Int8WeightOnlyConfig, quantize_

torch._inductor.config.force_disable_caches = True  # a cached graph would skip the lowering this test looks for
path, auto_class, prompt = sys.argv[1:4]
model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head")
tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
inputs = tok([prompt], return_tensors="pt")
kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
with torch.no_grad():
    eager = model.generate(**inputs, **kwargs)
    model.compile_decode_step()
    compiled = model.generate(**inputs, **kwargs)
print(json.dumps({"same_ids": torch.equal(eager, compiled), "woq": counters["inductor"]["woq_matcher_count"],
                  "linears": sum(isinstance(m, torch.nn.Linear) for m in model.modules())}))
"""


@pytest.mark.slow
def test_compiled_int8_decode_step_uses_torchs_int8_kernel_on_cpu():
    """Batch-1 bf16 decoding on the CPU with torchao int8 weight-only: `compile_decode_step()` lowers every quantized
    linear layer to torch's int8 matrix-vector kernel (inductor's weight-only pattern; eager torchao converts each
    int8 weight to bf16 first, which made int8 decode slower than bf16). Inductor sets that lowering up once per
    process and only while oneDNN is on, and the batch-1 bf16 step turns oneDNN off (fast_cpu_gemv), so the first
    trace must happen with it on: hence a fresh process, where no earlier compile has done the set-up."""
    f = folder("glm")
    out = json.loads(run_fresh_here(COMPILE_SCRIPT, f.path, f.auto_lm, f.prompts[0]).strip().splitlines()[-1])
    assert out["same_ids"]
    # one lowering per quantized linear layer (all but the tied head) in each graph compiled (one or two)
    assert out["woq"] >= out["linears"] - 1 > 0, out
