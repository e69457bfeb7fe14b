"""Pytest configuration shared by every test module."""

import os

import pytest
import torch

# Tests never touch the network; an isolated HF_HOME per session keeps the dynamic-module cache
# from leaking between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_OWN_HF_HOME: list[str] = []


def pytest_configure(config):
    # The controller makes one HF_HOME for the session; pytest-xdist workers inherit it.
    if "HF_HOME_FOR_TESTS_SET" not in os.environ:
        import tempfile

        os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_tests_")
        os.environ["HF_HOME_FOR_TESTS_SET"] = "1"
        _OWN_HF_HOME.append(os.environ["HF_HOME"])
    # A worker of pytest-xdist gets one core; oversubscription slows tiny models down a lot.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    import shutil

    for path in _OWN_HF_HOME:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
