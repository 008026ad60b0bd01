"""The bundled toy world: a procedural renderer, held-out subjects, and small trained models.

See ``world.py`` for the scenes, ``subjects.py`` for the subjects RPO personalizes and ``models.py`` for
the bundled models (Stable Diffusion, scorer, evaluation encoders) and the ground-truth judge.
"""

from .models import (
    DEFAULT_EVALUATOR,
    DEFAULT_SCORER,
    EVALUATORS,
    SAMPLING,
    AttributeClassifier,
    asset_path,
    assets_available,
    context_accuracy,
    ground_truth_quality,
    identity_accuracy,
    load_classifier,
    load_evaluator,
    load_pipeline,
    load_scorer,
    object_accuracy,
    parse_prompt,
)
from .subjects import SUBJECTS, Subject, get_subject, list_subjects
from .world import Scene, random_scene, render

__all__ = [
    "DEFAULT_EVALUATOR",
    "DEFAULT_SCORER",
    "EVALUATORS",
    "SAMPLING",
    "SUBJECTS",
    "AttributeClassifier",
    "Scene",
    "Subject",
    "asset_path",
    "assets_available",
    "context_accuracy",
    "get_subject",
    "ground_truth_quality",
    "identity_accuracy",
    "list_subjects",
    "load_classifier",
    "load_evaluator",
    "load_pipeline",
    "load_scorer",
    "object_accuracy",
    "parse_prompt",
    "random_scene",
    "render",
]
