"""RPOConfig: every setting of a personalization run (RPO, DreamBooth or DPG), with the papers' defaults
(except the validation's sampler: FAST_VALIDATION by default, PAPER_VALIDATION is the paper's).

A plain dataclass so that ``transformers.HfArgumentParser(RPOConfig)`` can read it from the command line
or a JSON file, TRL-style. Validation happens in ``__post_init__`` so a bad value fails before any model
is loaded.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .prompts import (
    DEFAULT_IDENTIFIER,
    check_prompts_have_identifier,
    has_identifier,
    instance_prompt,
    strip_identifier,
    subject_type_for,
    training_prompts,
)
from .rewards import check_lambda

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' DreamBooth LoRA
CLASS_IMAGES_DIR = "class_images"
# The validation's sampling by default: 20 DPM-Solver++ steps, 40% of the paper's 50-step cost. Validation is most
# of a run's time; the benchmarks measure that this choice picks the paper's checkpoint (README, "Benchmarks").
FAST_VALIDATION: dict[str, Any] = {
    "validation_num_inference_steps": 20,
    "validation_sampling_scheduler": "DPMSolverMultistepScheduler",
}
# The paper's validation sampling, 50 DDIM steps: RPOConfig(**PAPER_VALIDATION), or on the command line
# --validation_num_inference_steps 50 --validation_sampling_scheduler DDIMScheduler.
PAPER_VALIDATION: dict[str, Any] = {
    "validation_num_inference_steps": 50,
    "validation_sampling_scheduler": "DDIMScheduler",
}


def check_class_data_dir(path: str | os.PathLike) -> Path:
    """The class-image folder may not exist yet (it is created), but it must not be a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"class_data_dir {str(folder)!r} is a file, not a folder: pass a folder for the class images "
            "(it is created if missing), or leave class_data_dir unset for <output_dir>/class_images."
        )
    return folder


@dataclass
class RPOConfig:
    """Settings for :class:`~rpo_diffusers.trainer.PersonalizationTrainer` (``RPOTrainer``).

    ``method`` picks the objective; defaults follow its paper (RPO: DESIGN.md section 2, DPG: section 2b).
    ``PersonalizationConfig`` is the same class under a method-neutral name.
    """

    method: Literal["rpo", "dreambooth", "dpg"] = field(
        default="rpo",
        metadata={
            "help": "Training method: 'rpo' (reward preference optimization, the default), 'dreambooth' "
            "(L_sim + optional prior preservation) or 'dpg' (DreamBooth + a look-forward reward learned by a critic)."
        },
    )
    # --- models and data -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stable Diffusion 1.x/2.x or SDXL base pipeline: hub id or local folder (the family is read "
            "from its model_index.json)."
        },
    )
    pretrained_vae_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A VAE to use instead of the pipeline's (hub id or folder holding the AutoencoderKL), e.g. the "
            "fp16-safe madebyollin/sdxl-vae-fp16-fix for SDXL in fp16, as diffusers' SDXL scripts take."
        },
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
    sim_loss_weight: float = field(
        default=1.0,
        metadata={"help": "w_sim of DPG's policy loss (DPG's released code comments L_sim out: 0)."},
    )
    # --- DPG (method='dpg') --------------------------------------------------------------------------
    dpg_reward: Literal["latent", "dino", "lambda_harmonic"] = field(
        default="latent",
        metadata={
            "help": "Reward on the look-forward x0_hat: 'latent' (reconstruction, DPG's released code), 'dino' "
            "(ViT feature similarity to the references, the paper's) or 'lambda_harmonic' (RPO's reward)."
        },
    )
    dpg_reward_model: str = field(
        default="facebook/dino-vits16",
        metadata={"help": "ViT for dpg_reward='dino': hub id or local folder."},
    )
    dpg_weight: float = field(default=1.0, metadata={"help": "λ_dpg, the weight of the reward term (paper: 0.1 or 1)."})
    dpg_gamma: float = field(default=0.9986, metadata={"help": "γ: the reward of a sample at timestep t is weighted γ^t."})
    dpg_critic: Literal["residual", "latent", "none"] = field(
        default="residual",
        metadata={
            "help": "Critic input: 'residual' ((x0_hat - x0)^2, DPG's), 'latent' (x0_hat), or 'none' to "
            "backpropagate through a differentiable reward (latent, dino) directly."
        },
    )
    dpg_critic_learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate of the critic."})
    # --- DreamBooth prior preservation (names as in diffusers' train_dreambooth.py) -----------------
    with_prior_preservation: bool = field(
        default=False,
        metadata={
            "help": "Add DreamBooth's prior-preservation loss: the denoising error on base-model images of the "
            "class under class_prompt, so the model keeps knowing what a generic <class_noun> looks like."
        },
    )
    class_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prompt of the class images (no identifier); default: the instance prompt without the "
            "identifier, 'a photo of <class_noun>'."
        },
    )
    class_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of class images; missing ones are generated by the base model and kept for reruns. "
            "Default: <output_dir>/class_images."
        },
    )
    num_class_images: int = field(
        default=100,
        metadata={"help": "Class images used for the prior loss; the base model draws any the folder lacks."},
    )
    prior_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the prior-preservation loss (>= 0)."}
    )
    # --- optimisation -------------------------------------------------------------------------------
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps; default 400 (RPO, DreamBooth), 1000 (DPG)."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Default 5e-6 for the full UNet (DPG: 1e-6), 1e-4 with LoRA."},
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
    batch_reference_forward: bool = field(
        default=True,
        metadata={
            "help": "RPO with LoRA: the frozen reference's forward joins the trained one's (the adapters act on "
            "the trained rows only), one UNet call per step instead of two: faster where a step is launch- or "
            "overhead-bound, the same math, activations of twice the rows. Off (or with gradient_checkpointing, "
            "or the full UNet, whose reference is a copy): two calls."
        },
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
    train_text_encoder: bool = field(
        default=False,
        metadata={
            "help": "Train the text encoder too (DreamBooth and DPG, as diffusers' DreamBooth scripts; DPG's paper "
            "does): fully, or with LoRA adapters on text_encoder_lora_target_modules when use_lora. RPO keeps it frozen."
        },
    )
    text_encoder_lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_LORA_TARGETS),
        metadata={"help": "Text-encoder modules that get LoRA adapters with train_text_encoder and use_lora."},
    )
    # --- sampling (training images and validation) -------------------------------------------------
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Training and sampling resolution (pixels); default: the model family's native size, 512 for "
            "SD 1.x/2.x and 1024 for SDXL."
        },
    )
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
    validation_resolution: int | None = field(
        default=None,
        metadata={
            "help": "Resolution of the validation images the reward scores; default: resolution. Lower it (e.g. 512 "
            "for SDXL trained at 1024) to make validation cheaper in time and memory."
        },
    )
    validation_num_inference_steps: int | None = field(
        default=FAST_VALIDATION["validation_num_inference_steps"],
        metadata={
            "help": "Sampling steps of the validation images only (None: num_inference_steps). Validation is most "
            "of a run's time; 20 DPM-Solver++ steps pick the checkpoint the paper's 50 DDIM steps pick (README, "
            "'Benchmarks'). The paper's: --validation_num_inference_steps 50 --validation_sampling_scheduler "
            "DDIMScheduler."
        },
    )
    validation_sampling_scheduler: str | None = field(
        default=FAST_VALIDATION["validation_sampling_scheduler"],
        metadata={
            "help": "diffusers scheduler class of the validation images only (None: sampling_scheduler, else the "
            "pipeline's own)."
        },
    )
    validation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Validation images sampled per pipeline call; default generation_batch_size. All of them at "
            "once (validation prompts x num_validation_images) is fastest where memory allows."
        },
    )
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
    resume_any_config: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint even if it was written with other settings (another seed, method, "
            "data...); by default such a checkpoint is refused with the settings that differ."
        },
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "'tensorboard', 'wandb', 'all' or 'none'."}
    )
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard folder, relative to output_dir."})

    def __post_init__(self) -> None:
        from .objectives import objective_class

        objective = objective_class(self.method)  # an unknown method fails first, naming the choices
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
            self.learning_rate = 1e-4 if self.use_lora else (1e-6 if self.method == "dpg" else 5e-6)
        if self.max_train_steps is None:
            self.max_train_steps = 1000 if self.method == "dpg" else 400
        weight = float(self.sim_loss_weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"sim_loss_weight must be a number >= 0, got {self.sim_loss_weight}.")
        objective.check_config(self)
        positive = {
            "images_per_prompt": self.images_per_prompt,
            "max_train_steps": self.max_train_steps,
            "train_batch_size": self.train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "rank": self.rank,
            **({"resolution": self.resolution} if self.resolution is not None else {}),
            "num_inference_steps": self.num_inference_steps,
            "generation_batch_size": self.generation_batch_size,
            "validation_steps": self.validation_steps,
            "num_validation_images": self.num_validation_images,
        }
        for name in ("sampling_scheduler", "validation_sampling_scheduler"):
            if getattr(self, name):  # a typo fails now, not after the training images are drawn
                from .components import scheduler_class

                scheduler_class(getattr(self, name))
        for name in ("validation_num_inference_steps", "validation_batch_size"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        for name in ("learning_rate", "beta", "max_grad_norm"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}.")
        if self.pref_loss_weight < 0:
            raise ValueError(f"pref_loss_weight must be >= 0, got {self.pref_loss_weight}.")
        self._check_prior_preservation()
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}.")
        if self.patience is not None and not self.early_stopping:
            raise ValueError(
                "patience stops at the best step, which needs early_stopping=True; drop one of them."
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}.")
        if self.validation_resolution is not None and (
            self.validation_resolution < 8 or self.validation_resolution % 8
        ):
            raise ValueError(
                f"validation_resolution must be a positive multiple of 8, got {self.validation_resolution}."
            )
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)
        if not math.isfinite(float(self.lora_alpha)) or float(self.lora_alpha) <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha} (default: the rank).")
        guidance = float(self.guidance_scale)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(
                f"guidance_scale must be a number >= 0, got {self.guidance_scale} (7.5 is Stable Diffusion's usual "
                "value; <= 1 turns classifier-free guidance off)."
            )
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError(f"checkpointing_steps must be >= 1 or None, got {self.checkpointing_steps}.")

    def _check_prior_preservation(self) -> None:
        """Validate the prior-preservation settings and fill in their defaults (only when it is on)."""
        if int(self.num_class_images) < 1:
            raise ValueError(
                f"num_class_images must be >= 1, got {self.num_class_images}: DreamBooth's default is 100."
            )
        weight = float(self.prior_loss_weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"prior_loss_weight must be a number >= 0, got {self.prior_loss_weight} (1.0 is DreamBooth's "
                "default; turn the loss off with with_prior_preservation=False)."
            )
        if not self.with_prior_preservation:
            if self.class_prompt is not None or self.class_data_dir is not None:
                warnings.warn(
                    "class_prompt / class_data_dir are ignored without with_prior_preservation=True.",
                    stacklevel=3,
                )
            return
        if self.class_prompt is None:
            self.class_prompt = strip_identifier(self.instance_prompt, self.identifier)
        self.class_prompt = self.class_prompt.strip()
        if not self.class_prompt:
            raise ValueError(
                "class_prompt is empty: give the class without the identifier, e.g. 'a photo of dog'."
            )
        if has_identifier(self.class_prompt, self.identifier):
            raise ValueError(
                f"class_prompt {self.class_prompt!r} contains the identifier {self.identifier!r}: the class "
                "images stand for the generic class, so drop the identifier (e.g. 'a photo of "
                f"{self.class_noun}')."
            )
        if self.class_data_dir is None:
            self.class_data_dir = str(Path(self.output_dir) / CLASS_IMAGES_DIR)
        check_class_data_dir(self.class_data_dir)

    @property
    def num_training_images(self) -> int:
        return len(self.train_prompts) * self.images_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PersonalizationConfig = RPOConfig
