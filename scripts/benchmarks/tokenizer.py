"""GLM tokenizer speed: `GLMTokenizer` against the raw SentencePiece processor it wraps (the floor).

    python scripts/benchmark.py --only tokenizer [--quick]
    python scripts/benchmarks/tokenizer.py [--quick]

Cases, for the "chatglm" flavour (ice_text.model, 130k pieces) and the "glm-chinese" flavour
(cog-pretrain.model, 50k pieces), from tests/data/tokenizers (or $GLM_TOKENIZER_DATA):
- `encode 1MB`: `tok(text)["input_ids"]` on 1 MiB of mixed Chinese / English / code text, against
  `sp.encode(text)` (ids, no whitespace encoding, no special-token splitting);
- `batch 1000 short`: `tok(texts, padding=True)` on 1,000 short texts, against `sp.encode(texts)`.
`ratio` = ours / native (above 1.0: slower than the bare processor; the gap is transformers' Python
encode pipeline plus ChatGLM's whitespace pre-processing). THUDM's own ChatGLMTokenizer cannot run here
(it needs transformers <= 4.33 and its code is not part of this repository); measured once in a scratch
environment on the 2-core development machine it took ~590 ms for the 1 MiB text and ~55 ms for the
1,000 texts (GLM's GLMChineseTokenizer: ~680 ms and ~32 ms), under transformers 4.33.3.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from _common import repo_module

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DATA = Path(os.environ.get("GLM_TOKENIZER_DATA", REPO_ROOT / "tests" / "data" / "tokenizers"))
SAMPLE = (
    "GLM 是一个通用语言模型，支持自回归空白填充。The quick brown fox jumps over the lazy dog, 3.14 times.\n"
    "def fill(blank):\n\tif blank:\n        return model.generate(blank)  # 生成\n"
)
SHORT = ["你好", "北京是[MASK]的首都", "hello world", "def f(x):\n\treturn x", "GLM 模型 😀", "清华大学位于北京"]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _compare(ours, native, repeats: int) -> tuple[float, float]:
    """Median ms of each, measured alternately so machine noise hits both alike (one warm-up call each)."""
    ours(), native()
    a, b = [], []
    for _ in range(repeats):
        a.append(_median_ms(ours, 1))
        b.append(_median_ms(native, 1))
    return statistics.median(a), statistics.median(b)


def run(quick: bool = False) -> list[dict]:
    GLMTokenizer = repo_module("tokenization_glm").GLMTokenizer

    size = (1 << 18) if quick else (1 << 20)
    text = (SAMPLE * (size // len(SAMPLE.encode("utf-8")) + 1)).encode("utf-8")[:size].decode("utf-8", "ignore")
    texts = [SHORT[i % len(SHORT)] + f" {i}" for i in range(1000)]
    repeats = 3 if quick else 5
    rows = []
    for flavour, vocab in [("chatglm", "ice_text.model"), ("glm-chinese", "cog-pretrain.model")]:
        tok = GLMTokenizer(str(DATA / vocab), flavour=flavour)
        sp = tok._vocab.sp
        for case, ours, native in [
            (f"encode {size >> 10}KiB", lambda tok=tok: tok(text)["input_ids"], lambda sp=sp: sp.encode(text)),
            ("batch 1000 short", lambda tok=tok: tok(texts, padding=True), lambda sp=sp: sp.encode(texts)),
        ]:
            ours_ms, native_ms = _compare(ours, native, repeats)
            rows.append(
                {
                    "family": "tokenizer",
                    "case": f"{flavour}: {case}",
                    "ours_ms": ours_ms,
                    "native_ms": native_ms,
                    "ratio": ours_ms / native_ms,
                }
            )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
