"""rpo-diffusers: Reward Preference Optimization for subject-driven personalization of diffusion models."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Lazy attribute access keeps `import rpo_diffusers` fast and lets light modules (prompts, losses)
# be used without importing diffusers/transformers.
_LAZY = {
    "lambda_harmonic": "rpo_diffusers.rewards",
    "LambdaHarmonicScorer": "rpo_diffusers.rewards",
    "RPOConfig": "rpo_diffusers.config",
    "RPOTrainer": "rpo_diffusers.trainer",
    "RPOTrainingResult": "rpo_diffusers.trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rpo_diffusers' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .config import RPOConfig
    from .rewards import LambdaHarmonicScorer, lambda_harmonic
    from .trainer import RPOTrainer, RPOTrainingResult
