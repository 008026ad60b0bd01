"""The pictures a user reads: the reward chart has real labels and legend, grids carry their headers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rpo_diffusers.plots import before_after_grid, labeled_grid, reward_figure, reward_plot

STEPS = list(range(0, 401, 40))
REWARDS = [0.706, 0.673, 0.713, 0.671, 0.704, 0.724, 0.755, 0.749, 0.736, 0.739, 0.739]


def _texts(fig) -> list[str]:
    """Title, axis labels and legend entries of every axes."""
    out = []
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    return out


def test_reward_plot_is_a_labelled_chart():
    img = reward_plot(STEPS, REWARDS, best_step=240)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (800, 450)
    fig = reward_figure(STEPS, REWARDS, best_step=240, method_label="RPO")
    texts = _texts(fig)
    assert "validation reward (λ-harmonic)" in texts
    assert "optimiser step" in texts
    assert "chosen: step 240 (reward 0.755)" in texts
    assert "step 0 (base): 0.706" in texts and "RPO" in texts
    ax = fig.axes[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    assert len([t for t in ax.get_xticklabels() if t.get_text()]) >= 5
    assert len([t for t in ax.get_yticklabels() if t.get_text()]) >= 4
    # the λ glyph exists in the font matplotlib resolves for the title (no missing-glyph box)
    from matplotlib.font_manager import FontProperties, findfont
    from PIL import ImageFont

    path = findfont(FontProperties(family=ax.title.get_fontfamily()))
    assert ImageFont.truetype(path, 20).getmask("λ").getbbox() is not None


def test_reward_plot_without_history_and_custom_size():
    img = reward_plot([], [], None, size=(400, 300))
    assert img.size == (400, 300)
    texts = [t.get_text() for t in reward_figure([], []).axes[0].texts]
    assert texts == ["no validation yet"]


def _ink(region: Image.Image) -> int:
    """Non-white pixels in a region (text drawn there shows up as dark pixels)."""
    arr = np.asarray(region.convert("L"))
    return int((arr < 200).sum())


def test_labeled_grid_upscales_and_labels():
    tiny = [[Image.new("RGB", (32, 32), (0, 90, 200)) for _ in range(3)] for _ in range(2)]
    grid = labeled_grid(
        tiny,
        row_labels=["a sks ring on the beach", "a sks ring " + "with a very long tail " * 4],
        col_labels=["step 0", "step 40", "step 80"],
        captions=[["reward 0.700", "reward 0.710", "reward 0.720"]] * 2,
        title="validation (λ_val 0.5)",
        cell_size=128,
    )
    arr = np.asarray(grid)
    # three 128 px cells per row plus a label column, two rows plus title, header and captions
    assert grid.width >= 3 * 128 + 128 and grid.height >= 2 * 128 + 60
    blue = (arr[..., 0] == 0) & (arr[..., 1] == 90) & (arr[..., 2] == 200)
    assert blue.sum() == 6 * 128 * 128  # every 32 px image became an exact 128 px block (nearest)
    rows, cols = np.nonzero(blue)
    first_cell_top, label_right = rows.min(), cols.min()
    assert _ink(grid.crop((label_right, 0, grid.width, first_cell_top))) > 200  # title + column headers
    assert _ink(grid.crop((0, first_cell_top, label_right - 2, first_cell_top + 128))) > 200  # prompt label
    below = grid.crop((label_right, first_cell_top + 128, label_right + 128, first_cell_top + 150))
    assert _ink(below) > 50  # caption under the first image


def test_labeled_grid_without_labels_is_just_the_cells():
    grid = labeled_grid([[Image.new("RGB", (64, 32), "red")]], cell_size=64)
    assert grid.size == (64 + 16, 64 + 16)
    with pytest.raises(ValueError, match="row labels"):
        labeled_grid([[grid]], row_labels=["a", "b"])


def test_before_after_grid_columns_and_captions():
    before = [Image.new("RGB", (32, 32), "black") for _ in range(3)]
    after = [Image.new("RGB", (32, 32), "gray") for _ in range(3)]
    prompts = ["a sks ring on the beach", "a sks ring in the snow", "a sks ring wearing a hat"]
    grid = before_after_grid(
        before, after, prompts, "step 0 (base)", "step 240 (chosen)", [0.7] * 3, [0.75] * 3
    )
    plain = before_after_grid(before, after, prompts, "step 0 (base)", "step 240 (chosen)")
    assert grid.width == plain.width and grid.height > plain.height  # the captions take a band
    assert grid.width >= 2 * 192 and grid.height >= 3 * 192
    with pytest.raises(ValueError, match="one image per prompt"):
        before_after_grid(before[:2], after, prompts, "a", "b")


def test_scatter_names_every_point_once_in_a_legend_and_merges_coincident_points():
    from rpo_diffusers.plots import scatter_figure, scatter_plot

    points = [(0.2, 0.8, "DreamBooth"), (0.25, 0.88, "RPO"), (0.25, 0.88, "RPO, fast validation"), (0.1, 0.7, "DPG")]
    fig = scatter_figure(points, title="context against identity", xlabel="identity", ylabel="context")
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["DreamBooth", "RPO = RPO, fast validation", "DPG"]
    assert len(ax.collections) == 3  # one marker per distinct place
    assert not [t for t in ax.texts if t.get_text()]  # no labels drawn over the points
    image = scatter_plot(points, title="t", xlabel="x", ylabel="y", size=(900, 500))
    assert image.size == (900, 500)
    empty = scatter_figure([], title="t", xlabel="x", ylabel="y")
    assert [t.get_text() for t in empty.axes[0].texts] == ["no results"]
