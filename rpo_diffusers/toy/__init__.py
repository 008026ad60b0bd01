"""The bundled toy world: a procedural renderer, held-out subjects, and (once built) small trained models.

See ``world.py`` for the scenes and ``subjects.py`` for the subjects RPO personalizes.
"""

from .subjects import SUBJECTS, Subject, get_subject, list_subjects
from .world import Scene, random_scene, render

__all__ = ["SUBJECTS", "Scene", "Subject", "get_subject", "list_subjects", "random_scene", "render"]
