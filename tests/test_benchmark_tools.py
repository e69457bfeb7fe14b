"""The benchmark's arithmetic: per-token decode time, medians and spreads, the results files. A fake clock makes
the timing deterministic; no test here measures real speed (that is the benchmark's job, not CI's)."""

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))

import _common  # noqa: E402
import benchmark  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(_common.time, "perf_counter", fake.perf_counter)
    return fake


def test_summary_median_and_interquartile_spread():
    assert _common.summary([1.0, 2.0, 3.0]) == (2.0, 1.0)  # few samples: (max - min) / median
    median, spread = _common.summary([10.0, 10.0, 12.0, 14.0, 100.0])
    assert median == 12.0
    q1, _, q3 = (10.0, 12.0, 57.0)  # statistics.quantiles' default (exclusive) method on these five values
    assert spread == pytest.approx((q3 - q1) / 12.0)


def test_decode_time_excludes_the_prefill(clock):
    # a model whose generate costs 50 ms of prefill plus 2 ms (ours) or 3 ms (theirs) per token
    def maker(prefill_ms, token_ms):
        def make(n):
            def call():
                clock.now += (prefill_ms + token_ms * n) / 1000

            return call

        return make

    result = _common.decode_ms_per_token({"ours": maker(50, 2), "theirs": maker(80, 3)}, 16, 5, "cpu")
    assert result["ours"][0] == pytest.approx(2.0)
    assert result["theirs"][0] == pytest.approx(3.0)
    assert result["ours"][1] == pytest.approx(0.0, abs=1e-9)


def test_alternate_runs_cases_in_turn(clock):
    order = []
    cases = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    times = _common.alternate(cases, 3, "cpu")
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_ratio_row():
    row = _common.ratio_row("glm", "decode b=1", (2.0, 0.1), (4.0, 0.2), dtype="fp32")
    assert row["ratio"] == 0.5 and row["dtype"] == "fp32" and row["family"] == "glm"


def test_markdown_and_plot(tmp_path):
    rows = [
        _common.ratio_row("glm", "decode b=1", (2.0, 0.1), (4.0, 0.2), dtype="fp32"),
        _common.ratio_row("bart", "greedy b=1", (5.0, 0.1), (4.0, 0.2)),
        {"family": "bandwidth", "case": "tensor copy", "gb_per_s": 7.0},
    ]
    info = {"cpu": "test cpu", "cores": 2, "torch": "x", "transformers": "y", "date": "today"}
    text = benchmark.to_markdown(info, rows)
    assert "### glm" in text and "### bandwidth" in text and "| decode b=1 | 2 | 4 | 0.5 |" in text
    assert benchmark.label(rows[0]) == "glm: decode b=1 (fp32)"
    assert benchmark.plot_ratios(rows, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_benchmark_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--only", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "--only: unknown benchmark(s) ['nope']" in proc.stderr
    assert "_common" not in proc.stderr  # the shared helpers are not offered as a benchmark


def test_partial_run_keeps_other_families(tmp_path, monkeypatch):
    out = tmp_path / "results"
    out.mkdir()
    old = {"machine": {"cpu": "c"}, "rows": [{"family": "bart", "case": "x", "ratio": 1.0}, {"family": "tokenizer"}]}
    (out / "results.json").write_text(json.dumps(old))

    fake = type(sys)("fake_family")
    fake.run = lambda quick: [{"case": "new", "ratio": 0.5}]
    monkeypatch.setitem(sys.modules, "fake_family", fake)
    monkeypatch.setattr(benchmark.pkgutil, "iter_modules", lambda path: [type("M", (), {"name": "fake_family"})])
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--only", "fake_family", "--out", str(out)])
    assert benchmark.main() == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["family"] for row in rows] == ["bart", "tokenizer", "fake_family"]


def test_quick_run_never_replaces_the_measured_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = type(sys)("fake_family")
    fake.run = lambda quick: [{"case": "smoke", "ratio": 0.5}]
    monkeypatch.setitem(sys.modules, "fake_family", fake)
    monkeypatch.setattr(benchmark.pkgutil, "iter_modules", lambda path: [type("M", (), {"name": "fake_family"})])
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--quick", "--only", "fake_family"])
    assert benchmark.main() == 0
    assert (tmp_path / "benchmarks" / "results" / "quick" / "results.json").is_file()
    assert not (tmp_path / "benchmarks" / "results" / "results.json").exists()


@pytest.mark.parametrize("who", ["ours", "native"])
def test_model_step_loop_generates_what_generate_does(who):
    """bandwidth.py times the model alone with a hand-written greedy loop; it must decode exactly what generate()
    decodes (for our GLM, with the 2-D positions it advances by hand), or its timing measures something else."""
    import torch
    from bandwidth import stepper_for
    from fixtures import spread_glm_weights as spread_weights
    from glm import SIZES, build_native, build_ours, generator_for, prompt

    tiny = {**SIZES, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 128}
    model = (
        build_ours("chatglm", torch.float32, "cpu", sizes=tiny)
        if who == "ours"
        else build_native(torch.float32, "cpu", sizes=tiny)
    )
    with torch.no_grad():
        if who == "ours":  # enough spread that the greedy tokens depend on the history (see fixtures.spread_glm)
            spread_weights(model)
        ids = prompt(1, 12, "cpu")
        positions = model.transformer.get_position_ids(ids) if who == "ours" else None
        stepped = stepper_for(model, ids, positions)(10)()
        generated = generator_for(model, ids)(10)()[:, ids.shape[1] :]
    assert torch.equal(stepped, generated)
    assert len(set(stepped[0].tolist())) > 1  # not a constant run that any position ids would reproduce


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path):
    """scripts/benchmarks/gpu.py runs once, on a lent GPU, with no time to debug it there: its `--tiny --device cpu`
    dry run goes through every case (fresh process: it compiles) and writes every row."""
    script = REPO_ROOT / "scripts" / "benchmarks" / "gpu.py"
    run = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--glm-10b", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=script.parent,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert {name: result["variant"] for name, result in results.items()} == {"chatglm-6b": "chatglm", "glm-10b": "glm"}
    rows = results["chatglm-6b"]["rows"]
    decode = {(row["case"], row["model"]) for row in rows if row["case"].startswith("decode")}
    models = ("ours eager", "native eager", "native static+compile", "ours static+compile", "ours compile_decode_step")
    assert decode == {(f"decode b={b}", model) for b in (1, 2) for model in models}
    assert all(row["ms_per_token"] > 0 for row in rows if row["case"].startswith("decode"))
    (sweep,) = [row["after_prompt_length"] for row in rows if row["case"] == "recompiles b=1"]
    assert list(sweep) == ["37", "100", "200", "247", "300", "500"]
    assert all(entry["new_graphs"] == 0 for entry in sweep.values()), sweep  # the CPU's dynamic-shape graph
    assert {row["model"] for row in rows if row["case"].startswith("prefill")} == {"ours", "native"}


@pytest.mark.slow
def test_gpu_quantization_benchmark_dry_run_on_the_cpu(tmp_path):
    """scripts/benchmarks/gpu_quant.py, like gpu.py, goes through its cases on the CPU (int8; int4 is CUDA-only)."""
    pytest.importorskip("torchao")
    script = REPO_ROOT / "scripts" / "benchmarks" / "gpu_quant.py"
    run = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=script.parent,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_quant.json").read_text())["rows"]
    cases = {(row["case"], row["scheme"]) for row in rows}
    for case in ("weights and memory", "decode b=1, generate()", "decode b=1, compile_decode_step()"):
        assert {(case, "bf16"), (case, "int8")} <= cases
    assert ("skipped", "int4") in cases
    (int8,) = [row for row in rows if row["case"] == "weights and memory" and row["scheme"] == "int8"]
    (bf16,) = [row for row in rows if row["case"] == "weights and memory" and row["scheme"] == "bf16"]
    assert int8["weight_mib"] < bf16["weight_mib"] and 0 <= int8["ids_equal_to_bf16"] <= 1
