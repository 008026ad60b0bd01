"""Pictures a person reads: the validation-reward chart and labelled image grids.

The chart is drawn by matplotlib on its Agg canvas (a ``Figure`` object, never ``pyplot``), so no GUI
backend is touched and nothing global changes. The grids are laid out with PIL in the DejaVu Sans font
that matplotlib ships (it has λ and the other glyphs our labels use), so a 32 px toy image becomes a
192 px cell with its column header, its prompt and its reward beside it. Every function returns an RGB
PIL image, so callers keep calling ``.save(path)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
PAD = 8


# --------------------------------------------------------------------------------------------------
# the reward chart (matplotlib)
# --------------------------------------------------------------------------------------------------


def _figure_to_image(fig) -> Image.Image:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def reward_figure(
    steps: Sequence[int],
    rewards: Sequence[float],
    best_step: int | None = None,
    *,
    title: str = "validation reward (λ-harmonic)",
    method_label: str | None = None,
    size: tuple[int, int] = (800, 450),
):
    """The matplotlib ``Figure`` behind :func:`reward_plot` (tests read its text artists)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("reward (λ-harmonic)" if "λ" not in title else "reward")
    ax.grid(True, color="#dddddd", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))  # round tick values
    points = [(int(s), float(r)) for s, r in zip(steps, rewards) if math.isfinite(float(r))]
    if not points:
        ax.text(0.5, 0.5, "no validation yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        return fig
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o", markersize=4, color="#1f5fbf", label=method_label or "validation reward")
    if xs[0] == 0:
        ax.axhline(ys[0], color="#888888", linestyle="--", linewidth=1, label=f"step 0 (base): {ys[0]:.3f}")
    chosen = [(s, r) for s, r in points if s == best_step]
    if chosen:
        s, r = chosen[0]
        ax.scatter(
            [s], [r], s=140, marker="*", color="#d62728", zorder=5, label=f"chosen: step {s} (reward {r:.3f})"
        )
    ax.legend(loc="best", fontsize=10, framealpha=0.9)
    lo, hi = min(ys), max(ys)
    margin = max((hi - lo) * 0.15, 0.005)
    ax.set_ylim(lo - margin, hi + margin)
    ax.set_xlim(min(xs) - max(1, (max(xs) - min(xs)) * 0.03), max(xs) + max(1, (max(xs) - min(xs)) * 0.03))
    return fig


def reward_plot(
    steps: Sequence[int],
    rewards: Sequence[float],
    best_step: int | None = None,
    *,
    title: str = "validation reward (λ-harmonic)",
    method_label: str | None = None,
    size: tuple[int, int] = (800, 450),
) -> Image.Image:
    """Line chart of the validation reward per optimiser step, the chosen step starred and explained in
    the legend ("chosen: step 240 (reward 0.755)"), step 0 as a dashed base-model line."""
    fig = reward_figure(steps, rewards, best_step, title=title, method_label=method_label, size=size)
    return _figure_to_image(fig)


def scatter_figure(
    points: Sequence[tuple[float, float, str]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    errors: Sequence[tuple[float, float] | None] | None = None,
    size: tuple[int, int] = (800, 600),
):
    """The matplotlib ``Figure`` behind :func:`scatter_plot` (tests read its text artists).

    Points are named in a legend beside the axes, not next to the points: labels of nearby points overlapped.
    Points at the same place (e.g. two methods that chose the same models) share one marker, their labels
    joined with " = "."""
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#dddddd", linewidth=0.8)
    merged: dict[tuple[float, float], list[int]] = {}
    for i, (x, y, _) in enumerate(points):
        merged.setdefault((round(x, 9), round(y, 9)), []).append(i)
    for n, indices in enumerate(merged.values()):
        x, y = points[indices[0]][0], points[indices[0]][1]
        label = " = ".join(points[i][2] for i in indices)
        color, marker = f"C{n % 10}", "osD^v"[(n // 10) % 5]  # past 10 points the marker tells them apart
        err = errors[indices[0]] if errors is not None else None
        if err is not None:
            ax.errorbar([x], [y], xerr=[err[0]], yerr=[err[1]], color=color, alpha=0.25, lw=0.8, zorder=2)
        ax.scatter([x], [y], s=60, color=color, marker=marker, zorder=3, label=label)
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False, borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center", color="gray")
    return fig


def scatter_plot(
    points: Sequence[tuple[float, float, str]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    errors: Sequence[tuple[float, float] | None] | None = None,
    size: tuple[int, int] = (800, 600),
) -> Image.Image:
    """Labelled scatter, one ``(x, y, label)`` per point with optional ``(x_err, y_err)`` bars: e.g. the
    benchmark's identity-against-context trade-off, one point per method."""
    return _figure_to_image(
        scatter_figure(points, title=title, xlabel=xlabel, ylabel=ylabel, errors=errors, size=size)
    )


# --------------------------------------------------------------------------------------------------
# labelled grids (PIL with a real TrueType font)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's data folder (it renders λ); PIL's scalable default otherwise."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # pragma: no cover - matplotlib always ships it
        return ImageFont.load_default(size)


def _wrap(text: str, fnt, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            trial = f"{current} {word}".strip()
            if current and fnt.getlength(trial) > width:
                lines.append(current)
                current = word
            else:
                current = trial
        lines.append(current)
    return lines


def _line_height(fnt) -> int:
    ascent, descent = fnt.getmetrics()
    return ascent + descent + 2


def _text_block_height(lines: Sequence[str], fnt) -> int:
    return len(lines) * _line_height(fnt)


def _draw_lines(draw, lines, fnt, box: tuple[int, int, int, int], fill=TEXT, valign: str = "center") -> None:
    """Lines centred horizontally in ``box`` (x0, y0, x1, y1); vertically centred or top-aligned."""
    x0, y0, x1, y1 = box
    lh = _line_height(fnt)
    y = y0 + max(0, (y1 - y0 - lh * len(lines)) // 2) if valign == "center" else y0
    for line in lines:
        w = fnt.getlength(line)
        draw.text((x0 + (x1 - x0 - w) / 2, y), line, font=fnt, fill=fill)
        y += lh


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Scale into a ``cell`` square keeping the aspect: nearest up (pixels stay crisp), Lanczos down."""
    im = image.convert("RGB")
    scale = cell / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if new == im.size:
        return im
    return im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def labeled_grid(
    images: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    captions: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    cell_size: int = 192,
) -> Image.Image:
    """``images[row][col]`` as one picture: optional title, a header per column, a label per row (long
    prompts wrapped), an optional caption under each image (e.g. "reward 0.712"). Small images are
    upscaled with nearest-neighbour to ``cell_size`` so 32 px toy images can be seen."""
    rows = [list(r) for r in images]
    if not rows or not any(rows):
        raise ValueError("labeled_grid needs at least one image.")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"Got {len(row_labels)} row labels for {n_rows} rows.")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"Got {len(col_labels)} column labels for {n_cols} columns.")
    if captions is not None and len(captions) != n_rows:
        raise ValueError(f"Got {len(captions)} caption rows for {n_rows} rows.")

    # 20 / 16 / 14 / 13 px at the default 192 px cells, a little smaller for small cells
    title_font, header_font = font(20, bold=True), font(max(12, min(16, cell_size // 12)), bold=True)
    label_font, caption_font = (
        font(max(12, min(14, cell_size // 13))),
        font(max(11, min(13, cell_size // 14))),
    )
    label_w = max(150, cell_size) if row_labels else 0
    label_lines = [_wrap(t, label_font, label_w - 2 * PAD) for t in row_labels or []]
    header_lines = [_wrap(t, header_font, cell_size) for t in col_labels or []]
    header_h = max((_text_block_height(ls, header_font) for ls in header_lines), default=0)
    header_h = header_h + PAD if col_labels else 0
    caption_h = 0
    if captions is not None:
        cap_lines = [[_wrap(c, caption_font, cell_size) for c in row] for row in captions]
        caption_h = max((_text_block_height(c, caption_font) for r in cap_lines for c in r), default=0)
    width = label_w + n_cols * (cell_size + PAD) + PAD
    title_lines = _wrap(title, title_font, width - 2 * PAD) if title else []
    title_h = _text_block_height(title_lines, title_font) + PAD if title else 0
    row_h = max(
        cell_size + caption_h, max((_text_block_height(ls, label_font) for ls in label_lines), default=0)
    )
    height = PAD + title_h + header_h + n_rows * (row_h + PAD)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    if title_lines:
        _draw_lines(draw, title_lines, title_font, (PAD, y, width - PAD, y + title_h - PAD))
        y += title_h
    for c, lines in enumerate(header_lines):
        x = label_w + PAD + c * (cell_size + PAD)
        _draw_lines(draw, lines, header_font, (x, y, x + cell_size, y + header_h - PAD), valign="center")
    y += header_h
    for r, row in enumerate(rows):
        if label_lines:
            _draw_lines(draw, label_lines[r], label_font, (PAD, y, label_w - PAD, y + cell_size))
        for c, im in enumerate(row):
            x = label_w + PAD + c * (cell_size + PAD)
            fitted = _fit(im, cell_size)
            canvas.paste(fitted, (x + (cell_size - fitted.width) // 2, y + (cell_size - fitted.height) // 2))
            if captions is not None and c < len(captions[r]) and captions[r][c]:
                lines = _wrap(captions[r][c], caption_font, cell_size)
                _draw_lines(
                    draw, lines, caption_font, (x, y + cell_size + 2, x + cell_size, y + row_h), MUTED, "top"
                )
        y += row_h + PAD
    return canvas


def _caption(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"reward {float(value):.3f}"


def before_after_grid(
    before: Sequence[Image.Image],
    after: Sequence[Image.Image],
    prompts: Sequence[str],
    before_label: str,
    after_label: str,
    before_rewards: Sequence[float | str] | None = None,
    after_rewards: Sequence[float | str] | None = None,
    *,
    title: str | None = None,
    cell_size: int = 192,
) -> Image.Image:
    """One row per prompt, two columns (e.g. "step 0 (base)" / "step 240 (chosen)"); a float reward is
    captioned "reward 0.712", a string is used as the caption itself."""
    if not (len(before) == len(after) == len(prompts)):
        raise ValueError(
            f"before_after_grid needs one image per prompt on each side, got {len(before)} / {len(after)} "
            f"images for {len(prompts)} prompts."
        )
    for name, values in (("before_rewards", before_rewards), ("after_rewards", after_rewards)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{name} has {len(values)} entries for {len(prompts)} prompts.")
    captions = None
    if before_rewards is not None or after_rewards is not None:
        captions = [
            [
                _caption(before_rewards[i] if before_rewards is not None else None),
                _caption(after_rewards[i] if after_rewards is not None else None),
            ]
            for i in range(len(prompts))
        ]
    return labeled_grid(
        [[b, a] for b, a in zip(before, after)],
        row_labels=list(prompts),
        col_labels=[before_label, after_label],
        captions=captions,
        title=title,
        cell_size=cell_size,
    )


__all__ = [
    "before_after_grid",
    "font",
    "labeled_grid",
    "reward_figure",
    "reward_plot",
    "scatter_figure",
    "scatter_plot",
]
