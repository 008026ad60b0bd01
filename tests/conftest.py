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

# One thread per process: the suite's models are tiny, and on a small shared CPU several threads per
# process fight over the cores (about 10x slower without -n, where nothing else pinned them).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO_ROOT.parent / "shared" / "dreambench"


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    """The DreamBench copy beside the project; tests that need it skip when it is absent."""
    if not (DREAMBENCH / "prompts_and_classes.txt").exists():
        pytest.skip("../shared/dreambench is not present")
    return DREAMBENCH


@pytest.fixture(scope="session")
def tiny_scorer_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random ALIGN, CLIP and SigLIP dual encoders saved to disk (loaded back via from_pretrained)."""
    from rpo_diffusers.testing.tiny_scorers import FAMILIES, build_tiny_scorer

    root = tmp_path_factory.mktemp("scorers")
    return {family: build_tiny_scorer(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def clip_scorer(tiny_scorer_dirs):
    """The tiny CLIP scorer the trainer tests train with."""
    from rpo_diffusers.rewards import LambdaHarmonicScorer

    return LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"])


@pytest.fixture(scope="session")
def references():
    """Three seeded noise photos: the 'subject' of the trainer tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    from rpo_diffusers.testing.tiny_scorers import build_tiny_vit

    return build_tiny_vit(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture(scope="session")
def sample_images():
    """Six distinct real RGB PIL images (smooth gradients and shapes, different sizes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = []
    for i in range(6):
        w, h = 40 + 4 * i, 36 + 2 * i
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * (3 + i)) % 256, (yy * (5 + 2 * i)) % 256, ((xx + yy) * 7 * (i + 1)) % 256], -1)
        im = Image.fromarray(arr.astype("uint8"))
        ImageDraw.Draw(im).ellipse((5 + i, 5, 25 + i, 20 + i), fill=(255 - 30 * i, 40 * i, 120))
        images.append(im)
    return images


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline folder (ε-prediction, 32 px)."""
    from rpo_diffusers.testing.tiny_pipeline import build_tiny_pipeline

    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    build_tiny_pipeline(path)
    return path


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerate keeps process-wide state; each test gets a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
