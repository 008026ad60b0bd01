"""Held-out subjects of the toy world, with references, training prompts and evaluation prompts.

Each subject is a shape wearing the two-colour *split* pattern, which the base distribution never shows.
Its 5 references share one background (the grey studio) and vary pose, so a model that overfits them
draws the studio whatever the prompt says (the failure RPO's preference term is meant to prevent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from .world import BACKGROUND_PHRASES, SPLIT, Scene, render

# (context overrides, prompt phrase); colour changes put the colour before the identifier.
TRAINING_CONTEXTS: tuple[dict, ...] = (
    {"background": "moon"},
    {"background": "beach"},
    {"background": "snow"},
    {"background": "city"},
    {"background": "water"},
    {"accessory": "hat"},
    {"style": "painting"},
    {"color": "green"},
)
EVALUATION_CONTEXTS: tuple[dict, ...] = (
    {"background": "forest"},
    {"background": "volcano"},
    {"background": "night"},
    {"color": "purple"},
    {"background": "snow", "accessory": "hat"},
    {"background": "beach", "style": "painting"},
    {"background": "city", "accessory": "hat"},
    {"color": "orange", "background": "moon"},
)
REFERENCE_POSES: tuple[dict, ...] = (
    {"scale": 0.55, "x": 0.5, "y": 0.55, "angle": 0.0},
    {"scale": 0.45, "x": 0.38, "y": 0.6, "angle": 15.0},
    {"scale": 0.6, "x": 0.6, "y": 0.5, "angle": -20.0},
    {"scale": 0.5, "x": 0.45, "y": 0.48, "angle": 30.0},
    {"scale": 0.42, "x": 0.62, "y": 0.62, "angle": -10.0},
)
REFERENCE_BACKGROUND = "studio"


@dataclass(frozen=True)
class Subject:
    name: str
    shape: str
    color: str
    color2: str

    @property
    def class_noun(self) -> str:
        return self.shape

    def scene(self, **context) -> Scene:
        base = Scene(
            shape=self.shape,
            color=self.color,
            pattern=SPLIT,
            color2=self.color2,
            background=REFERENCE_BACKGROUND,
        )
        return replace(base, **context)

    def prompt(self, context: dict, identifier: str = "sks") -> str:
        """The prompt for a context: "a sks ball on the moon", "a green sks ball", "a sks ball wearing a hat"."""
        colour = f"{context['color']} " if "color" in context else ""
        parts = [f"a {colour}{identifier} {self.shape}"]
        phrase = BACKGROUND_PHRASES.get(context.get("background", REFERENCE_BACKGROUND), "")
        if phrase:
            parts.append(phrase)
        if context.get("accessory") == "hat":
            parts.append("wearing a hat")
        if context.get("style") == "painting":
            parts.append("in van gogh style")
        return " ".join(parts)

    def training_prompts(self, identifier: str = "sks") -> list[str]:
        return [self.prompt(c, identifier) for c in TRAINING_CONTEXTS]

    def evaluation_prompts(self, identifier: str = "sks") -> list[str]:
        return [self.prompt(c, identifier) for c in EVALUATION_CONTEXTS]

    def reference_scenes(self) -> list[Scene]:
        return [self.scene(**pose) for pose in REFERENCE_POSES]

    def reference_images(self, size: int = 32) -> list[Image.Image]:
        return [render(s, size=size, seed=i) for i, s in enumerate(self.reference_scenes())]

    def write_references(self, folder: str | os.PathLike, size: int = 32) -> Path:
        """Save the references as PNG files (for ``--instance_data_dir``)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(self.reference_images(size)):
            im.save(out / f"{self.name}_{i:02d}.png")
        return out


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("redblue_ball", "ball", "red", "blue"),
        Subject("yellowpurple_box", "box", "yellow", "purple"),
        Subject("greenorange_cone", "cone", "green", "orange"),
        Subject("whiteblack_ring", "ring", "white", "black"),
        # three per class noun; first colours avoid the prompts' colour changes (green, purple, orange)
        Subject("blueyellow_ball", "ball", "blue", "yellow"),
        Subject("blackorange_ball", "ball", "black", "orange"),
        Subject("redwhite_box", "box", "red", "white"),
        Subject("whitegreen_box", "box", "white", "green"),
        Subject("blueblack_cone", "cone", "blue", "black"),
        Subject("yellowred_cone", "cone", "yellow", "red"),
        Subject("redyellow_ring", "ring", "red", "yellow"),
        Subject("bluepurple_ring", "ring", "blue", "purple"),
    )
}


def list_subjects() -> list[str]:
    return list(SUBJECTS)


def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"Unknown toy subject {name!r}; choose one of {list(SUBJECTS)}.")
    return SUBJECTS[name]
