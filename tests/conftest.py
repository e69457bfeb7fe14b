"""Pytest configuration shared by every test module."""

import os

import pytest
import torch

# Tests never touch the network; an isolated HF_HOME per session keeps the dynamic-module cache
# from leaking between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    if "HF_HOME_FOR_TESTS_SET" not in os.environ:
        import tempfile

        os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_tests_")
        os.environ["HF_HOME_FOR_TESTS_SET"] = "1"
    # A worker of pytest-xdist gets one core; oversubscription slows tiny models down a lot.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
