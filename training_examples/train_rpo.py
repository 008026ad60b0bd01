#!/usr/bin/env python
"""Personalize Stable Diffusion on a subject: RPO (default), DreamBooth or DPG, on one training loop.

    accelerate launch training_examples/train_rpo.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir ./dog --class_noun dog --output_dir rpo-dog --use_lora
    # --method dreambooth [--with_prior_preservation]   DreamBooth
    # --method dpg --dpg_reward dino                    DPG with the DINO look-forward reward
    # --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0   SDXL (1024 px by default)

Argument names follow diffusers' ``train_dreambooth(_lora).py`` where the meaning is the same; every
field of :class:`rpo_diffusers.RPOConfig` is an argument (``--help`` lists them). The result loads with
``StableDiffusionPipeline.from_pretrained(output_dir)`` (full; ``StableDiffusionXLPipeline`` for SDXL) or
``pipe.load_lora_weights(output_dir)`` (LoRA). The model family is read from the pipeline's model_index.json.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from rpo_diffusers.config import RPOConfig


@dataclass
class ScriptArguments:
    """Options of the script that are not training settings."""

    push_to_hub: bool = field(default=False, metadata={"help": "Upload the result to the Hugging Face Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id; default: the output_dir name."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Hub token; default: the logged-in token."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    debug: bool = field(default=False, metadata={"help": "Show the full traceback of an error."})
    skip_unreadable_images: bool = field(
        default=False,
        metadata={
            "help": "Skip unreadable files in --instance_data_dir (corrupt, empty, broken symlinks, too large) with a "
            "warning per file instead of failing."
        },
    )


KINDS = {"pretrained_model_name_or_path": "base model", "scorer_model_name_or_path": "scorer",
         "dpg_reward_model": "DINO model", "pretrained_vae_model_name_or_path": "VAE"}  # fmt: skip


def _negated_flags_say_what_they_do(parser: HfArgumentParser) -> None:
    """HfArgumentParser gives ``--no_X`` the help of ``--X``; say instead what the negation does."""
    for action in parser._actions:
        negated = [o for o in action.option_strings if o.startswith("--no_")]
        if negated:
            action.help = f"Set {negated[0].removeprefix('--no_')} to False (see --{negated[0].removeprefix('--no_')})."


def parse_args(input_args: list[str] | None = None) -> tuple[RPOConfig, ScriptArguments]:
    parser = HfArgumentParser((RPOConfig, ScriptArguments), description=__doc__.split("\n\n")[0])
    _negated_flags_say_what_they_do(parser)
    config, script = parser.parse_args_into_dataclasses(args=input_args)
    if not config.pretrained_model_name_or_path:
        parser.error(
            "--pretrained_model_name_or_path is required (a diffusers Stable Diffusion folder or hub id)."
        )
    if not config.instance_data_dir:
        parser.error("--instance_data_dir is required (a folder with 3-6 photos of the subject).")
    from rpo_diffusers.rewards import check_model_path

    flags = ["pretrained_model_name_or_path", "scorer_model_name_or_path"]
    if config.method == "dpg" and config.dpg_reward == "dino":
        flags.append("dpg_reward_model")
    if config.pretrained_vae_model_name_or_path:
        flags.append("pretrained_vae_model_name_or_path")
    for flag in flags:
        try:  # fail in a second, before loading anything
            check_model_path(getattr(config, flag), KINDS[flag])
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            parser.error(f"--{flag}: {err}")
    from rpo_diffusers.families import UnsupportedModelError, check_model

    try:  # the model family from its configs: a refiner, an inpainting model, SD3... fail here
        check_model(config.pretrained_model_name_or_path, config.resolution)
    except UnsupportedModelError as err:
        parser.error(f"--pretrained_model_name_or_path: {err}")
    return config, script


def main(config: RPOConfig, script: ScriptArguments) -> int:
    from rpo_diffusers.data import UnreadableImageError, load_image_folder
    from rpo_diffusers.export import push_to_hub
    from rpo_diffusers.trainer import RPOTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        references = load_image_folder(
            config.instance_data_dir, skip_unreadable=script.skip_unreadable_images
        )
    except UnreadableImageError as err:  # one photo: say how to train without it
        raise UnreadableImageError(
            f"{str(err).rstrip('.')} (or pass --skip_unreadable_images to skip such files)."
        ) from err
    trainer = RPOTrainer(config, reference_images=references)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(
            f"best step {result.best_step}: validation reward {result.best_reward:.4f}; saved to {result.output_dir}"
        )
        if script.push_to_hub:
            repo_id = script.hub_model_id or config.output_dir.rstrip("/").split("/")[-1]
            url = push_to_hub(
                config.output_dir, repo_id, private=script.hub_private_repo, token=script.hub_token
            )
            print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    from rpo_diffusers.errors import run_cli

    sys.exit(run_cli(lambda: main(*parse_args()), debug="--debug" in sys.argv[1:]))
