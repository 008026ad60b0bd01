"""Stable Diffusion XL: the second model family, an adapter to the same loop (DESIGN.md section 3).

SDXL conditions its UNet on more than one tensor: both text encoders' penultimate hidden states
concatenated (``encoder_hidden_states``), the pooled, projected output of the second encoder
(``text_embeds``) and six size ids (``time_ids``: original height and width, crop top and left, target
height and width), the last two through ``added_cond_kwargs``. :class:`SDXLConditioning` carries the three
as rows that index, concatenate, expand and move like one tensor, so the objectives batch SDXL conditioning
exactly as they batch SD's embeddings; :class:`SDXLDenoiser` unpacks it for the UNet.

The size ids follow diffusers' ``train_dreambooth_lora_sdxl.py``: a photo's original size and the top-left
corner of its centre crop (in the resized image), and the training resolution as target; images the base
model drew at the training resolution have original = target and crop (0, 0), as the pipeline samples them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from .components import Denoiser, DiffusersComponents
from .data import center_crop_box
from .families import NATIVE_RESOLUTION, SDXL


@dataclass(eq=False)
class SDXLConditioning:
    """Rows of SDXL conditioning that behave like one tensor for the loop and the objectives.

    Attributes:
        prompt_embeds: ``[B, L, D1 + D2]`` both encoders' penultimate hidden states, or ``[B, 2, L]`` token ids
            of both tokenizers when the text encoders train (the denoiser embeds them).
        text_embeds: ``[B, P]`` pooled projection of the second encoder (``[B, 0]`` with token ids).
        time_ids: ``[B, 6]`` original (h, w), crop top-left (top, left), target (h, w), float32.
    """

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.prompt_embeds, self.text_embeds, self.time_ids

    def _map(self, fn) -> SDXLConditioning:
        return SDXLConditioning(*(fn(t) for t in self.parts))

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def __getitem__(self, index: Any) -> SDXLConditioning:
        return self._map(lambda t: t[index])

    @property
    def shape(self) -> torch.Size:
        return self.prompt_embeds.shape

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def is_floating_point(self) -> bool:
        return self.prompt_embeds.is_floating_point()

    def expand(self, n: int, *_: int) -> SDXLConditioning:
        """``n`` rows from one (views, no copy), like ``Tensor.expand(n, -1, -1)``."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, device: torch.device | str) -> SDXLConditioning:
        return self._map(lambda t: t.to(device))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat`` of conditionings along the rows (what the objectives do to batch gen/ref rows)."""
        kwargs = kwargs or {}
        if func is torch.cat:
            items, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0 or not all(isinstance(c, SDXLConditioning) for c in items):
                raise TypeError(
                    "SDXLConditioning concatenates with other SDXLConditioning rows along dim 0 only."
                )
            parts = zip(*(c.parts for c in items))
            return SDXLConditioning(*(torch.cat(list(p)) for p in parts))
        return NotImplemented


def sdxl_time_ids(width: int, height: int, resolution: int) -> list[int]:
    """The six SDXL size ids of a ``width`` x ``height`` image resized and centre-cropped to ``resolution``.

    ``original_size + crops_coords_top_left + target_size``, each (h, w) / (top, left), as diffusers'
    ``StableDiffusionXLPipeline._get_add_time_ids`` orders them.
    """
    _, _, left, top = center_crop_box(width, height, resolution)
    return [height, width, top, left, resolution, resolution]


def encode_sdxl_token_ids(
    text_encoders: Sequence[nn.Module], token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 2, L]`` token ids -> (``[B, L, D1 + D2]`` penultimate states, ``[B, P]`` pooled) as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` computes them (with gradients when the encoders train)."""
    states, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        out = encoder(token_ids[:, i].to(encoder.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection: text_embeds)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


class SDXLDenoiser(Denoiser):
    """``denoiser(latents, t, SDXLConditioning)``: the UNet with ``added_cond_kwargs``.

    When the text encoders train, both are part of this module and the conditioning holds their token ids.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__(unet)
        self.text_encoder_2: nn.Module | None = None

    def set_text_encoders(self, text_encoders: Sequence[nn.Module]) -> None:
        self.text_encoder, self.text_encoder_2 = text_encoders

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: SDXLConditioning
    ) -> torch.Tensor:
        if not isinstance(conditioning, SDXLConditioning):
            raise TypeError(
                f"SDXL's UNet needs SDXLConditioning (text states, pooled embedding, size ids), got "
                f"{type(conditioning).__name__}: encode prompts with the SDXL components."
            )
        states, pooled = conditioning.prompt_embeds, conditioning.text_embeds
        if not states.is_floating_point():
            if self.text_encoder is None:
                raise ValueError("Token ids as conditioning need trained text encoders (train_text_encoder).")
            states, pooled = encode_sdxl_token_ids([self.text_encoder, self.text_encoder_2], states)
        dtype, device = self.unet.dtype, noisy_latents.device
        added = {  # size ids stay float32: they are exact integers there and embedded in float32 anyway
            "text_embeds": pooled.to(device, dtype),
            "time_ids": conditioning.time_ids.to(device, torch.float32),
        }
        return self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=states.to(device, dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class SDXLSizeConditioning:
    """The size-id half of an SDXL adapter, shared by the diffusers one and ComfyUI's (``comfyui_nodes``).

    Needs ``self.resolution`` (the training size) and ``self.device``; put it before the adapter base class.
    """

    resolution: int

    def _time_ids(self, rows: int, resolution: int | None = None) -> torch.Tensor:
        """Size ids of an image drawn at ``resolution`` (default: the training size): no crop, original = target."""
        r = int(resolution or self.resolution)
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).expand(rows, 6)

    def condition_on_sizes(
        self, conditioning: SDXLConditioning, sizes: Sequence[tuple[int, int]], resolution: int
    ) -> SDXLConditioning:
        rows = super().condition_on_sizes(conditioning, sizes, resolution)
        ids = torch.tensor([sdxl_time_ids(w, h, resolution) for w, h in sizes], dtype=torch.float32)
        return dataclasses.replace(rows, time_ids=ids.to(rows.device))


class SDXLComponents(SDXLSizeConditioning, DiffusersComponents):
    """Adapter over a diffusers ``StableDiffusionXLPipeline`` (SDXL base architecture, ε- or v-prediction).

    Args:
        pipeline: the pipeline (both text encoders, a 4-channel text-to-image UNet).
        sampling_scheduler: a diffusers scheduler class name for sampling.
        weight_dtype: dtype of the frozen parts in LoRA runs. In float16 a VAE that asks for it
            (``force_upcast``, SDXL's own, which overflows in half precision) stays float32, as diffusers'
            SDXL scripts keep it; an fp16-safe VAE (``madebyollin/sdxl-vae-fp16-fix``) is cast.
        resolution: the training size the size ids of :meth:`encode_prompts` describe (default 1024).
    """

    family = SDXL
    default_resolution = NATIVE_RESOLUTION[SDXL]
    pipeline_class_name = "StableDiffusionXLPipeline"
    # no invisible watermark: it would be in the base model's training images, and be learned
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}

    def __init__(
        self,
        pipeline,
        sampling_scheduler: str | None = None,
        weight_dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
    ) -> None:
        from .families import check_sdxl_pipeline, check_sdxl_resolution

        check_sdxl_pipeline(pipeline)
        self.resolution = int(resolution or self.default_resolution)
        check_sdxl_resolution(self.resolution, dict(pipeline.vae.config), dict(pipeline.unet.config))
        super().__init__(pipeline, sampling_scheduler=sampling_scheduler, weight_dtype=weight_dtype)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.pipeline.text_encoder, self.pipeline.text_encoder_2]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.pipeline.tokenizer, self.pipeline.tokenizer_2]

    def half_precision_modules(self) -> list[nn.Module]:
        vae = self.pipeline.vae
        keep_fp32 = self.weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        return [] if keep_fp32 else [vae]

    def make_denoiser(self, unet: nn.Module) -> SDXLDenoiser:
        return SDXLDenoiser(unet)

    @torch.no_grad()
    def generate(
        self, prompts, seeds, num_inference_steps, guidance_scale, resolution, scheduler: str | None = None
    ) -> list[Image.Image]:
        """The pipeline's sampling (with the scheduler named, if any), then the VAE decode in the VAE's own dtype
        with autocast off: SDXL's VAE overflows in float16, and an fp16 run's autocast would otherwise decode in
        float16 however it is kept."""
        latents = self.sample(prompts, seeds, num_inference_steps, guidance_scale, resolution, "latent", scheduler)
        with torch.autocast(self.device.type, enabled=False):
            pixels = self.decode_pixels(latents)
        processor = self.pipeline.image_processor
        return processor.numpy_to_pil(processor.pt_to_numpy(pixels.float().cpu()))

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, 2, L]`` ids of both tokenizers, padded as the pipeline pads them."""
        ids = [
            tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]  # fmt: skip
        if ids[0].shape != ids[1].shape:
            raise ValueError(
                f"SDXL's tokenizers pad to different lengths ({ids[0].shape[-1]}, {ids[1].shape[-1]}): both need "
                "the same model_max_length (77 in SDXL)."
            )
        return torch.stack(ids, dim=1).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SDXLConditioning:
        states, pooled = encode_sdxl_token_ids(self.text_encoders, self.token_ids(prompts))
        return SDXLConditioning(states, pooled, self._time_ids(len(prompts)))

    def tokenize(self, prompts: Sequence[str]) -> SDXLConditioning:
        ids = self.token_ids(prompts)
        return SDXLConditioning(ids, torch.zeros(len(ids), 0, device=self.device), self._time_ids(len(ids)))
