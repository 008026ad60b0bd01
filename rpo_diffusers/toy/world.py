"""A procedural world with known ground truth, small enough to run RPO end to end on a CPU.

One object per image (a shape with a colour pattern, a size and a pose) in a context (a background, a
colour change, an accessory or a style filter), with a caption in the prompts' grammar:
"a red striped ball on the beach". Held-out *subjects* wear a two-colour split pattern that the base
training distribution never contains, so the base model cannot draw them until it is personalized.
Everything is deterministic given a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("ball", "box", "cone", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 170),
    "orange": (240, 130, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SPLIT = "split"  # the held-out subjects' pattern: two colours, left half / right half
# Contexts mirror the kinds of RPO training prompts: re-contextualisation, colour change, accessory, style.
BACKGROUNDS = ("studio", "beach", "snow", "moon", "city", "water", "night", "forest", "volcano")
ACCESSORIES = ("none", "hat")
STYLES = ("photo", "painting")

BACKGROUND_PHRASES = {
    "studio": "",
    "beach": "on the beach",
    "snow": "in the snow",
    "moon": "on the moon",
    "city": "in the city",
    "water": "in the water",
    "night": "at night",
    "forest": "in the forest",
    "volcano": "with a volcano in the background",
}


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image."""

    shape: str
    color: str
    pattern: str = "plain"
    color2: str = "white"  # second colour of striped/dotted/checkered/split patterns
    background: str = "studio"
    accessory: str = "none"
    style: str = "photo"
    scale: float = 0.55  # object diameter as a fraction of the image
    x: float = 0.5
    y: float = 0.55
    angle: float = 0.0  # degrees

    def caption(self, identifier: str | None = None) -> str:
        """ "a red striped ball on the beach"; with an identifier the appearance words become it:
        "a sks ball on the beach" (a colour-change prompt keeps the colour: "a green sks ball")."""
        if identifier:
            words = ["a", identifier, self.shape]
        else:
            pattern = "" if self.pattern == "plain" else self.pattern
            if self.pattern == SPLIT:
                words = ["a", f"{self.color} and {self.color2}", self.shape]
            else:
                words = ["a", self.color, pattern, self.shape]
        tail = []
        if BACKGROUND_PHRASES[self.background]:
            tail.append(BACKGROUND_PHRASES[self.background])
        if self.accessory == "hat":
            tail.append("wearing a hat")
        if self.style == "painting":
            tail.append("in van gogh style")
        return " ".join(w for w in [*words, *tail] if w)


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def _background(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    s = size
    im = Image.new("RGB", (s, s), (150, 150, 150))
    d = ImageDraw.Draw(im)
    horizon = int(s * 0.62)
    if kind == "studio":
        d.rectangle((0, 0, s, s), fill=(150, 150, 150))
        d.rectangle((0, horizon, s, s), fill=(120, 120, 120))
    elif kind == "beach":
        d.rectangle((0, 0, s, horizon // 2), fill=(120, 190, 240))
        d.rectangle((0, horizon // 2, s, horizon), fill=(30, 110, 200))
        d.rectangle((0, horizon, s, s), fill=(235, 210, 150))
    elif kind == "snow":
        d.rectangle((0, 0, s, horizon), fill=(190, 200, 215))
        d.rectangle((0, horizon, s, s), fill=(250, 250, 252))
        for _ in range(25):
            x, y = rng.integers(0, s, 2)
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 255, 255))
    elif kind == "moon":
        d.rectangle((0, 0, s, s), fill=(5, 5, 15))
        d.rectangle((0, horizon, s, s), fill=(130, 130, 130))
        for _ in range(6):
            x, y = int(rng.integers(0, s)), int(rng.integers(horizon + 4, s))
            r = int(rng.integers(3, 8))
            d.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=(95, 95, 95))
    elif kind == "city":
        d.rectangle((0, 0, s, s), fill=(170, 190, 210))
        x = 0
        while x < s:
            w, h = int(rng.integers(s // 10, s // 5)), int(rng.integers(s // 4, int(s * 0.6)))
            d.rectangle((x, horizon - h, x + w, horizon), fill=(70, 70, 85))
            x += w + 2
        d.rectangle((0, horizon, s, s), fill=(90, 90, 90))
    elif kind == "water":
        d.rectangle((0, 0, s, s), fill=(40, 150, 210))
        for y in range(8, s, 14):
            d.arc((-10, y, s + 10, y + 14), 200, 340, fill=(200, 235, 250), width=2)
    elif kind == "night":
        d.rectangle((0, 0, s, s), fill=(15, 20, 70))
        d.rectangle((0, horizon, s, s), fill=(20, 30, 40))
        for _ in range(30):
            x, y = int(rng.integers(0, s)), int(rng.integers(0, horizon))
            d.point((x, y), fill=(255, 255, 200))
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 200))
    elif kind == "forest":
        d.rectangle((0, 0, s, s), fill=(170, 215, 170))
        d.rectangle((0, horizon, s, s), fill=(60, 110, 40))
        for _ in range(7):
            x = int(rng.integers(0, s))
            d.rectangle((x - 2, horizon - s // 6, x + 2, horizon), fill=(90, 60, 30))
            d.polygon(
                [(x - s // 10, horizon - s // 7), (x + s // 10, horizon - s // 7), (x, horizon - s // 2)],
                fill=(20, 90, 30),
            )
    elif kind == "volcano":
        d.rectangle((0, 0, s, s), fill=(240, 170, 120))
        d.polygon(
            [(s * 0.05, horizon), (s * 0.95, horizon), (s * 0.62, s * 0.12), (s * 0.38, s * 0.12)],
            fill=(80, 50, 40),
        )
        d.polygon(
            [(s * 0.38, s * 0.12), (s * 0.62, s * 0.12), (s * 0.56, s * 0.25), (s * 0.44, s * 0.25)],
            fill=(230, 60, 20),
        )
        d.rectangle((0, horizon, s, s), fill=(60, 45, 40))
    else:
        raise ValueError(f"Unknown background {kind!r}; known: {BACKGROUNDS}")
    return im


def _shape_mask(shape: str, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    pad = size * 0.04
    if shape == "ball":
        d.ellipse((pad, pad, size - pad, size - pad), fill=255)
    elif shape == "box":
        d.rectangle((pad * 2, pad * 2, size - pad * 2, size - pad * 2), fill=255)
    elif shape == "cone":
        d.polygon([(size / 2, pad), (size - pad, size - pad), (pad, size - pad)], fill=255)
    elif shape == "ring":
        d.ellipse((pad, pad, size - pad, size - pad), fill=255)
        inner = size * 0.3
        d.ellipse((inner, inner, size - inner, size - inner), fill=0)
    else:
        raise ValueError(f"Unknown shape {shape!r}; known: {SHAPES}")
    return m


def _texture(pattern: str, c1: tuple, c2: tuple, size: int) -> Image.Image:
    tex = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(tex)
    step = max(size // 6, 2)
    if pattern == "striped":
        for y in range(0, size, 2 * step):
            d.rectangle((0, y, size, y + step - 1), fill=c2)
    elif pattern == "dotted":
        r = max(step // 3, 1)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse((x - r, y - r, x + r, y + r), fill=c2)
    elif pattern == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=c2)
    elif pattern == SPLIT:
        d.rectangle((size // 2, 0, size, size), fill=c2)
    elif pattern != "plain":
        raise ValueError(f"Unknown pattern {pattern!r}; known: {(*PATTERNS, SPLIT)}")
    return tex


def _paint(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The 'van gogh' style: posterised colours and short swirling strokes."""
    arr = (np.asarray(image, dtype=np.int16) // 48 * 48 + 24).clip(0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    d = ImageDraw.Draw(out)
    s = image.size[0]
    for _ in range(s // 2):
        x, y = (int(v) for v in rng.integers(0, s, 2))
        c = tuple(int(v) for v in arr[y, x])
        a = rng.uniform(0, 2 * math.pi)
        d.line(
            (x, y, x + 5 * math.cos(a), y + 5 * math.sin(a)),
            fill=(min(c[0] + 40, 255), min(c[1] + 40, 255), c[2]),
            width=2,
        )
    return out.filter(ImageFilter.SMOOTH)


def render(scene: Scene, size: int = 32, seed: int = 0, supersample: int = 4) -> Image.Image:
    """Draw a scene (drawn at ``size * supersample`` and downsampled for clean edges)."""
    rng = np.random.default_rng(seed)
    big = size * supersample
    image = _background(scene.background, big, rng)
    obj = max(int(big * scene.scale), 8)
    c1, c2 = COLORS[scene.color], COLORS[scene.color2]
    tex = _texture(scene.pattern, c1, c2, obj)
    mask = _shape_mask(scene.shape, obj)
    if scene.angle:
        tex = tex.rotate(scene.angle, resample=Image.BICUBIC)
        mask = mask.rotate(scene.angle, resample=Image.BICUBIC)
    cx, cy = int(scene.x * big), int(scene.y * big)
    image.paste(tex, (cx - obj // 2, cy - obj // 2), mask)
    if scene.accessory == "hat":
        d = ImageDraw.Draw(image)
        top = cy - obj // 2
        brim = obj * 0.45
        d.rectangle((cx - brim, top - obj * 0.06, cx + brim, top + obj * 0.02), fill=(20, 20, 20))
        d.rectangle(
            (cx - brim * 0.55, top - obj * 0.36, cx + brim * 0.55, top - obj * 0.06), fill=(20, 20, 20)
        )
        d.rectangle(
            (cx - brim * 0.55, top - obj * 0.14, cx + brim * 0.55, top - obj * 0.08), fill=(200, 30, 30)
        )
    if scene.style == "painting":
        image = _paint(image, rng)
    return image.resize((size, size), Image.LANCZOS)


# ------------------------------------------------------------------------------------------------
# sampling the base training distribution
# ------------------------------------------------------------------------------------------------


def random_pose(rng: np.random.Generator) -> dict[str, float]:
    return {
        "scale": float(rng.uniform(0.4, 0.62)),
        "x": float(rng.uniform(0.35, 0.65)),
        "y": float(rng.uniform(0.45, 0.65)),
        "angle": float(rng.choice([0.0, rng.uniform(-30, 30)])),
    }


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene from the base distribution: any shape, colour, background, accessory and style, and every
    pattern except the held-out two-colour split."""
    color, color2 = rng.choice(list(COLORS), 2, replace=False)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        color=str(color),
        pattern=str(rng.choice(PATTERNS)),
        color2=str(color2),
        background=str(rng.choice(BACKGROUNDS)),
        accessory=str(rng.choice(ACCESSORIES, p=[0.8, 0.2])),
        style=str(rng.choice(STYLES, p=[0.85, 0.15])),
        **random_pose(rng),
    )


def with_context(scene: Scene, **context: str) -> Scene:
    return replace(scene, **context)
