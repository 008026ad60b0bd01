"""Which model family a pipeline is, read from its files before any weight loads, and its adapter.

The family comes from the pipeline's class (``model_index.json``'s ``_class_name``, or the object's class),
never from a flag: ``StableDiffusionPipeline`` -> :class:`~rpo_diffusers.components.DiffusersComponents`,
``StableDiffusionXLPipeline`` -> :class:`~rpo_diffusers.sdxl.SDXLComponents`. Everything else (an SDXL
refiner, an inpainting model, SD3, Flux, ...) is refused in one line that names what is supported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

SD, SDXL = "sd", "sdxl"
NATIVE_RESOLUTION = {SD: 512, SDXL: 1024}  # the training size when none is set
FAMILY_PIPELINES = {SD: "StableDiffusionPipeline", SDXL: "StableDiffusionXLPipeline"}
SUPPORTED = (
    "supported are Stable Diffusion 1.x / 2.x (StableDiffusionPipeline) and Stable Diffusion XL base "
    "(StableDiffusionXLPipeline) text-to-image pipelines"
)
REFINER_CLASSES = ("StableDiffusionXLImg2ImgPipeline",)
INPAINT_CLASSES = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")


class UnsupportedModelError(ValueError):
    """The model is not of a family rpo-diffusers trains; the message names what is supported."""


def _read_config(path: str, subfolder: str | None = None) -> dict[str, Any] | None:
    """A pipeline's ``model_index.json`` (or a subfolder's ``config.json``): read locally, or that one file
    fetched from the Hub; ``None`` when there is none."""
    name = "config.json" if subfolder else "model_index.json"
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        file = local / subfolder / name if subfolder else local / name
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from .hub import load_pretrained

    def download(repo_id: str, **kwargs: Any) -> str | None:
        try:
            return hf_hub_download(repo_id, **kwargs)
        except EntryNotFoundError:  # the repo is there, the file is not (a missing repo stays an error)
            return None

    file = load_pretrained(download, path, filename=name, subfolder=subfolder, kind="base model")
    return json.loads(Path(file).read_text()) if file else None


def _refiner_message(name: str, class_name: str) -> str:
    return (
        f"{name!r} is a Stable Diffusion XL refiner ({class_name}, aesthetic-score conditioning), which refines "
        "images instead of drawing them from a prompt: train on the SDXL base model (e.g. "
        f"'stabilityai/stable-diffusion-xl-base-1.0') instead; {SUPPORTED}."
    )


def _inpainting_message(name: str, class_name: str, channels: int | None) -> str:
    channels_text = f", a UNet with {channels} input channels" if channels else ""
    return (
        f"{name!r} is an inpainting model ({class_name}{channels_text}); personalization trains text-to-image "
        f"models: use the base model it was made from; {SUPPORTED}."
    )


def model_family(name_or_path: str | os.PathLike) -> str:
    """``"sd"`` or ``"sdxl"`` for a pipeline folder or Hub id, from its configs alone (no weights are read).

    Raises:
        UnsupportedModelError: not a text-to-image SD / SDXL pipeline (refiner, inpainting, SD3, Flux...).
    """
    from .hub import resolve_model

    name = os.fspath(name_or_path)
    path = resolve_model(name, "base model")
    index = _read_config(path)
    if index is None:
        raise UnsupportedModelError(
            f"{name!r} has no model_index.json, so it is not a diffusers pipeline: pass a pipeline folder saved "
            f"with save_pretrained() or a Hub id; {SUPPORTED}."
        )
    class_name = str(index.get("_class_name", "unknown"))
    if class_name in REFINER_CLASSES or (
        class_name.startswith("StableDiffusionXL") and not _present(index, "text_encoder")
    ):
        raise UnsupportedModelError(_refiner_message(name, class_name))
    if class_name in INPAINT_CLASSES:
        raise UnsupportedModelError(_inpainting_message(name, class_name, None))
    family = next((f for f, cls in FAMILY_PIPELINES.items() if cls == class_name), None)
    if family is None:
        raise UnsupportedModelError(
            f"{name!r} is a {class_name} model, which rpo-diffusers cannot train; {SUPPORTED}."
        )
    unet = _read_config(path, "unet") or {}
    channels = unet.get("in_channels", 4)
    if channels != 4:
        raise UnsupportedModelError(_inpainting_message(name, class_name, channels))
    return family


def _present(index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and any(e is not None for e in entry)


def resolution_step(vae_config: dict[str, Any], unet_config: dict[str, Any]) -> int:
    """The pixel multiple a training size must be: ``vae_scale_factor * 2 ** (UNet blocks - 1)``."""
    vae_blocks = len(vae_config.get("block_out_channels") or [0] * 4)
    unet_blocks = len(unet_config.get("block_out_channels") or [0] * 3)
    return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)


def check_sdxl_resolution(resolution: int, vae_config: dict[str, Any], unet_config: dict[str, Any]) -> None:
    """Refuse an SDXL training resolution its size ids and latent grid cannot describe exactly.

    The target size SDXL is told must be the size its latents decode to through every UNet downsampling,
    with no padding: a multiple of :func:`resolution_step` (32 for SDXL: 1024, 896, 768...).
    """
    step = resolution_step(vae_config, unet_config)
    if int(resolution) % step:
        below, above = max(step, int(resolution) // step * step), (int(resolution) // step + 1) * step
        raise UnsupportedModelError(
            f"resolution {resolution} cannot be described by this SDXL model's size conditioning: it must be a "
            f"multiple of {step} (the VAE and UNet downsampling), e.g. {below} or {above}."
        )


def check_sdxl_vae(name: str, vae_config: dict[str, Any]) -> None:
    """Refuse a VAE whose latents are normalised by a mean and std (EDM-style SDXL such as Playground v2.5):
    the loop scales latents by ``scaling_factor`` alone, as SDXL base's VAE needs."""
    if vae_config.get("latents_mean") is not None or vae_config.get("latents_std") is not None:
        raise UnsupportedModelError(
            f"{name!r} has a VAE with latents_mean / latents_std (an EDM-style SDXL such as Playground v2.5), "
            f"which this trainer does not normalise for; {SUPPORTED}."
        )


def check_model(name_or_path: str | os.PathLike, resolution: int | None = None) -> str:
    """The model's family (:func:`model_family`), with an SDXL VAE and resolution checked on the configs too:
    every refusal comes before any weight loads."""
    family = model_family(name_or_path)
    if family == SDXL:
        from .hub import resolve_model

        path = resolve_model(os.fspath(name_or_path), "base model")
        vae = _read_config(path, "vae") or {}
        check_sdxl_vae(os.fspath(name_or_path), vae)
        if resolution is not None:
            check_sdxl_resolution(resolution, vae, _read_config(path, "unet") or {})
    return family


def check_sdxl_pipeline(pipeline: Any) -> None:
    """The in-memory counterpart of :func:`model_family` for an SDXL pipeline object."""
    class_name = type(pipeline).__name__
    if getattr(pipeline, "text_encoder", None) is None or "Img2Img" in class_name:
        raise UnsupportedModelError(_refiner_message(class_name, class_name))
    channels = pipeline.unet.config.in_channels
    if "Inpaint" in class_name or channels != 4:
        raise UnsupportedModelError(_inpainting_message(class_name, class_name, channels))
    check_sdxl_vae(class_name, dict(pipeline.vae.config))


def pipeline_family(pipeline: Any) -> str:
    """``"sd"`` or ``"sdxl"`` for a pipeline object (by its parts: SDXL has a second, projecting encoder)."""
    if getattr(pipeline, "text_encoder_2", None) is not None or "XL" in type(pipeline).__name__:
        return SDXL
    if "Inpaint" in type(pipeline).__name__ or pipeline.unet.config.in_channels != 4:
        raise UnsupportedModelError(_inpainting_message(type(pipeline).__name__, type(pipeline).__name__,
                                                        pipeline.unet.config.in_channels))  # fmt: skip
    return SD


def native_resolution(model: Any) -> int:
    """512 for SD 1.x / 2.x, 1024 for SDXL: of a pipeline object, or a folder / Hub id (from its configs)."""
    if isinstance(model, (str, os.PathLike)):
        return NATIVE_RESOLUTION[model_family(model)]
    return NATIVE_RESOLUTION[pipeline_family(model)]


def components_for_pipeline(
    pipeline: Any, sampling_scheduler: str | None, weight_dtype: torch.dtype, resolution: int | None
):
    """The family's adapter around a pipeline object."""
    from .components import DiffusersComponents
    from .sdxl import SDXLComponents

    if pipeline_family(pipeline) == SDXL:
        return SDXLComponents(pipeline, sampling_scheduler, weight_dtype, resolution=resolution)
    return DiffusersComponents(pipeline, sampling_scheduler, weight_dtype)


def load_components(
    name_or_path: str | os.PathLike,
    sampling_scheduler: str | None = None,
    weight_dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    vae_name_or_path: str | os.PathLike | None = None,
):
    """Detect the family from the configs (refusing others at once), then load its pipeline and adapter."""
    from .components import DiffusersComponents
    from .sdxl import SDXLComponents

    if check_model(name_or_path, resolution) == SDXL:
        return SDXLComponents.from_pretrained(
            name_or_path, vae_name_or_path=vae_name_or_path, sampling_scheduler=sampling_scheduler,
            weight_dtype=weight_dtype, resolution=resolution,
        )  # fmt: skip
    return DiffusersComponents.from_pretrained(
        name_or_path, vae_name_or_path=vae_name_or_path, sampling_scheduler=sampling_scheduler,
        weight_dtype=weight_dtype,
    )  # fmt: skip
