"""ComfyUI's MODEL / CLIP / VAE as :class:`rpo_diffusers.components.DiffusionComponents`.

Two model families: SD 1.x / 2.x (:class:`ComfyComponents`) and SDXL (:class:`ComfySDXLComponents`, the same
adapter with SDXL's conditioning: the pooled output and the size embedding, built by the checkpoint's own
``encode_adm`` as KSampler builds it). Anything else is refused by :func:`check_supported_model`.

The RPO node trains through the very same ``RPOTrainer`` loop as the script; this adapter is the only
ComfyUI-specific part. It trains a copy of the checkpoint's UNet (the user's loaded MODEL is never
modified), samples with its own small DDIM loop on that copy, and exports files ComfyUI's standard
loaders read: a kohya LoRA (LoraLoader) or an LDM-format UNet (UNETLoader).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from rpo_diffusers.components import AdapterRowMask, DiffusionComponents
from rpo_diffusers.export import atomic_save_file, lora_metadata, peft_to_kohya_state_dict
from rpo_diffusers.families import NATIVE_RESOLUTION, SD, SDXL, check_sdxl_resolution
from rpo_diffusers.sdxl import SDXLConditioning, SDXLSizeConditioning

# ComfyUI's model configs (comfy/supported_models.py) per family: SDXL base and its distilled variants share
# its UNet layout and conditioning; refiner, inpainting, EDM (Playground v2.5) and other families are refused.
SUPPORTED_MODEL_CONFIGS = {"SD15": SD, "SD20": SD, "SDXL": SDXL, "SSD1B": SDXL, "Segmind_Vega": SDXL,
                           "KOALA_700M": SDXL, "KOALA_1B": SDXL}  # fmt: skip
SUPPORTED_PREDICTIONS = ("EPS", "V_PREDICTION")
SUPPORTED_TEXT = "Stable Diffusion 1.x / 2.x and SDXL (base) checkpoints"


class ComfyDenoiser(nn.Module):
    """ComfyUI's LDM ``UNetModel`` with the loop's call signature (DDPM-space input, integer timesteps).

    Args:
        compute_dtype: the dtype the UNet computes in (ComfyUI keeps checkpoints in fp16 / bf16 on GPUs, and
            casts inputs itself in ``BaseModel._apply_model``); ``None`` = the inputs' own dtype (the fp32 copy).
        before_forward: called before every UNet call; it may raise to stop (ComfyUI's Interrupt), so a stop
            waits for at most one forward or backward pass, not a whole training step.
    """

    def __init__(
        self,
        unet: nn.Module,
        compute_dtype: torch.dtype | None = None,
        before_forward: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.compute_dtype = compute_dtype
        self.before_forward = before_forward

    def conditioning_kwargs(self, conditioning: Any) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs: SD's is the text states alone (``context``)."""
        return {"context": conditioning}

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        if self.before_forward is not None:
            self.before_forward()
        kwargs = self.conditioning_kwargs(conditioning)
        if self.compute_dtype is None:
            return self.unet(noisy_latents, timesteps=timesteps, **kwargs)
        device = next(self.unet.parameters()).device
        out = self.unet(
            noisy_latents.to(device, self.compute_dtype),
            timesteps=timesteps.to(device),
            **{k: v.to(device, self.compute_dtype) for k, v in kwargs.items()},
        )
        return out.to(noisy_latents.device, torch.float32)


class ComfySDXLDenoiser(ComfyDenoiser):
    """SDXL's UNet takes ``y`` besides the text states: the pooled output and the six size ids, embedded by the
    checkpoint's own ``encode_adm`` (comfy/model_base.py ``SDXL``), exactly as KSampler conditions it.

    Args:
        encode_adm: the ComfyUI model's ``encode_adm`` (keyword arguments as CLIPTextEncodeSDXL's cond dict).
    """

    def __init__(self, unet: nn.Module, encode_adm: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        super().__init__(unet, **kwargs)
        self.encode_adm = encode_adm

    def conditioning_kwargs(self, conditioning: SDXLConditioning) -> dict[str, torch.Tensor]:
        if not isinstance(conditioning, SDXLConditioning):
            raise TypeError(f"SDXL's UNet needs SDXLConditioning, got {type(conditioning).__name__}.")
        return {"context": conditioning.prompt_embeds, "y": sdxl_adm(self.encode_adm, conditioning)}


def sdxl_adm(encode_adm: Callable[..., torch.Tensor], conditioning: SDXLConditioning) -> torch.Tensor:
    """``y`` for each row: ComfyUI's size names for the ids (h, w, crop top, crop left, target h, target w)."""
    names = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
    rows = [
        encode_adm(pooled_output=pooled[None], **dict(zip(names, ids)))
        for pooled, ids in zip(conditioning.text_embeds, conditioning.time_ids.tolist())
    ]
    return torch.cat(rows).to(conditioning.prompt_embeds.device, torch.float32)


def check_supported_model(model: Any, resolution: int | None = None) -> str:
    """The MODEL's family (``"sd"`` or ``"sdxl"``); anything else gets an error naming what it is and what is
    supported. With ``resolution``, an SDXL size its size ids and latent grid cannot describe is refused too."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(base).__name__
    if name not in SUPPORTED_MODEL_CONFIGS or not hasattr(base, "diffusion_model"):
        raise ValueError(
            f"RPO Train supports {SUPPORTED_TEXT}; this MODEL is {name!r}. Load an SD 1.5, SD 2.x or SDXL base "
            "checkpoint with Load Checkpoint."
        )
    prediction = getattr(getattr(base, "model_type", None), "name", "EPS")
    if prediction not in SUPPORTED_PREDICTIONS:
        raise ValueError(
            f"RPO Train supports {SUPPORTED_TEXT} with ε- or v-prediction on the discrete 1000-step schedule; this "
            f"{name} MODEL uses {prediction} (e.g. Playground v2.5 or an EDM merge)."
        )
    unet_config = getattr(config, "unet_config", {})
    if unet_config.get("in_channels", 4) != 4:
        raise ValueError(
            f"This {name} MODEL's UNet takes {unet_config['in_channels']} input channels (an inpainting or "
            f"instruct model); RPO Train personalizes text-to-image {SUPPORTED_TEXT}: load the base model."
        )
    family = SUPPORTED_MODEL_CONFIGS[name]
    if family == SDXL and resolution is not None:
        levels = len(unet_config.get("channel_mult") or [0] * 3)
        check_sdxl_resolution(resolution, {"block_out_channels": [0] * 4}, {"block_out_channels": [0] * levels})
    return family


def training_resolution(model: Any, resolution: int) -> int:
    """The training node's size: 0 is the family's native one (512 SD, 1024 SDXL); the model must be supported and
    an SDXL size its size ids cannot describe is refused (before anything loads or is written)."""
    family = check_supported_model(model, resolution or None)
    return int(resolution or NATIVE_RESOLUTION[family])


def ddpm_scheduler_for(model: Any):
    """A diffusers DDPMScheduler with exactly the checkpoint's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    sigmas = model.model.model_sampling.sigmas.detach().double().cpu()
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1.0 - alphas_cumprod / previous).float()
    model_type = getattr(model.model, "model_type", None)
    prediction = "v_prediction" if getattr(model_type, "name", "") == "V_PREDICTION" else "epsilon"
    return DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(), prediction_type=prediction,
                         clip_sample=False)  # fmt: skip


def ldm_to_diffusers_names(unet_config: dict) -> dict[str, str]:
    """Map ComfyUI (LDM) UNet module names to diffusers names, so kohya files use the common convention."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ldm key
    return {
        ldm.removesuffix(".weight"): dif.removesuffix(".weight")
        for dif, ldm in mapping.items()
        if dif.endswith(".weight")
    }


class ComfyComponents(DiffusionComponents):
    """Adapter over ComfyUI's MODEL (ModelPatcher), CLIP and VAE for SD 1.x / 2.x.

    Args:
        model, clip, vae: what Load Checkpoint outputs.
        output_file: where :meth:`export` writes the trained LoRA / UNet (under ComfyUI's models folders).
        on_sampling_step: called as ``fn(step, total)`` after every sampling step (progress).
        check_interrupt: called before every UNet call (training, reference and sampling); it raises to stop.
    """

    def __init__(
        self,
        model: Any,
        clip: Any,
        vae: Any,
        output_file: str | os.PathLike,
        on_sampling_step: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> None:
        import comfy.model_management

        family = check_supported_model(model)
        if family != self.family:
            raise ValueError(
                f"{type(self).__name__} adapts {self.family} checkpoints and this MODEL is {family}: build the adapter "
                "with comfy_components(), which picks the family's."
            )
        comfy.model_management.load_models_gpu(
            [model]
        )  # bakes any patches (e.g. an earlier LoRA) into the weights
        self.model_patcher, self.clip, self.vae = model, clip, vae
        self.base_unet = model.model.diffusion_model
        # Train a copy (cloned out of inference mode): the user's MODEL stays untouched and is the reference.
        self.train_unet = copy.deepcopy(self.base_unet).float().requires_grad_(True).train()
        self.check_interrupt = check_interrupt
        self.denoiser = self.make_denoiser(self.train_unet)
        self.noise_scheduler = ddpm_scheduler_for(model)
        self.output_file = Path(output_file)
        self.is_lora = False
        self._row_mask: AdapterRowMask | None = None  # set by add_lora
        self.on_sampling_step = on_sampling_step
        self._uncond: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ComfyComponents:
        self.train_unet.to(device)
        return self

    def make_denoiser(self, unet: nn.Module, compute_dtype: torch.dtype | None = None) -> ComfyDenoiser:
        """The family's denoiser around ``unet`` (the trained copy, or the user's UNet as the reference)."""
        return ComfyDenoiser(unet, compute_dtype=compute_dtype, before_forward=self.check_interrupt)

    # -- conditioning and latents --------------------------------------------------------------------
    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIPTextEncode's cond (the first 77-token chunk, as training sees one) and its pooled output."""
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
        return cond[:, :77], pooled

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.encode_text(p)[0] for p in prompts]).float().to(self.device)

    def sampling_conditioning(self, prompts: Sequence[str], resolution: int) -> tuple[Any, Any]:
        """(negative, positive) conditioning for drawing ``prompts`` at ``resolution``; the empty prompt is the
        negative, as an empty CLIPTextEncode gives KSampler."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(len(prompts), -1, -1), self.encode_prompts(prompts)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float().cpu() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)  # BCHW [-1,1] -> BHWC [0,1]
        latents = self.vae.encode(images)
        return self.model_patcher.model.process_latent_in(latents).float().to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        from .conversions import comfy_image_to_pil

        images = self.vae.decode(self.model_patcher.model.process_latent_out(latents.float().cpu()))
        return comfy_image_to_pil(images.reshape(-1, *images.shape[-3:]))

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """ComfyUI's VAE decodes without gradients: DPG rewards on images train through the critic here."""
        images = self.vae.decode(self.model_patcher.model.process_latent_out(latents.float().cpu()))
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1).float().clamp(0, 1).to(latents.device)

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts, seeds, num_inference_steps, guidance_scale, resolution, scheduler: str | None = None
    ) -> list[Image.Image]:
        """DDIM (or the diffusers ``scheduler`` named) with classifier-free guidance on the *trained copy*
        (what RPO is validating)."""
        from rpo_diffusers.components import merged_lora, scheduler_class

        if len(prompts) != len(seeds):
            raise ValueError("generate() needs one seed per prompt.")
        sched = scheduler_class(scheduler or "DDIMScheduler").from_config(
            self.noise_scheduler.config, timestep_spacing="trailing"
        )
        sched.set_timesteps(num_inference_steps)
        uncond, cond = self.sampling_conditioning(prompts, resolution)
        size = resolution // 8
        latents = torch.stack(
            [torch.randn(4, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self.device)
        was_training = self.train_unet.training
        self.train_unet.eval()
        try:
            with merged_lora(self.train_unet) if self.is_lora else nullcontext():
                for i, t in enumerate(sched.timesteps):
                    tt = torch.full((2 * len(prompts),), int(t), device=self.device)
                    out = self.denoiser(torch.cat([latents, latents]), tt, torch.cat([uncond, cond]))
                    u, c = out.chunk(2)
                    latents = sched.step(u + guidance_scale * (c - u), t, latents).prev_sample
                    if self.on_sampling_step is not None:
                        self.on_sampling_step(i + 1, len(sched.timesteps))
        finally:
            self.train_unet.train(was_training)
        return self.decode_latents(latents)

    # -- LoRA and the reference ------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.train_unet.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
        )
        inject_adapter_in_model(config, self.train_unet)
        for name, p in self.train_unet.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                p.data = p.data.float()
        self.is_lora = True
        self.lora_rank, self.lora_alpha, self.lora_targets = rank, float(alpha), list(target_modules)
        self._row_mask = AdapterRowMask(self.train_unet)

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.train_unet.modules() if isinstance(m, BaseTunerLayer)]

    @contextmanager
    def reference_denoiser(self) -> Iterator[nn.Module]:
        if self.is_lora:
            layers = self._lora_layers()
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield self.denoiser
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
            return
        # The user's untouched UNet is the frozen reference, in its own dtype; ComfyUI may have offloaded it
        # (e.g. to make room for the VAE), so it is loaded back first.
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model_patcher])
        base = self.model_patcher.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        yield self.make_denoiser(self.base_unet, compute_dtype=dtype)

    # -- export ----------------------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in kohya format with diffusers-style module names (ComfyUI, A1111, kohya)."""
        from peft.utils import get_peft_model_state_dict

        names = ldm_to_diffusers_names(self.model_patcher.model.model_config.unet_config)
        renamed = {}
        for key, value in get_peft_model_state_dict(self.train_unet).items():
            module, _, part = key.partition(".lora_")
            renamed[f"{names.get(module, module)}.lora_{part}"] = value
        return peft_to_kohya_state_dict(renamed, self.lora_alpha, dtype=torch.float16)

    def export(self, output_dir: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, str]:
        if self.is_lora:
            meta = lora_metadata(self.lora_rank, self.lora_alpha, self.lora_targets)
            path = atomic_save_file(self.lora_state_dict(), self.output_file, metadata=meta)
            return {"lora": str(path)}
        state = {k: v.to(torch.float16) for k, v in self.train_unet.state_dict().items()}
        path = atomic_save_file(
            state, self.output_file, metadata={"format": "ldm-unet", "rpo": str(metadata)}
        )
        return {"unet": str(path)}


class ComfySDXLComponents(SDXLSizeConditioning, ComfyComponents):
    """The SD adapter with SDXL's conditioning: :class:`~rpo_diffusers.sdxl.SDXLConditioning` rows (CLIP-L + CLIP-G
    states, CLIP-G's pooled output, size ids), turned into the UNet's ``y`` by the checkpoint's ``encode_adm``.

    Prompts are told the training ``resolution`` (no crop), reference photos their own size and crop
    (:meth:`condition_on_sizes`, as the diffusers SDXL adapter does), images drawn for validation the size they
    are drawn at: what KSampler tells SDXL for a plain CLIPTextEncode at that latent size.
    """

    family = SDXL
    default_resolution = NATIVE_RESOLUTION[SDXL]

    def __init__(self, model: Any, clip: Any, vae: Any, output_file: str | os.PathLike,
                 resolution: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        self.resolution = int(resolution or self.default_resolution)
        check_supported_model(model, self.resolution)
        super().__init__(model, clip, vae, output_file, **kwargs)
        self.context_dim = model.model.model_config.unet_config["context_dim"]

    def make_denoiser(self, unet: nn.Module, compute_dtype: torch.dtype | None = None) -> ComfySDXLDenoiser:
        return ComfySDXLDenoiser(unet, self.model_patcher.model.encode_adm, compute_dtype=compute_dtype,
                                 before_forward=self.check_interrupt)  # fmt: skip

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SDXLConditioning:
        conds, pooled = zip(*(self.encode_text(p) for p in prompts))
        if pooled[0] is None or conds[0].shape[-1] != self.context_dim:
            raise ValueError(
                f"This CLIP gives {conds[0].shape[-1]}-wide conditioning{' and no pooled output' if pooled[0] is None else ''}; "
                f"the SDXL MODEL needs {self.context_dim} (CLIP-L + CLIP-G): connect the CLIP of the same SDXL "
                "checkpoint (Load Checkpoint's CLIP output)."
            )
        return SDXLConditioning(
            torch.cat(conds).float().to(self.device),
            torch.cat(pooled).float().to(self.device),
            self._time_ids(len(prompts)),
        )

    def sampling_conditioning(self, prompts: Sequence[str], resolution: int) -> tuple[Any, Any]:
        uncond, cond = super().sampling_conditioning(prompts, resolution)
        ids = self._time_ids(len(prompts), resolution)
        return dataclasses.replace(uncond, time_ids=ids), dataclasses.replace(cond, time_ids=ids)


def comfy_components(model: Any, clip: Any, vae: Any, output_file: str | os.PathLike, resolution: int,
                     **kwargs: Any) -> ComfyComponents:  # fmt: skip
    """The family's adapter for a Load Checkpoint MODEL / CLIP / VAE (SD 1.x / 2.x or SDXL)."""
    if check_supported_model(model, resolution) == SDXL:
        return ComfySDXLComponents(model, clip, vae, output_file, resolution=resolution, **kwargs)
    return ComfyComponents(model, clip, vae, output_file, **kwargs)
