"""RPOConfig: every setting of an RPO run, with the paper's defaults (DESIGN.md section 2).

A plain dataclass so that ``transformers.HfArgumentParser(RPOConfig)`` can read it from the command line
or a JSON file, TRL-style. Validation happens in ``__post_init__`` so a bad value fails before any model
is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .prompts import (
    DEFAULT_IDENTIFIER,
    check_prompts_have_identifier,
    instance_prompt,
    subject_type_for,
    training_prompts,
)
from .rewards import check_lambda

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class RPOConfig:
    """Settings for :class:`~rpo_diffusers.trainer.RPOTrainer`. Defaults follow the RPO paper."""

    # --- models and data -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Stable Diffusion 1.x/2.x pipeline: hub id or local folder."}
    )
    scorer_model_name_or_path: str = field(
        default="kakaobrain/align-base",
        metadata={"help": "Dual encoder for the λ-harmonic reward (ALIGN/CLIP/SigLIP)."},
    )
    instance_data_dir: str | None = field(
        default=None, metadata={"help": "Folder with 3-6 photos of the subject."}
    )
    # --- subject ---------------------------------------------------------------------------------
    class_noun: str = field(
        default="dog", metadata={"help": "Class of the subject, e.g. 'dog' or 'backpack'."}
    )
    identifier: str = field(
        default=DEFAULT_IDENTIFIER, metadata={"help": "Rare token naming the subject ('sks', '[V]')."}
    )
    subject_type: str | None = field(
        default=None, metadata={"help": "'live' or 'object'; inferred from class_noun (dog, cat are live)."}
    )
    instance_prompt: str | None = field(
        default=None,
        metadata={"help": "Prompt of the reference images; default 'a photo of <identifier> <class_noun>'."},
    )
    train_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Training prompts (each with the identifier); default: the 8 RPO prompts."},
    )
    validation_prompts: list[str] | None = field(
        default=None, metadata={"help": "Validation prompts; default: the training prompts."}
    )
    # --- generated training set and reward ------------------------------------------------------------
    images_per_prompt: int = field(
        default=4, metadata={"help": "Base-model images generated per training prompt."}
    )
    lambda_train: float = field(default=0.0, metadata={"help": "λ of the reward that labels preferences."})
    lambda_val: float = field(
        default=0.5, metadata={"help": "λ of the validation reward that picks the checkpoint."}
    )
    # --- objective ---------------------------------------------------------------------------------
    beta: float = field(default=1.0, metadata={"help": "Temperature β of the preference loss."})
    pref_loss_weight: float = field(
        default=1.0, metadata={"help": "w_pref; 0 trains with L_sim only (DreamBooth)."}
    )
    # --- optimisation -------------------------------------------------------------------------------
    max_train_steps: int = field(default=400, metadata={"help": "Optimiser steps."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Default 5e-6 for the full UNet, 1e-4 with LoRA."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW ε."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers.optimization scheduler name."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the LR schedule."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping."})
    train_batch_size: int = field(default=1, metadata={"help": "Pairs per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step."}
    )
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16'."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute UNet activations to save memory."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of generation, labels, noise and validation."})
    # --- LoRA ---------------------------------------------------------------------------------------
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full UNet."})
    rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default = rank."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "UNet modules that get LoRA adapters."},
    )
    # --- sampling (training images and validation) -------------------------------------------------
    resolution: int = field(default=512, metadata={"help": "Training and sampling resolution (pixels)."})
    num_inference_steps: int = field(
        default=50, metadata={"help": "Sampling steps for training and validation images."}
    )
    guidance_scale: float = field(
        default=7.5, metadata={"help": "Classifier-free guidance scale for sampling."}
    )
    sampling_scheduler: str | None = field(
        default=None,
        metadata={"help": "diffusers scheduler class for sampling (e.g. 'DPMSolverMultistepScheduler')."},
    )
    generation_batch_size: int = field(default=4, metadata={"help": "Images sampled per pipeline call."})
    # --- validation and early stopping -------------------------------------------------------------
    validation_steps: int = field(
        default=40, metadata={"help": "Validate every N optimiser steps (and at step 0)."}
    )
    num_validation_images: int = field(default=4, metadata={"help": "Images per validation prompt."})
    patience: int | None = field(
        default=None, metadata={"help": "Stop after this many validations without improvement (None: never)."}
    )
    early_stopping: bool = field(
        default=True,
        metadata={
            "help": "Export the validation step with the best reward (RPO's selection). False exports the last "
            "step (validation still runs and is logged): the DreamBooth-style baselines."
        },
    )
    # --- output ------------------------------------------------------------------------------------------
    output_dir: str = field(
        default="rpo-output", metadata={"help": "Where the model, history and checkpoints go."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable state every N steps."}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most this many checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to continue from."}
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "'tensorboard', 'wandb', 'all' or 'none'."}
    )
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard folder, relative to output_dir."})

    def __post_init__(self) -> None:
        if not self.class_noun or not self.class_noun.strip():
            raise ValueError("class_noun is empty: set it to the subject's class, e.g. 'dog'.")
        if not self.identifier or not self.identifier.strip() or " " in self.identifier.strip():
            raise ValueError(
                f"identifier must be one non-empty token such as 'sks', got {self.identifier!r}."
            )
        self.subject_type = self.subject_type or subject_type_for(self.class_noun)
        if self.subject_type not in ("live", "object"):
            raise ValueError(f"subject_type must be 'live' or 'object', got {self.subject_type!r}.")
        self.lambda_train = check_lambda(self.lambda_train, "lambda_train")
        self.lambda_val = check_lambda(self.lambda_val, "lambda_val")
        if self.instance_prompt is None:
            self.instance_prompt = instance_prompt(self.class_noun, self.identifier)
        if self.train_prompts is None:
            self.train_prompts = training_prompts(self.class_noun, self.identifier, self.subject_type)
        self.train_prompts = [p.strip() for p in self.train_prompts if p and p.strip()]
        if not self.train_prompts:
            raise ValueError("train_prompts is empty: give at least one prompt containing the identifier.")
        if self.validation_prompts is None:
            self.validation_prompts = list(self.train_prompts)
        self.validation_prompts = [p.strip() for p in self.validation_prompts if p and p.strip()]
        check_prompts_have_identifier([self.instance_prompt], self.identifier, "instance prompt")
        check_prompts_have_identifier(self.train_prompts, self.identifier, "training prompt")
        check_prompts_have_identifier(self.validation_prompts, self.identifier, "validation prompt")
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 5e-6
        positive = {
            "images_per_prompt": self.images_per_prompt,
            "max_train_steps": self.max_train_steps,
            "train_batch_size": self.train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "rank": self.rank,
            "resolution": self.resolution,
            "num_inference_steps": self.num_inference_steps,
            "generation_batch_size": self.generation_batch_size,
            "validation_steps": self.validation_steps,
            "num_validation_images": self.num_validation_images,
        }
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        for name in ("learning_rate", "beta", "max_grad_norm"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}.")
        if self.pref_loss_weight < 0:
            raise ValueError(f"pref_loss_weight must be >= 0, got {self.pref_loss_weight}.")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}.")
        if self.patience is not None and not self.early_stopping:
            raise ValueError(
                "patience stops at the best step, which needs early_stopping=True; drop one of them."
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}.")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError("checkpointing_steps must be >= 1 or None.")

    @property
    def num_training_images(self) -> int:
        return len(self.train_prompts) * self.images_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
