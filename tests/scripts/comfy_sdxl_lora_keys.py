"""Run with ComfyUI's Python: does ComfyUI map every key of an SDXL kohya export (no "lora key not loaded"),
and does UNETLoader take the single-file SDXL UNet as SDXL with every tensor?

    python comfy_sdxl_lora_keys.py <ComfyUI folder> <this repository>

An SDXL-base-shaped UNet and both text encoders are built on the meta device (no weights, no memory); their
LoRA keys go through rpo_diffusers' kohya export, and ComfyUI's own code detects the UNet's config from its
diffusers state dict and builds the key map LoraLoader uses (comfy.utils.unet_to_diffusers as
comfy.lora.model_lora_keys_unet does, and comfy.lora.model_lora_keys_clip on ComfyUI's SDXL CLIP).
Exits 1 and lists the keys ComfyUI would drop.
"""

import sys

import torch

comfy_path, repo = sys.argv[1:3]
sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI reads its command line at import
sys.path[:0] = [comfy_path, repo]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.utils  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from rpo_diffusers.components import add_text_encoder_lora  # noqa: E402
from rpo_diffusers.config import DEFAULT_LORA_TARGETS, DEFAULT_TEXT_ENCODER_LORA_TARGETS  # noqa: E402
from rpo_diffusers.export import (  # noqa: E402
    kohya_text_encoder_prefixes,
    peft_to_kohya_state_dict,
    text_encoder_lora_state_dict,
)
from rpo_diffusers.testing.tiny_pipeline import SDXL_TEXT_CONFIGS, SDXL_UNET_CONFIG  # noqa: E402

with torch.device("meta"):
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    encoders = [
        cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c))
        for cls, c in zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_CONFIGS)
    ]
state = {k: torch.empty(v.shape, device="meta") for k, v in unet.state_dict().items()}
unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS))
kohya = peft_to_kohya_state_dict({k: torch.zeros(1) for k in get_peft_model_state_dict(unet)}, 8.0)
for encoder, prefix in zip(encoders, kohya_text_encoder_prefixes(2)):
    add_text_encoder_lora(encoder, 4, 8.0, DEFAULT_TEXT_ENCODER_LORA_TARGETS)
    names = {k: torch.zeros(1) for k in text_encoder_lora_state_dict(encoder)}
    kohya.update(peft_to_kohya_state_dict(names, 8.0, prefix=prefix))
modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in kohya}

config = comfy.model_detection.unet_config_from_diffusers_unet(state)
assert config and config["context_dim"] == 2048 and config["adm_in_channels"] == 2816, config
key_map: dict[str, str] = {}
for k in comfy.utils.unet_to_diffusers(config):
    if k.endswith(".weight"):
        key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
comfy.lora.model_lora_keys_clip(comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16), key_map)
missing = sorted(m for m in modules if m not in key_map)
print(f"{len(modules)} kohya modules, {len(missing)} not mapped by ComfyUI: {missing[:5]}")
# the single-file UNet (diffusers names), as UNETLoader's load_diffusion_model_state_dict converts it
model_config = comfy.model_detection.model_config_from_diffusers_unet(state)
converted = comfy.utils.unet_to_diffusers(model_config.unet_config)  # (its map also names optional parts)
left = [k for k in state if k not in converted]
print(
    f"UNETLoader: {type(model_config).__name__}, {len(state)} tensors, {len(left)} not converted: {left[:5]}"
)
sys.exit(1 if missing or left or type(model_config).__name__ != "SDXL" else 0)
