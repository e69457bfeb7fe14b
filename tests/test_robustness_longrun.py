"""Long runs keep memory flat: many generate() calls on one model object, and repeated load / unload.

Measured in a fresh process (helpers.run_fresh) from /proc/self/statm after a garbage collection and `malloc_trim`,
after warm-up batches. Besides the 5% RSS bound of the issue, the leaks that would cause growth are checked
directly: no transformers Cache object survives a generate() call, no forward hook accumulates on the model, the
number of live Python objects does not grow, and an unloaded model is freed (a weak reference to it dies).
"""

from __future__ import annotations

import json

import pytest
from helpers import REPO_ROOT, run_fresh

LONG_RUN = """
import ctypes, gc, json, os, sys, weakref
import torch, transformers
from transformers.cache_utils import Cache
sys.path.insert(0, sys.argv[1])
from fixtures import bart_model, sparse_model

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
ROOT, PAGE = sys.argv[2], os.sysconf("SC_PAGE_SIZE")
try:
    TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except OSError:
    TRIM = lambda pad: None


def rss():
    gc.collect()
    TRIM(0)  # give freed heap pages back, so RSS reflects live memory
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run(model, make_batch, warmup, batches, **generate_kwargs):
    with torch.no_grad():
        for i in range(warmup):
            model.generate(**make_batch(i), **generate_kwargs)
        hooks0, rss0, objects0 = hooks(model), rss(), len(gc.get_objects())
        sequences = 0
        for i in range(batches):
            batch = make_batch(warmup + i)
            sequences += model.generate(**batch, **generate_kwargs).shape[0]
        rss1, objects1 = rss(), len(gc.get_objects())
    caches = sum(isinstance(o, Cache) for o in gc.get_objects())
    return dict(sequences=sequences, rss0=rss0, rss1=rss1, objects=objects1 - objects0, caches=caches,
                hooks=[hooks0, hooks(model)])


g = torch.Generator().manual_seed(0)
tok = transformers.AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)
glm = transformers.AutoModelForCausalLM.from_pretrained(ROOT, trust_remote_code=True).eval()
words = ["the", "capital", "of", "is", "paris", "one", "two", "plus", "river", "city", "three"]


def glm_batch(i):
    texts = []
    for _ in range(50):
        n = int(torch.randint(2, 12, (1,), generator=g))
        texts.append(" ".join(words[j] for j in torch.randint(0, len(words), (n,), generator=g).tolist()) + " [MASK]")
    return tok(texts, return_tensors="pt", padding=True)  # left-padded, different lengths in every batch


def ids_batch(low, high, length):
    def make(i):
        n = 3 + i % length
        mask = (torch.arange(n) >= torch.randint(0, n - 1, (50, 1), generator=g)).long()  # left padding
        return {"input_ids": torch.randint(low, high, (50, n), generator=g), "attention_mask": mask}
    return make


greedy = dict(max_new_tokens=4, do_sample=False)
results = {
    "glm": run(glm, glm_batch, 5, 40, **greedy),
    "bart": run(bart_model(), ids_batch(3, 99, 8), 2, 10, **greedy),
    "sparse": run(sparse_model(), ids_batch(0, 120, 8), 2, 10, pad_token_id=0, **greedy),
}

alive, sizes = [], []
for i in range(12):
    model = transformers.AutoModelForCausalLM.from_pretrained(ROOT, trust_remote_code=True)
    with torch.no_grad():
        model(**tok(["one plus [MASK] is three"], return_tensors="pt"))
    alive.append(weakref.ref(model))
    del model
    sizes.append(rss())
results["load"] = dict(rss=sizes, alive=sum(ref() is not None for ref in alive))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_memory_stays_flat_over_long_generation_and_reloads():
    results = json.loads(run_fresh(LONG_RUN, str(REPO_ROOT / "tests"), str(REPO_ROOT)).strip().splitlines()[-1])
    assert results["glm"]["sequences"] == 2000
    for family in ("glm", "bart", "sparse"):
        r = results[family]
        growth = (r["rss1"] - r["rss0"]) / r["rss0"]
        assert growth < 0.05, f"{family}: RSS grew {growth:.1%} over {r['sequences']} sequences"
        assert r["caches"] == 0, f"{family}: {r['caches']} Cache objects outlived generate()"
        assert r["hooks"][0] == r["hooks"][1], f"{family}: forward hooks accumulate {r['hooks']}"
        assert r["objects"] < 1000, f"{family}: {r['objects']} more live Python objects after the run"
    load = results["load"]
    assert load["alive"] == 0, f"{load['alive']} unloaded models are still referenced"
    assert load["rss"][-1] < 1.05 * load["rss"][2], f"RSS over 12 loads (MiB): {[r >> 20 for r in load['rss']]}"
