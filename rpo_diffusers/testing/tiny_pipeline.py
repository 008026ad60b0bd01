"""A tiny, randomly initialised Stable Diffusion pipeline built from configs (no download)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..export import make_text_files_portable
from .tokenizers import DEFAULT_WORDS, write_clip_tokenizer


def build_tiny_pipeline(
    directory: str | os.PathLike,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
):
    """Build and save a tiny ``StableDiffusionPipeline`` that loads with ``from_pretrained(directory)``.

    Args:
        directory: where to save it.
        prediction_type: ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x).
        sample_size: image resolution in pixels (the VAE downsamples by 2, so latents are ``sample_size // 2``).
        words: vocabulary for the CLIP tokenizer (the identifier should be one of them).
        seed: initialisation seed.

    Returns:
        The pipeline (already saved).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(out / "_tokenizer_src", words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    vae = _tiny_vae(sample_size)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return _save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)


def build_sd15_shaped_pipeline(
    directory: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16
):
    """Save a randomly initialised pipeline with Stable Diffusion 1.5's exact shapes (no download).

    For tools that detect the model family from tensor shapes (ComfyUI) and for speed/memory benchmarks at
    real size; it draws noise, not pictures. The tokenizer is a small stand-in (ComfyUI brings its own).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tokenizer_src"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)  # fmt: skip
    return _save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler, dtype=dtype)


def build_tiny_sdxl_pipeline(
    directory: str | os.PathLike,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
):
    """Build and save a tiny ``StableDiffusionXLPipeline`` (both text encoders, size/crop conditioning).

    The same widths as :func:`build_tiny_pipeline`, so speed and memory compare like for like; the UNet takes
    the two encoders' penultimate states concatenated (32 + 32) and ``added_cond_kwargs`` (pooled 32-d text
    embedding + 6 time ids, 8-d each), as SDXL does at full size (768 + 1280, 1280 + 6 x 256).

    Args:
        directory: where to save it.
        prediction_type: ``"epsilon"`` (SDXL base) or ``"v_prediction"``.
        sample_size: image resolution in pixels (the VAE downsamples by 2).
        words: vocabulary of both CLIP tokenizers.
        seed: initialisation seed.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tokenizer_src", words))
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "_tokenizer_src")

    def clip_config(width: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="gelu")  # fmt: skip

    text_encoder = CLIPTextModel(clip_config(32, 3))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(32, 3))
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)  # fmt: skip
    return _save(pipe, out)


SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SDXL_TEXT_CONFIGS = (  # CLIP ViT-L/14's text tower, OpenCLIP ViT-bigG/14's (with its projection)
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         projection_dim=768, hidden_act="quick_gelu"),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         projection_dim=1280, hidden_act="gelu"),
)  # fmt: skip


def build_sdxl_shaped_pipeline(
    directory: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16
):
    """Save a randomly initialised pipeline with SDXL base 1.0's exact shapes (no download; ~3.5B parameters).

    For speed/memory benchmarks at real size (1024 px) on a GPU; it draws noise, not pictures. The tokenizers
    are small stand-ins with SDXL's 77-token length (the text encoders keep CLIP's 49408-token vocabulary).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_configs = [CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c) for c in SDXL_TEXT_CONFIGS]
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tokenizer_src"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_configs[0]), text_encoder_2=CLIPTextModelWithProjection(text_configs[1]),
        tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(out / "_tokenizer_src"),
        unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    return _save(pipe, out, dtype)


def _tiny_vae(sample_size: int, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _save_pipeline(
    out: Path, vae, text_encoder, tokenizer, unet, scheduler, dtype: torch.dtype | None = None
):
    """Assemble an SD pipeline and save it (see :func:`_save`)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    return _save(pipe, out, dtype)


def _save(pipe, out: Path, dtype: torch.dtype | None = None):
    """Save (safetensors, classic text-encoder keys) and drop the temporary tokenizer source."""
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    make_text_files_portable(out)
    for f in (out / "_tokenizer_src").iterdir():
        f.unlink()
    (out / "_tokenizer_src").rmdir()
    return pipe
