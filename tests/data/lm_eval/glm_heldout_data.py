"""Loads a glm_heldout task's JSON-lines file from this folder (made by scripts/make_eval_tasks.py)."""

import json
from pathlib import Path


def load(file, **_):
    import datasets

    lines = Path(__file__).with_name(file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
