"""`model.push_to_hub` / `tokenizer.push_to_hub` for every family (issue 9), with the Hub client replaced by a local
fake (no network): the commits hold exactly what a Hub repository needs (code files, config.json with `auto_map`,
safetensors weights, generation config, tokenizer files, a README model card), and a fresh process loads the
committed files through the Auto classes and generates the ids the pushing process generated.

Patch points (see docs/transformers-contract.md §8): transformers 5.x calls `transformers.utils.hub.hf_api()`,
which returns the module's `_hf_api` when set; 4.57 calls the `create_repo` / `create_commit` / `create_branch`
functions it imported into `transformers.utils.hub`. Both build the model card with `hub.ModelCard.load`, which
the fake answers like a new repository (no README yet), so transformers writes its own template card.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as hub
from fixtures.hub_folders import CODE_FILES, FAMILIES, folder, load, run_fresh_here
from helpers import code_files
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file

MODEL_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors"}
# tokenizer files a repository needs, and those transformers may add (which versions write which differs)
TOKENIZER_NEEDS = {
    "glm": {"tokenizer.model", "tokenizer_config.json", *code_files("tokenization_glm.py")},
    "glm-10b": {"tokenizer.model", "tokenizer_config.json", *code_files("tokenization_glm.py")},
    "gpt2_sparse": {"tokenizer_config.json"},
    "bart_gen": {"tokenizer_config.json"},
}
TOKENIZER_MAY = {"README.md", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"}
BPE_FILES = ({"vocab.json", "merges.txt"}, {"tokenizer.json"})  # a slow or a fast BPE tokenizer, at least one


class FakeHub:
    """The three Hub calls push_to_hub makes, writing commits into `root/<repo_id>/` and recording them."""

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[tuple[str, str, list[str]]] = []

    def create_repo(self, repo_id: str, *args, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_branch(self, *args, **kwargs) -> None:
        return None

    def create_commit(self, repo_id: str, operations, commit_message: str | None = None, **kwargs):
        files = []
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
            files.append(operation.path_in_repo)
        self.commits.append((repo_id, commit_message, sorted(files)))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)


class NewRepoModelCard(hub.ModelCard):
    @classmethod
    def load(cls, *args, **kwargs):
        raise EntryNotFoundError("README.md: no such file in the (fake, new) repository")


def patch_hub(monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> None:
    if hasattr(hub, "_hf_api"):  # 5.x
        monkeypatch.setattr(hub, "_hf_api", fake)
    for name in ("create_repo", "create_commit", "create_branch"):  # 4.57
        if hasattr(hub, name):
            monkeypatch.setattr(hub, name, getattr(fake, name))
    monkeypatch.setattr(hub, "ModelCard", NewRepoModelCard)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[FakeHub, dict[str, torch.Tensor]]:
    """Every family pushed (model, then tokenizer) to the fake Hub; the ids each generates before pushing."""
    fake = FakeHub(tmp_path_factory.mktemp("hub"))
    expected = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_hub(monkeypatch, fake)
        for name in FAMILIES:
            model, tokenizer = load(name)  # through the Auto classes, as users get it
            inputs = tokenizer(folder(name).prompts[:1], return_tensors="pt")
            with torch.no_grad():
                expected[name] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            model.push_to_hub(f"someone/{name}")
            tokenizer.push_to_hub(f"someone/{name}")
    return fake, expected


@pytest.mark.parametrize("name", FAMILIES)
def test_push_commits_exactly_the_repository_files(pushed, name):
    fake, _ = pushed
    commits = [(message, files) for repo, message, files in fake.commits if repo == f"someone/{name}"]
    assert len(commits) == 2, commits  # one for the model, one for the tokenizer
    (_, model_files), (tokenizer_message, tokenizer_files) = commits
    assert set(model_files) == MODEL_FILES | set(CODE_FILES[name])
    assert tokenizer_message == "Upload tokenizer"
    assert (
        TOKENIZER_NEEDS[name] <= set(tokenizer_files) <= TOKENIZER_NEEDS[name] | TOKENIZER_MAY | set().union(*BPE_FILES)
    ), tokenizer_files
    if not name.startswith("glm"):
        assert any(needed <= set(tokenizer_files) for needed in BPE_FILES), tokenizer_files


@pytest.mark.parametrize("name", FAMILIES)
def test_pushed_config_names_committed_code_and_card_is_transformers(pushed, name):
    fake, _ = pushed
    repo = fake.root / "someone" / name
    config = json.loads((repo / "config.json").read_text())
    auto_map = config["auto_map"]
    assert {"AutoConfig", folder(name).auto_lm} <= set(auto_map)
    for reference in auto_map.values():
        assert (repo / (reference.split(".")[0] + ".py")).is_file(), reference
    generation = json.loads((repo / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] and generation["pad_token_id"] == config["pad_token_id"]
    card = (repo / "README.md").read_text()
    assert card.startswith("---") and "library_name: transformers" in card.split("---")[1]
    if name.startswith("glm"):  # the remote-code tokenizer names its own code file
        tokenizer_config = json.loads((repo / "tokenizer_config.json").read_text())
        assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_glm.GLMTokenizer"


LOAD_PUSHED = """
    import json, sys, torch, transformers
    from safetensors.torch import save_file
    jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
    out = {}
    for name, job in jobs.items():
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["repo"], trust_remote_code=True)
        model = getattr(transformers, job["auto"]).from_pretrained(job["repo"], trust_remote_code=True).eval()
        inputs = tokenizer(job["prompts"][:1], return_tensors="pt")
        with torch.no_grad():
            out[name] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)
"""


def test_pushed_repositories_load_and_generate_the_same_ids_in_a_fresh_process(pushed, tmp_path):
    fake, expected = pushed
    jobs = {
        name: dict(repo=str(fake.root / "someone" / name), auto=folder(name).auto_lm, prompts=folder(name).prompts)
        for name in FAMILIES
    }
    run_fresh_here(LOAD_PUSHED, json.dumps(jobs), str(tmp_path / "ids.safetensors"))
    generated = load_file(str(tmp_path / "ids.safetensors"))
    for name in FAMILIES:
        assert expected[name].shape[1] > len(folder(name).prompts[0].split()), "nothing was generated"
        assert torch.equal(generated[name], expected[name]), name


def test_without_the_fake_push_to_hub_fails_offline_before_writing(tmp_path, monkeypatch):
    """The fake is what keeps the tests off the network: unpatched, an offline push stops at create_repo."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if hasattr(hub, "_hf_api"):
        monkeypatch.setattr(hub, "_hf_api", None)  # a fresh client reads the offline setting
    model, _ = load("gpt2_sparse")
    with pytest.raises(Exception) as raised:
        model.push_to_hub("someone/offline")
    assert type(raised.value).__name__ == "OfflineModeIsEnabled", raised.value
