"""The settings of a run on the tiny pipeline (32 px, 2 sampling steps, a few optimiser steps), for tests."""

from __future__ import annotations

import os
from typing import Any

from ..config import RPOConfig

TINY_RUN = dict(
    class_noun="dog",
    resolution=32,
    num_inference_steps=2,
    validation_num_inference_steps=2,
    guidance_scale=2.0,
    images_per_prompt=1,
    num_validation_images=1,
    max_train_steps=4,
    validation_steps=2,
    report_to="none",
)


def tiny_config(model: str | os.PathLike, output_dir: str | os.PathLike, **overrides: Any) -> RPOConfig:
    """An :class:`RPOConfig` for the tiny pipeline at ``model``; ``overrides`` replace any setting."""
    settings: dict[str, Any] = {
        **TINY_RUN,
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(output_dir),
        **overrides,
    }
    return RPOConfig(**settings)
