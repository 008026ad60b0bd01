"""Run under `accelerate launch --multi_gpu --num_processes 2`: DPG on the tiny pipeline, then each rank saves
its own critic weights, so the test can check that the ranks' critics stayed identical."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.data import load_image_folder

model, scorer, instance_dir, out = sys.argv[1:5]
config = RPOConfig(
    method="dpg", pretrained_model_name_or_path=model, scorer_model_name_or_path=scorer,
    class_noun="dog", output_dir=out, resolution=32, num_inference_steps=2, num_validation_images=1,
    max_train_steps=4, validation_steps=4, learning_rate=1e-3, report_to="none", use_lora=True,
    train_prompts=["a sks dog on the beach"],
)  # fmt: skip
trainer = RPOTrainer(config, reference_images=load_image_folder(instance_dir))
trainer.train()
critic = trainer.accelerator.unwrap_model(trainer.objective.critic.module)
rank = trainer.accelerator.process_index
save_file({k: v.contiguous().cpu() for k, v in critic.state_dict().items()}, str(Path(out) / f"critic_rank{rank}.safetensors"))
