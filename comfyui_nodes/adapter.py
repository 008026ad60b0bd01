"""ComfyUI's MODEL / CLIP / VAE as :class:`rpo_diffusers.components.DiffusionComponents`.

The RPO node trains through the very same ``RPOTrainer`` loop as the script; this adapter is the only
ComfyUI-specific part. It trains a copy of the checkpoint's UNet (the user's loaded MODEL is never
modified), samples with its own small DDIM loop on that copy, and exports files ComfyUI's standard
loaders read: a kohya LoRA (LoraLoader) or an LDM-format UNet (UNETLoader).
"""

from __future__ import annotations

import copy
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

SUPPORTED_MODEL_CONFIGS = ("SD15", "SD20")


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

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor
    ) -> torch.Tensor:
        if self.before_forward is not None:
            self.before_forward()
        if self.compute_dtype is None:
            return self.unet(noisy_latents, timesteps=timesteps, context=conditioning)
        device = next(self.unet.parameters()).device
        out = self.unet(
            noisy_latents.to(device, self.compute_dtype),
            timesteps=timesteps.to(device),
            context=conditioning.to(device, self.compute_dtype),
        )
        return out.to(noisy_latents.device, torch.float32)


def check_supported_model(model: Any) -> str:
    """The MODEL must be an SD 1.x / 2.x checkpoint; anything else gets an error naming what it is."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(base).__name__
    if name not in SUPPORTED_MODEL_CONFIGS or not hasattr(base, "diffusion_model"):
        raise ValueError(
            f"RPO Train supports Stable Diffusion 1.x / 2.x checkpoints; this MODEL is {name!r}. Load an SD 1.5 or "
            "SD 2.x checkpoint with Load Checkpoint."
        )
    return name


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

        self.config_name = check_supported_model(model)
        comfy.model_management.load_models_gpu(
            [model]
        )  # bakes any patches (e.g. an earlier LoRA) into the weights
        self.model_patcher, self.clip, self.vae = model, clip, vae
        self.base_unet = model.model.diffusion_model
        # Train a copy (cloned out of inference mode): the user's MODEL stays untouched and is the reference.
        self.train_unet = copy.deepcopy(self.base_unet).float().requires_grad_(True).train()
        self.check_interrupt = check_interrupt
        self.denoiser = ComfyDenoiser(self.train_unet, before_forward=check_interrupt)
        self.noise_scheduler = ddpm_scheduler_for(model)
        self.output_file = Path(output_file)
        self.is_lora = False
        self._row_mask: AdapterRowMask | None = None  # set by add_lora
        self.on_sampling_step = on_sampling_step
        self._uncond: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ComfyComponents:
        self.train_unet.to(device)
        return self

    # -- conditioning and latents --------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        conds = []
        for p in prompts:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(p))
            conds.append(cond[:, :77] if cond.shape[1] > 77 else cond)
        return torch.cat(conds).float().to(self.device)

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
        cond = self.encode_prompts(prompts)
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        uncond = self._uncond.expand(len(prompts), -1, -1)
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

    @property
    def can_mask_adapter_rows(self) -> bool:
        return self._row_mask is not None

    def adapters_on_rows(self, mask: torch.Tensor):
        """The trained and the reference rows in one forward (see ``DiffusionComponents.adapters_on_rows``)."""
        if self._row_mask is None:
            raise RuntimeError("adapters_on_rows needs LoRA adapters (add_lora).")
        return self._row_mask(mask.to(self.device))

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
        yield ComfyDenoiser(self.base_unet, compute_dtype=dtype, before_forward=self.check_interrupt)

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
