"""The model access the RPO loop needs, behind one small interface.

``RPOTrainer`` never touches a pipeline directly: it asks a :class:`DiffusionComponents` to encode prompts
and images, to run the denoiser (trained and reference), to sample images and to export. A diffusers
``StableDiffusionPipeline`` is one adapter (:class:`DiffusersComponents`); ComfyUI's MODEL/CLIP/VAE is
another (in ``comfyui_nodes``). Both feed the same loop.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn


class Denoiser(nn.Module):
    """Uniform call signature ``denoiser(noisy_latents, timesteps, conditioning) -> prediction``.

    Wrapping the UNet lets accelerate prepare (DDP-wrap) one module whatever the backend is. When the text
    encoder trains it becomes part of this module (``text_encoder``) and ``conditioning`` is token ids, so
    one DDP wrapper, one optimiser and one checkpoint file cover both.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def set_text_encoders(self, text_encoders: Sequence[nn.Module]) -> None:
        """Make the (trained) text encoders part of this module, so the conditioning may be token ids."""
        (self.text_encoder,) = text_encoders

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor
    ) -> torch.Tensor:
        if not conditioning.is_floating_point():  # token ids: the trained text encoder embeds them
            if self.text_encoder is None:
                raise ValueError("Token ids as conditioning need a trained text encoder (train_text_encoder).")
            conditioning = self.text_encoder(conditioning.to(noisy_latents.device))[0]
        # a half-precision frozen base (LoRA) takes half inputs; autocast does the rest
        dtype = self.unet.dtype
        return self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=conditioning.to(dtype),
            return_dict=False,
        )[0]


class DiffusionComponents(ABC):
    """What the RPO loop needs from a text-to-image diffusion model.

    Attributes:
        denoiser: the trained module, called as ``denoiser(latents, t, conditioning)``.
        noise_scheduler: a training scheduler with ``add_noise``, ``get_velocity`` and a ``config`` holding
            ``num_train_timesteps`` and ``prediction_type`` (diffusers' ``DDPMScheduler`` API).
        is_lora: whether ``add_lora`` was called (adapters are trained, the base stays frozen).
    """

    denoiser: nn.Module
    noise_scheduler: Any
    is_lora: bool = False
    family: str = "sd"  # the model family: what the model card, exports and error messages name
    default_resolution: int = 512  # the family's native size, used when the config sets no resolution

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text conditioning for the denoiser, one row per prompt (no gradients)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [-1, 1] -> scaled latents (no gradients)."""

    @abstractmethod
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``[B, 3, H, W]`` images in [0, 1] (differentiable where the backend allows)."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int,
        guidance_scale: float,
        resolution: int,
        scheduler: str | None = None,
    ) -> list[Image.Image]:
        """One image per (prompt, seed) with the *current* weights; ``scheduler`` names a diffusers scheduler
        class for this call only (validation may sample with a faster one than the training images)."""

    @abstractmethod
    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        """Add LoRA adapters to the denoiser and freeze everything else."""

    @abstractmethod
    @contextmanager
    def reference_denoiser(self) -> Iterator[nn.Module]:
        """The frozen base model as a denoiser (LoRA: the same UNet with adapters disabled)."""

    supports_text_encoder_training: bool = False

    def condition_on_sizes(self, conditioning: Any, sizes: Sequence[tuple[int, int]], resolution: int) -> Any:
        """One conditioning row per image, for images of original ``(width, height)`` ``sizes`` that were
        resized and centre-cropped to ``resolution`` (:func:`~rpo_diffusers.data.center_crop_resize`).

        ``conditioning`` holds one row (repeated for every image) or one row per image. SD conditions on the
        prompt alone, so its rows only repeat; SDXL adds each image's size and crop (its time ids).
        """
        if len(conditioning) == len(sizes):
            return conditioning
        if len(conditioning) != 1:
            raise ValueError(f"{len(conditioning)} conditioning rows for {len(sizes)} images: give 1 or one each.")
        return conditioning.expand(len(sizes), *conditioning.shape[1:])

    _row_mask: AdapterRowMask | None = None  # an adapter that add_lora made maskable per row

    @property
    def can_mask_adapter_rows(self) -> bool:
        """Whether :meth:`adapters_on_rows` works (LoRA adapters that can be switched off per row)."""
        return self._row_mask is not None

    def adapters_on_rows(self, mask: torch.Tensor):
        """A context in which the LoRA adapters act on the batch rows where ``mask`` is 1 and the other rows see
        the base model: the trained and the reference model in one forward."""
        if self._row_mask is None:
            raise RuntimeError(f"{type(self).__name__}.adapters_on_rows needs LoRA adapters (add_lora).")
        return self._row_mask(mask.to(self.device))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of the prompts, the conditioning the denoiser embeds itself when the text encoder trains."""
        raise NotImplementedError(f"{type(self).__name__} cannot train the text encoder.")

    def train_text_encoder(self, lora: bool, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        """Make the text encoder trainable (full, or LoRA adapters on ``target_modules``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot train the text encoder.")

    def freeze_reference(self) -> None:
        """Keep the current (base) weights as the reference model; called once before training or resuming.

        LoRA needs nothing (disabling adapters gives the base back); full fine-tuning keeps a frozen copy.
        """
        return None

    @abstractmethod
    def export(self, output_dir: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, str]:
        """Write the trained model where the front end's users load it; returns named file paths."""

    # -- shared behaviour -------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> DiffusionComponents:
        """Move every model the loop uses to ``device``."""
        self.denoiser.to(device)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory where the backend supports it (no-op otherwise)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trained weights (the best-so-far snapshot)."""
        return {
            name: p.detach().to("cpu", copy=True)
            for name, p in self.denoiser.named_parameters()
            if p.requires_grad
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.denoiser.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise KeyError(f"Snapshot has weights the model lacks: {missing[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


def add_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
    """LoRA adapters on a transformers text encoder, trainable in fp32, everything else frozen.

    peft is called directly: transformers 5's ``add_adapter()`` asks for a peft release newer than PyPI has.
    """
    from peft import LoraConfig, inject_adapter_in_model

    text_encoder.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}  # what get_peft_model_state_dict reads
    for p in text_encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()


class AdapterRowMask:
    """Forward hooks on every LoRA up-projection (peft's ``lora_B``) of a module that, while a mask is set,
    scale each batch row's adapter output by it: rows with 0 see the base model, rows with 1 the adapted one.

    Every adapted layer of a UNet keeps the batch as its first dimension, so one forward can hold the trained
    and the frozen reference model's rows; a layer that does not is refused with a clear error.
    """

    def __init__(self, module: nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        for layer in module.modules():
            lora_b = getattr(layer, "lora_B", None)
            if isinstance(lora_b, nn.ModuleDict):
                for up in lora_b.values():
                    up.register_forward_hook(self._scale)

    def _scale(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if output.shape[0] != self.mask.shape[0]:
            raise RuntimeError(
                f"adapters_on_rows: a LoRA layer's output has {output.shape[0]} rows, the mask "
                f"{self.mask.shape[0]}; this model reshapes the batch before an adapter: set "
                "batch_reference_forward=False."
            )
        return output * self.mask.view(-1, *([1] * (output.dim() - 1))).to(output.dtype)

    @contextmanager
    def __call__(self, mask: torch.Tensor) -> Iterator[None]:
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None


@contextmanager
def merged_lora(*modules: nn.Module | None) -> Iterator[None]:
    """The LoRA adapters of ``modules`` merged into their base weights for a block of sampling.

    One matmul per adapted layer instead of three, and no adapter code per layer: on the toy model sampling
    with adapters attached took about 1.8x as long. The base weights are copied back bit for bit afterwards
    (a merge and an unmerge round off), since with LoRA they are the frozen reference model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for mod in modules if mod is not None for m in mod.modules()
              if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters]  # fmt: skip
    saved = [(m.get_base_layer(), {k: v.detach().clone() for k, v in m.get_base_layer().named_parameters(recurse=False)})
             for m in layers]  # fmt: skip
    for m in layers:
        m.merge()
    try:
        yield
    finally:
        for m in layers:
            m.unmerge()  # peft's bookkeeping; the exact weights come next
        with torch.no_grad():
            for base, params in saved:
                for name, value in params.items():
                    getattr(base, name).copy_(value)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name`` (a config names it; an unknown name fails here)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(
            f"Unknown diffusers scheduler {name!r} (e.g. 'DPMSolverMultistepScheduler', 'DDIMScheduler')."
        )
    return cls


def _sampling_scheduler(pipeline, name: str | None):
    if not name:
        return pipeline.scheduler
    return scheduler_class(name).from_config(pipeline.scheduler.config)


class DiffusersComponents(DiffusionComponents):
    """Adapter over a diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x, ε- or v-prediction).

    A family with the same parts and more conditioning (SDXL, :mod:`rpo_diffusers.sdxl`) subclasses it and
    overrides the hooks: ``text_encoders``, ``make_denoiser``, ``encode_prompts``, ``tokenize``.
    """

    supports_text_encoder_training = True
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    def __init__(
        self, pipeline, sampling_scheduler: str | None = None, weight_dtype: torch.dtype = torch.float32
    ):
        from diffusers import DDPMScheduler

        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.pipeline.scheduler = _sampling_scheduler(pipeline, sampling_scheduler)
        self._schedulers = {type(self.pipeline.scheduler).__name__: self.pipeline.scheduler}
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.weight_dtype = weight_dtype
        unet = pipeline.unet
        for module in (pipeline.vae, *self.text_encoders):
            module.requires_grad_(False).eval()
        if weight_dtype != torch.float32:  # LoRA: the whole frozen pipeline in half precision
            for module in (*self.half_precision_modules(), *self.text_encoders, unet):
                module.to(dtype=weight_dtype)
        unet.requires_grad_(True).train()
        self.denoiser = self.make_denoiser(unet)
        self._frozen_copy: Denoiser | None = None
        self.is_lora = False
        self._row_mask: AdapterRowMask | None = None  # set by add_lora

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders, in the order the conditioning concatenates them."""
        return [self.pipeline.text_encoder]

    def half_precision_modules(self) -> list[nn.Module]:
        """Frozen parts besides the text encoders and UNet that a half-precision LoRA run casts (the VAE)."""
        return [self.pipeline.vae]

    def make_denoiser(self, unet: nn.Module) -> Denoiser:
        return Denoiser(unet)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, vae_name_or_path: str | os.PathLike | None = None, **kwargs: Any
    ) -> DiffusersComponents:
        """Load the family's pipeline from a hub id or a local folder.

        Args:
            name_or_path: the pipeline (hub id or folder).
            vae_name_or_path: a VAE to use instead of the pipeline's own (a folder or hub id holding the
                ``AutoencoderKL`` itself, e.g. the fp16-safe ``madebyollin/sdxl-vae-fp16-fix``).
            kwargs: passed to the adapter (``sampling_scheduler``, ``weight_dtype``...).
        """
        from .hub import load_pretrained, pipeline_dtype_kwargs
        from .rewards import check_model_path

        path = check_model_path(name_or_path, "base model")  # before the heavy import: a typo fails in a second
        import diffusers

        dtype = kwargs.pop("torch_dtype", None) or torch.float32  # a half-precision checkpoint loads as fp32
        extra: dict[str, Any] = {}
        if vae_name_or_path:
            extra["vae"] = load_pretrained(
                diffusers.AutoencoderKL.from_pretrained, check_model_path(vae_name_or_path, "VAE"), kind="VAE",
                use_safetensors=True, **pipeline_dtype_kwargs(dtype),
            )  # fmt: skip
        pipeline = load_pretrained(
            getattr(diffusers, cls.pipeline_class_name).from_pretrained, path, kind="base model",
            use_safetensors=True, **cls.pipeline_load_kwargs, **extra, **pipeline_dtype_kwargs(dtype),
        )  # fmt: skip
        return cls(pipeline, **kwargs)

    @property
    def unet(self) -> nn.Module:
        return self.pipeline.unet

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def to(self, device: torch.device | str) -> DiffusersComponents:
        self.pipeline.to(device)
        if self._frozen_copy is not None:
            self._frozen_copy.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        latents = dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scaled = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + shift
        return (vae.decode(scaled, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def _scheduler(self, name: str | None):
        """The pipeline's sampling scheduler, or the one called ``name`` (built once, from the same config)."""
        if name is None:
            return self.pipeline.scheduler
        if name not in self._schedulers:
            self._schedulers[name] = scheduler_class(name).from_config(self.pipeline.scheduler.config)
        return self._schedulers[name]

    @torch.no_grad()
    def generate(
        self, prompts, seeds, num_inference_steps, guidance_scale, resolution, scheduler: str | None = None
    ) -> list[Image.Image]:
        return list(self.sample(prompts, seeds, num_inference_steps, guidance_scale, resolution, "pil", scheduler))

    @torch.no_grad()
    def sample(
        self, prompts, seeds, num_inference_steps, guidance_scale, resolution, output_type: str = "pil",
        scheduler: str | None = None,
    ):
        """The pipeline's images (``output_type="pil"``) or final latents (``"latent"``), one per (prompt, seed),
        with the pipeline's scheduler or the one named (the LoRA merged in while sampling)."""
        if len(prompts) != len(seeds):
            raise ValueError("generate() needs one seed per prompt.")
        was_training = self.unet.training
        default_scheduler = self.pipeline.scheduler
        self.pipeline.scheduler = self._scheduler(scheduler)
        self.unet.eval()
        try:
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            # Sample the initial noise on the CPU so images do not depend on the device.
            latents = torch.stack(
                [
                    torch.randn(
                        (
                            self.unet.config.in_channels,
                            resolution // self.pipeline.vae_scale_factor,
                            resolution // self.pipeline.vae_scale_factor,
                        ),
                        generator=g,
                    )
                    for g in generators
                ]
            ).to(self.device, self.unet.dtype)
            with merged_lora(self.unet, *self.text_encoders) if self.is_lora else nullcontext():
                out = self.pipeline(
                    list(prompts),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    latents=latents,
                    generator=generators,
                    output_type=output_type,
                )
        finally:
            self.unet.train(was_training)
            self.pipeline.scheduler = default_scheduler
        return out.images

    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        from peft import LoraConfig

        unet = self.unet
        unet.requires_grad_(False)  # already in weight_dtype (cast in __init__)
        unet.add_adapter(
            LoraConfig(
                r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
            )
        )
        # Trainable LoRA weights stay in fp32 even when the frozen base runs in fp16/bf16.
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.is_lora = True
        self.lora_rank, self.lora_alpha, self.lora_targets = rank, alpha, list(target_modules)
        self._row_mask = AdapterRowMask(unet)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.pipeline.tokenizer
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def train_text_encoder(self, lora: bool, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        for text_encoder in self.text_encoders:
            if lora:
                add_text_encoder_lora(text_encoder, rank, alpha, target_modules)
            else:
                text_encoder.requires_grad_(True)
            text_encoder.train()
        self.denoiser.set_text_encoders(self.text_encoders)  # the same objects the pipeline samples with

    @property
    def trains_text_encoder(self) -> bool:
        return self.denoiser.text_encoder is not None

    @contextmanager
    def reference_denoiser(self) -> Iterator[nn.Module]:
        if self.is_lora:
            self.unet.disable_adapters()
            try:
                yield self.denoiser
            finally:
                self.unet.enable_adapters()
            return
        if self._frozen_copy is None:
            raise RuntimeError("freeze_reference() must be called before training with the full UNet.")
        yield self._frozen_copy

    def freeze_reference(self) -> None:
        if not self.is_lora and self._frozen_copy is None:
            self._frozen_copy = copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    def export(self, output_dir: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, str]:
        from . import export

        out = Path(output_dir)
        if self.is_lora:
            text_encoders = self.text_encoders if self.trains_text_encoder else []
            return export.save_lora_model(
                self.pipeline, self.unet, out, lora_alpha=self.lora_alpha, text_encoders=text_encoders
            )
        return export.save_full_model(self.pipeline, out, unet=self.unet)
