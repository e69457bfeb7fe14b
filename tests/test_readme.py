"""The README tells the truth: its Quick start commands are the ones CI runs, and its snippets run."""

import re

import pytest
from helpers import REPO_ROOT, run_fresh

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
MARKER = "<!-- readme-test: runs against the repository root -->"


def test_front_matter_is_a_model_card():
    front = README.split("---", 2)[1]
    for key in ("library_name: transformers", "pipeline_tag:", "license:", "tags:"):
        assert key in front, f"README front matter lacks {key!r}"


def test_quick_start_holds_exactly_the_two_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"], commands
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci, ".ci/run must run the README's test command"


def _marked_snippets() -> list[str]:
    return re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", README, re.S)


def test_marked_snippets_exist():
    assert _marked_snippets(), "no README snippet is marked as tested"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_marked_snippets())))
def test_marked_snippet_runs(index):
    if not (REPO_ROOT / "model.safetensors").is_file():
        pytest.skip("the embedded default model is not at the repository root")
    out = run_fresh(_marked_snippets()[index], cwd=REPO_ROOT)
    assert out.strip(), "the snippet printed nothing"
