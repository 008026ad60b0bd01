"""Conversions between ComfyUI values and the library's: the only place that knows ComfyUI's layouts.

ComfyUI's IMAGE is a float32 tensor ``[B, H, W, C]`` in [0, 1]; the library takes PIL images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def comfy_image_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """IMAGE ``[B, H, W, C]`` (or a single ``[H, W, C]``) in [0, 1] -> RGB PIL images (alpha dropped)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected a ComfyUI IMAGE tensor, got {type(images).__name__}.")
    t = images.detach().float().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Expected an IMAGE shaped [B, H, W, C] with C in (1, 3, 4), got {tuple(images.shape)}."
        )
    if t.shape[0] == 0:
        raise ValueError("The IMAGE batch is empty.")
    if t.shape[-1] == 1:
        t = t.expand(-1, -1, -1, 3)
    arr = (t[..., :3].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def pil_to_comfy_image(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> IMAGE ``[B, H, W, 3]`` float32 in [0, 1]. Sizes must match (ComfyUI batches are uniform)."""
    images = list(images)
    if not images:
        raise ValueError("No images to convert.")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(
            f"Images in one IMAGE batch must share a size, got {sorted(sizes)}; resize them first."
        )
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr)


def image_batches_to_pil(*batches: torch.Tensor) -> list[Image.Image]:
    """Several IMAGE batches (possibly of different sizes, e.g. from separate Load Image nodes) -> one list."""
    out: list[Image.Image] = []
    for b in batches:
        if b is not None:
            out.extend(comfy_image_to_pil(b))
    return out


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


def safe_output_name(name: str, suffix: str = ".safetensors") -> str:
    """Validate a user-given file name: no folders, no ``..``, ends with ``suffix``.

    Files only ever go under ComfyUI's model folders, so a name with a path separator is an error, not a path.
    """
    raw = (name or "").strip()
    if not raw:
        raise ValueError("output_name is empty: give a file name such as 'rpo_my_dog'.")
    if "/" in raw or "\\" in raw or os.sep in raw or ".." in raw or raw.startswith("."):
        raise ValueError(
            f"output_name {name!r} must be a plain file name (no '/', '\\\\' or '..'): files are written only "
            "inside ComfyUI's models folders."
        )
    if not raw.endswith(suffix):
        raw += suffix
    if not _SAFE_NAME.match(raw):
        raise ValueError(
            f"output_name {name!r} has characters other than letters, digits, space, '_', '-' and '.'."
        )
    return raw


def parse_prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line (the multiline widget's content)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]
