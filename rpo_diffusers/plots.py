"""A reward-over-steps chart drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def reward_plot(
    steps: Sequence[int],
    rewards: Sequence[float],
    best_step: int | None = None,
    size: tuple[int, int] = (640, 360),
    title: str = "validation reward (λ-harmonic)",
) -> Image.Image:
    """Line chart of the validation reward with the chosen step marked in red."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 30, h - 40
    draw.text((left, 8), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline="black")
    if not steps:
        draw.text((left + 10, top + 10), "no validation yet", fill="gray")
        return img
    lo, hi = min(rewards), max(rewards)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad
    s0, s1 = min(steps), max(steps)
    span = max(s1 - s0, 1)

    def xy(s: float, r: float) -> tuple[float, float]:
        return left + (s - s0) / span * (right - left), bottom - (r - lo) / (hi - lo) * (bottom - top)

    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = xy(s0, value)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{value:.3f}", fill="black")
    for s in (s0, s1):
        x = xy(s, lo)[0]
        draw.text((x - 10, bottom + 6), str(s), fill="black")
    draw.text(((left + right) // 2 - 10, bottom + 20), "step", fill="black")
    points = [xy(s, r) for s, r in zip(steps, rewards)]
    if len(points) > 1:
        draw.line(points, fill=(30, 90, 200), width=2)
    for (x, y), s in zip(points, steps):
        color = (220, 30, 30) if s == best_step else (30, 90, 200)
        r = 5 if s == best_step else 3
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return img
