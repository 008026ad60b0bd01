"""rpo-diffusers: subject-driven personalization of diffusion models with RPO, DreamBooth and DPG on one loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .quiet import silence_processor_fallback

silence_processor_fallback()  # before anything imports diffusers' pipelines (see quiet.py)

# Lazy attribute access keeps `import rpo_diffusers` fast and lets light modules (prompts, losses)
# be used without importing diffusers/transformers.
_LAZY = {
    "lambda_harmonic": "rpo_diffusers.rewards",
    "LambdaHarmonicScorer": "rpo_diffusers.rewards",
    "DinoReward": "rpo_diffusers.rewards",
    "RPOConfig": "rpo_diffusers.config",
    "PersonalizationConfig": "rpo_diffusers.config",
    "RPOTrainer": "rpo_diffusers.trainer",
    "PersonalizationTrainer": "rpo_diffusers.trainer",
    "RPOTrainingResult": "rpo_diffusers.trainer",
    "TrainingResult": "rpo_diffusers.trainer",
    "DPGObjective": "rpo_diffusers.objectives",
    "DreamBoothObjective": "rpo_diffusers.objectives",
    "RPOObjective": "rpo_diffusers.objectives",
    "DiffusersComponents": "rpo_diffusers.components",
    "SDXLComponents": "rpo_diffusers.sdxl",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rpo_diffusers' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .components import DiffusersComponents
    from .config import PersonalizationConfig, RPOConfig
    from .objectives import DPGObjective, DreamBoothObjective, RPOObjective
    from .rewards import DinoReward, LambdaHarmonicScorer, lambda_harmonic
    from .sdxl import SDXLComponents
    from .trainer import PersonalizationTrainer, RPOTrainer, RPOTrainingResult, TrainingResult
