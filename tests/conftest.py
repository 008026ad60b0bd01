"""Shared pytest setup: deterministic, offline, one torch thread per xdist worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO_ROOT.parent / "shared" / "dreambench"


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    """The DreamBench copy beside the project; tests that need it skip when it is absent."""
    if not (DREAMBENCH / "prompts_and_classes.txt").exists():
        pytest.skip("../shared/dreambench is not present")
    return DREAMBENCH
