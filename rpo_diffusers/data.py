"""Reference images: loading a folder, normalising any image input, and tensor transforms."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007 (runtime alias, py3.10)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert any mode (RGBA, LA, P, L, CMYK, I;16, ...) to RGB.

    Transparent pixels are composited on white, as photo viewers show them.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_pil_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """Normalise the image inputs every public function accepts into a list of RGB PIL images.

    Accepted: PIL images of any mode; numpy ``HWC``/``HW`` uint8 (or float in [0, 1]) and ``NHWC`` batches;
    torch ``CHW``/``BCHW`` floats in [0, 1] (a batch or a list of them).
    """
    if isinstance(images, Image.Image):
        return [to_rgb(images)]
    if isinstance(images, torch.Tensor):
        t = images.detach()
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(
                f"Expected a torch image tensor shaped [B, C, H, W] with C in (1, 3, 4), got {tuple(images.shape)}."
            )
        t = t.float().cpu()
        if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
            raise ValueError(
                "Torch image tensors must hold values in [0, 1]; rescale (x + 1) / 2 for [-1, 1] data."
            )
        arr = (t.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [_array_to_pil(a) for a in arr]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [_array_to_pil(a) for a in images]
        return [_array_to_pil(images)]
    if isinstance(images, (list, tuple)):
        out: list[Image.Image] = []
        for item in images:
            out.extend(to_pil_images(item))
        return out
    raise TypeError(
        f"Unsupported image type {type(images).__name__}: pass PIL images, numpy arrays or torch tensors."
    )


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"Expected a numpy image shaped HxW or HxWxC with C in (1, 3, 4), got {arr.shape}.")
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.size and a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        arr = np.clip(a.round(), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(arr))


class UnreadableImageError(ValueError):
    """One photo cannot be read (corrupt, empty, a broken or looping symlink, too large to open safely)."""


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files (by extension) directly inside ``folder``; hidden files are ignored."""
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(
            f"Image folder {str(path)!r} does not exist: pass a folder of 3-6 photos of the subject."
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"{str(path)!r} is not a folder: pass the folder that holds the subject's photos."
        )
    return sorted(  # a broken symlink is listed too: it fails to load, by name, instead of vanishing
        p
        for p in path.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.is_dir()))
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open one image fully (not lazily) as RGB, with a clear error for empty or corrupt files."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as err:  # a dangling symlink, a symlink loop
        raise UnreadableImageError(
            f"Cannot read image {str(p)!r}: {err.strerror.lower() if err.strerror else err} (a broken or looping "
            "symlink?); fix the link or remove it."
        ) from err
    if size == 0:
        raise UnreadableImageError(f"Image file {str(p)!r} is empty (0 bytes): replace or remove it.")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            f"Image {str(p)!r} is too large to open safely ({err}); resize it to a few megapixels."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(
            f"Cannot read image {str(p)!r} ({err}): it is corrupt or not an image; replace or remove it."
        ) from err


def load_image_folder(
    folder: str | os.PathLike, skip_unreadable: bool = False, min_images: int = 1
) -> list[Image.Image]:
    """Load every image in a folder as RGB PIL images.

    Args:
        folder: the folder of reference photos.
        skip_unreadable: when True, a corrupt or empty file is skipped with a warning; when False
            (default) it raises, because silently training on fewer photos than the user gave is a surprise.
        min_images: raise when fewer usable images than this remain.
    """
    files = list_image_files(folder)
    if not files:
        others = sorted(p.name for p in Path(folder).iterdir() if p.is_file())[:5]
        hint = f" (found other files: {others})" if others else ""
        raise ValueError(
            f"No images found in {str(folder)!r}{hint}. Supported extensions: {', '.join(IMAGE_EXTENSIONS)}."
        )
    images: list[Image.Image] = []
    for f in files:
        try:
            images.append(load_image(f))
        except UnreadableImageError:
            if not skip_unreadable:
                raise
            logger.warning("Skipping unreadable image %s", f)
    if len(images) < min_images:
        raise ValueError(
            f"Only {len(images)} readable image(s) in {str(folder)!r}; at least {min_images} needed."
        )
    return images


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(resized width, resized height, left, top)`` of :func:`center_crop_resize` for a ``width`` x ``height``
    image (SDXL's size ids record the crop corner)."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to a square, as DreamBooth's loaders do."""
    nw, nh, left, top = center_crop_box(*image.size, size)
    image = image.resize((nw, nh), Image.BICUBIC)
    return image.crop((left, top, left + size, top + size))


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> ``[B, 3, size, size]`` float tensor in [-1, 1] (the VAE's input range)."""
    arrs = [np.asarray(center_crop_resize(to_rgb(im), size), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] -> PIL images."""
    return to_pil_images((batch.detach().float().cpu() / 2 + 0.5).clamp(0, 1))


def make_image_grid(images: Sequence[Image.Image], rows: int, cols: int | None = None) -> Image.Image:
    """Tile images row-major into one grid (sizes are taken from the first image)."""
    images = list(images)
    if not images:
        raise ValueError("make_image_grid needs at least one image.")
    cols = cols or -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images[: rows * cols]):
        grid.paste(im.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
