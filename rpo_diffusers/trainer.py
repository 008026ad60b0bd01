"""The training loop, once for every method and every front end.

generate what the objective needs -> latents and embeddings, once -> optimise the objective's loss ->
validate with the λ-harmonic reward -> select the best step -> export, with checkpoints, resume and logging.

What differs between RPO, DreamBooth and DPG lives in ``rpo_diffusers.objectives`` (the data a method needs,
its extra trainable parts, one micro-batch's loss); the model is reached through
:class:`~rpo_diffusers.components.DiffusionComponents`, so a diffusers pipeline (script, Python API) and a
ComfyUI checkpoint (nodes) are two adapters to this one loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .components import DiffusionComponents
from .config import CLASS_IMAGES_DIR, RPOConfig, check_class_data_dir
from .data import (
    images_to_tensor,
    list_image_files,
    load_image,
    load_image_folder,
    to_pil_images,
)
from .export import (
    WRITE_ERRORS,
    ExportError,
    atomic_output_dir,
    atomic_save_file,
    describe_write_error,
    load_safetensors_only,
    write_model_card,
)
from .objectives import Objective, TrainingSet, make_objective
from .plots import before_after_grid, labeled_grid, reward_plot
from .publish import check_writable_dir, fsync_tree, remove_dir, replace_dir, result_transaction

logger = logging.getLogger(__name__)

TRAINING_IMAGES_DIR = "training_images"
HISTORY_FILE = "rpo_history.json"
PLOT_FILE = "reward_plot.png"
STATE_FILE = "rpo_trainer_state.json"
TRAINABLE_FILE = "trainable_weights.safetensors"
BEST_FILE = "best_weights.safetensors"
CLASS_MANIFEST = "class_images.json"
# settings a resumed run may change (how long, how often it saves, where it logs, how it batches: the same math)
RESUME_FREE_SETTINGS = {
    "resume_from_checkpoint", "resume_any_config", "output_dir", "max_train_steps", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "logging_dir", "generation_batch_size", "validation_batch_size",
    "patience", "batch_reference_forward",
}  # fmt: skip
# what earlier versions wrote into output_dir as real entries (adopted as the current result on the first export)
RESULT_NAMES = (
    "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor",
    "safety_checker", "rpo_unet.safetensors", "pytorch_lora_weights.safetensors", "rpo_lora_kohya.safetensors",
    "README.md", HISTORY_FILE, PLOT_FILE, "before_after.png",
)  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the earlier ones are intact."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the best model so far has been exported."""


@dataclass
class TrainingResult:
    """What ``PersonalizationTrainer.train()`` returns."""

    best_step: int
    best_reward: float
    history: list[dict[str, Any]]
    output_dir: str
    files: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False
    global_step: int = 0
    timings: dict[str, float] = field(default_factory=dict)


_SHORT = {"loss_sim": "sim", "loss_pref": "pref", "implicit_acc": "acc", "loss_prior": "prior"}


def _bar_pacing() -> dict[str, float]:
    """Progress bars redraw ten times a second on a terminal; into a log file that is thousands of
    lines, so without a terminal they report every 10 seconds."""
    return {} if sys.stderr.isatty() else {"mininterval": 10.0}


class PersonalizationTrainer:
    """Personalize a text-to-image model on one subject with the method ``config.method`` selects.

    ``RPOTrainer`` is the same class: RPO is the default method; ``method="dreambooth"`` and ``method="dpg"``
    train on the same loop.

    Args:
        config: the run's settings.
        model: a :class:`DiffusionComponents`, a diffusers ``StableDiffusionPipeline``, or ``None`` to load
            ``config.pretrained_model_name_or_path``.
        scorer: anything with ``set_reference_images(images)`` and ``score(images, prompts, lambda_=...)``
            returning ``.reward`` (a :class:`~rpo_diffusers.rewards.LambdaHarmonicScorer`), or ``None`` to load
            ``config.scorer_model_name_or_path``.
        reference_images: the subject's photos (PIL/numpy/torch) or ``None`` to read ``config.instance_data_dir``.
        accelerator: an ``accelerate.Accelerator`` to use; by default one is built from the config.
        callbacks: called as ``callback(event, payload)`` for ``"step"`` and ``"validation"`` events (the latter
            with the history entry, the best step so far and ``per_image`` ALIGN-I / ALIGN-T lists); a callback
            may raise to stop training (ComfyUI's interrupt does), the best model so far is still exported.
        objective: the method's :class:`~rpo_diffusers.objectives.Objective`, for one built by hand (e.g.
            ``DPGObjective(config, reward_fn=my_reward)``); by default ``config.method``'s.
    """

    def __init__(
        self,
        config: RPOConfig,
        model: DiffusionComponents | Any | None = None,
        scorer: Any | None = None,
        reference_images: Sequence[Any] | None = None,
        accelerator: Any | None = None,
        callbacks: Sequence[Callable[[str, dict[str, Any]], None]] = (),
        objective: Objective | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.callbacks = list(callbacks)
        if objective is not None and objective.name != config.method:
            raise ValueError(
                f"objective {type(objective).__name__} is method {objective.name!r} but config.method is "
                f"{config.method!r}: set config.method={objective.name!r}."
            )
        # before any model loads: where results go, then each objective's own inputs (e.g. DPG's reward model)
        check_writable_dir(self.output_dir)
        self.objective: Objective = objective or make_objective(config)
        if reference_images is None:
            if not config.instance_data_dir:
                raise ValueError(
                    "No reference images: pass reference_images= or set config.instance_data_dir."
                )
            reference_images = load_image_folder(config.instance_data_dir)
        self.reference_images = to_pil_images(list(reference_images))
        if not self.reference_images:
            raise ValueError("reference_images is empty: personalization needs 3-6 photos of the subject.")
        if config.resolution is None:  # the family's native size, read from its configs: 512 (SD), 1024 (SDXL)
            config.resolution = self._native_resolution(model)
        self._warn_about_photos()
        # another run's checkpoint is refused before anything loads or is written (training images included)
        self._resume_path = self._checkpoint_to_resume()
        self.accelerator = accelerator or self._build_accelerator()
        self.components = self._resolve_model(model)
        if config.train_text_encoder and not self.components.supports_text_encoder_training:
            raise ValueError(
                f"train_text_encoder needs a diffusers pipeline (train_rpo.py or the Python API); "
                f"{type(self.components).__name__} cannot train its text encoder yet."
            )
        self.scorer = scorer if scorer is not None else self._load_scorer()
        scorer_identifier = getattr(self.scorer, "identifier", config.identifier)
        if scorer_identifier != config.identifier:
            raise ValueError(
                f"The scorer strips the identifier {scorer_identifier!r} but this run's is {config.identifier!r}: "
                "ALIGN-T would be computed on prompts that still hold it. Use the same identifier for both "
                f"(scorer.identifier = {config.identifier!r})."
            )
        self.history: list[dict[str, Any]] = []
        self.best_step, self.best_reward = -1, -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.validations_without_improvement = 0
        self.global_step = 0
        self.timings: dict[str, float] = {
            "generation": 0.0,
            "class_images": 0.0,
            "training": 0.0,
            "validation": 0.0,
            "export": 0.0,
        }
        # the first validation image per prompt (and its prompt's reward) at step 0 and at the best step,
        # for the before/after picture; a resumed run no longer has step 0's in memory
        self._base_cells: tuple[list[Image.Image], list[float]] | None = None
        self._best_cells: tuple[list[Image.Image], list[float]] | None = None

    # ---------------------------------------------------------------------------------------------
    # set-up
    # ---------------------------------------------------------------------------------------------
    def _warn_about_photos(self) -> None:
        """Say what to expect from too few or too small photos (training still runs)."""
        n, side = len(self.reference_images), self.config.resolution
        if n < 3:
            warnings.warn(
                f"Only {n} reference photo(s): personalization methods are made for 3-6, and with fewer the model "
                "tends to copy the photo (pose, background) instead of learning the subject.",
                stacklevel=3,
            )
        small = [i for i, im in enumerate(self.reference_images) if min(im.size) < side]
        if small:
            sizes = ", ".join(f"{self.reference_images[i].size[0]}x{self.reference_images[i].size[1]}" for i in small[:3])
            warnings.warn(
                f"{len(small)} reference photo(s) are smaller than the training resolution {side} px ({sizes}); "
                "they are upscaled, so the model learns their blur. Use photos of at least that size.",
                stacklevel=3,
            )
    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        log_with = None if cfg.report_to in ("none", "", None) else cfg.report_to
        if log_with == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                log_with = None
        project = ProjectConfiguration(
            project_dir=str(self.output_dir), logging_dir=str(self.output_dir / cfg.logging_dir)
        )
        # On a machine with no GPU, accelerate only sets up a multi-process (gloo) group when told cpu=True.
        no_gpu = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
        if cfg.mixed_precision == "fp16" and no_gpu and not torch.backends.mps.is_available():
            raise ValueError(
                "mixed_precision='fp16' needs a GPU; on this CPU-only machine the run would silently train in fp32. "
                "Use mixed_precision 'no' or 'bf16' here (--mixed_precision no)."
            )
        return Accelerator(
            cpu=no_gpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=project,
        )

    def _weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )

    def _native_resolution(self, model) -> int:
        """The model family's training size, before any weight loads (so resume checks see the real value)."""
        from .families import native_resolution

        if isinstance(model, DiffusionComponents):
            return getattr(model, "resolution", model.default_resolution)
        if model is None and not self.config.pretrained_model_name_or_path:
            raise ValueError("No model: pass model= or set config.pretrained_model_name_or_path.")
        return native_resolution(model if model is not None else self.config.pretrained_model_name_or_path)

    def _resolve_model(self, model) -> DiffusionComponents:
        """The model family's adapter (:mod:`rpo_diffusers.families`: SD 1.x / 2.x or SDXL, from the pipeline's
        class; anything else is refused before weights load)."""
        from .families import components_for_pipeline, load_components

        cfg = self.config
        if isinstance(model, DiffusionComponents):
            return model
        weight_dtype = self._weight_dtype() if cfg.use_lora else torch.float32
        if model is None:
            if not cfg.pretrained_model_name_or_path:
                raise ValueError("No model: pass model= or set config.pretrained_model_name_or_path.")
            return load_components(
                cfg.pretrained_model_name_or_path,
                sampling_scheduler=cfg.sampling_scheduler,
                weight_dtype=weight_dtype,
                resolution=cfg.resolution,
                vae_name_or_path=cfg.pretrained_vae_model_name_or_path,
            )
        if hasattr(model, "unet") and hasattr(model, "vae"):
            return components_for_pipeline(model, cfg.sampling_scheduler, weight_dtype, cfg.resolution)
        raise TypeError(
            f"Unsupported model type {type(model).__name__}: pass a StableDiffusionPipeline, a "
            "StableDiffusionXLPipeline or DiffusionComponents."
        )

    def _load_scorer(self):
        from .rewards import LambdaHarmonicScorer

        return LambdaHarmonicScorer.from_pretrained(
            self.config.scorer_model_name_or_path,
            lambda_=self.config.lambda_val,
            device=self.accelerator.device,
            identifier=self.config.identifier,
        )

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, payload)

    # ---------------------------------------------------------------------------------------------
    # phase 1: the base model's training images (on disk, reused on rerun)
    # ---------------------------------------------------------------------------------------------
    def _generation_spec(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "prompts": list(cfg.train_prompts),
            "images_per_prompt": cfg.images_per_prompt,
            "seed": cfg.seed,
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "resolution": cfg.resolution,
            "sampling_scheduler": cfg.sampling_scheduler,
            "base_model": cfg.pretrained_model_name_or_path,
        }

    def generate_training_images(self) -> tuple[list[Image.Image], list[int]]:
        """Draw (or reload) ``images_per_prompt`` base-model images per training prompt."""
        cfg = self.config
        folder = self.output_dir / TRAINING_IMAGES_DIR
        manifest_path = folder / "manifest.json"
        spec = self._generation_spec()
        if self.is_main:
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
            if (
                manifest is None
                or manifest.get("spec") != spec
                or not all((folder / e["file"]).exists() for e in manifest["images"])
            ):
                jobs = [
                    (p_idx, prompt, cfg.seed * 10_000 + p_idx * cfg.images_per_prompt + k)
                    for p_idx, prompt in enumerate(cfg.train_prompts)
                    for k in range(cfg.images_per_prompt)
                ]
                images: list[Image.Image] = []
                for batch in self._generate_in_batches(
                    [j[1] for j in jobs], [j[2] for j in jobs], "generating training images", "generation"
                ):
                    images += batch
                with atomic_output_dir(folder) as tmp:
                    entries = []
                    for i, ((p_idx, prompt, seed), im) in enumerate(zip(jobs, images)):
                        name = f"{i:03d}_p{p_idx}_s{seed}.png"
                        im.save(tmp / name)
                        entries.append({"file": name, "prompt": prompt, "prompt_index": p_idx, "seed": seed})
                    (tmp / "manifest.json").write_text(
                        json.dumps({"spec": spec, "images": entries}, indent=2)
                    )
        self.accelerator.wait_for_everyone()
        manifest = json.loads(manifest_path.read_text())
        images = [load_image(folder / e["file"]) for e in manifest["images"]]
        return images, [int(e["prompt_index"]) for e in manifest["images"]]

    def _generate_in_batches(
        self,
        prompts: list[str],
        seeds: list[int],
        desc: str | None = None,
        event: str | None = None,
        validation: bool = False,
        settings: RPOConfig | None = None,
    ):
        """Sample ``generation_batch_size`` images at a time with the current weights, with a progress bar
        (``desc``) and a callback ``event`` when given; ``validation`` samples with the validation settings
        (steps, scheduler, batch size, resolution) of ``settings`` (default: this run's config).

        Yields each batch as soon as it is drawn, so a caller can save it before the next one starts.
        """
        from tqdm.auto import tqdm

        cfg = settings or self.config
        steps, scheduler, size, resolution = cfg.num_inference_steps, None, cfg.generation_batch_size, cfg.resolution
        if validation:
            steps = cfg.validation_num_inference_steps or steps
            scheduler = cfg.validation_sampling_scheduler
            size = cfg.validation_batch_size or size
            resolution = cfg.validation_resolution or resolution  # lower: cheaper validation (SDXL at 1024 px)
        bar = tqdm(total=len(prompts), desc=desc, disable=not self.is_main or desc is None, **_bar_pacing())
        try:
            done = 0
            for start in range(0, len(prompts), size):
                end = start + size
                with self.accelerator.autocast():  # fp16/bf16 runs: frozen parts are half, the UNet may not be
                    batch = self.components.generate(
                        prompts[start:end],
                        seeds[start:end],
                        steps,
                        cfg.guidance_scale,
                        resolution,
                        **({"scheduler": scheduler} if scheduler else {}),  # components written before it
                    )
                done += len(batch)
                bar.update(len(batch))
                if event is not None:
                    self._emit(event, {"done": done, "total": len(prompts)})
                yield batch
        finally:  # also when the caller stops early or an error is raised
            bar.close()

    # ---------------------------------------------------------------------------------------------
    # phase 1b: DreamBooth prior preservation's class images (on disk, reused like diffusers does)
    # ---------------------------------------------------------------------------------------------
    @property
    def class_data_dir(self) -> Path:
        return Path(self.config.class_data_dir or self.output_dir / CLASS_IMAGES_DIR)

    def generate_class_images(self) -> list[Image.Image]:
        """The first ``num_class_images`` images of ``class_data_dir``; the base model draws any that are missing.

        As in diffusers' ``train_dreambooth.py`` the folder is reused as it is: images already there (generated
        earlier or the user's own) count, only the shortfall is sampled, with ``class_prompt`` and fixed seeds.
        """
        cfg = self.config
        if not cfg.with_prior_preservation or not cfg.class_prompt:
            raise ValueError(
                "Class images belong to prior preservation: build the config with with_prior_preservation=True."
            )
        folder = check_class_data_dir(self.class_data_dir)
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            existing = list_image_files(folder)
            missing = cfg.num_class_images - len(existing)
            self._check_class_manifest(folder)
            if missing > 0:
                self._draw_class_images(folder, len(existing), missing)
        self.accelerator.wait_for_everyone()
        files = list_image_files(folder)[: cfg.num_class_images]
        if len(files) < cfg.num_class_images:
            raise RuntimeError(
                f"class_data_dir {str(folder)!r} holds {len(files)} images after generation, "
                f"{cfg.num_class_images} needed: check that the folder is writable."
            )
        return [self._load_class_image(f) for f in files]

    def _draw_class_images(self, folder: Path, first_index: int, count: int) -> None:
        """Sample ``count`` class images with the base model and save each batch as PNG files at once."""
        cfg = self.config
        indices = list(range(first_index, first_index + count))
        seeds = [cfg.seed * 1_000_003 + 50_000_000 + i for i in indices]
        manifest_path = folder / CLASS_MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"images": []}
        manifest["class_prompt"] = cfg.class_prompt
        logger.info("generating %d class images for prior preservation in %s", count, folder)
        t0 = time.perf_counter()
        done = 0
        for batch in self._generate_in_batches(
            [cfg.class_prompt] * count, seeds, "generating class images", "class_generation"
        ):
            for image in batch:
                index, seed = indices[done], seeds[done]
                name = self._free_class_image_name(folder, index, seed)
                tmp = folder / f".{name}.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, folder / name)  # a crash never leaves a half-written image behind
                manifest["images"].append({"file": name, "prompt": cfg.class_prompt, "seed": seed})
                done += 1
            manifest_path.write_text(json.dumps(manifest, indent=2))
        self.timings["class_images"] += time.perf_counter() - t0

    @staticmethod
    def _free_class_image_name(folder: Path, index: int, seed: int) -> str:
        name = f"class_{index:05d}_s{seed}.png"
        while (folder / name).exists():  # a user's own file may already use the name
            index += 1
            name = f"class_{index:05d}_s{seed}.png"
        return name

    def _check_class_manifest(self, folder: Path) -> None:
        """Warn when the folder's earlier images were drawn with another class prompt (they are still used)."""
        path = folder / CLASS_MANIFEST
        if not path.exists():
            return
        earlier = json.loads(path.read_text()).get("class_prompt")
        if earlier and earlier != self.config.class_prompt:
            logger.warning(
                "class_data_dir %s holds images drawn for %r, not the class_prompt %r; they are reused as "
                "diffusers does. Point class_data_dir at a new folder to draw fresh ones.",
                folder,
                earlier,
                self.config.class_prompt,
            )

    def _load_class_image(self, path: Path) -> Image.Image:
        try:
            return load_image(path)
        except ValueError as err:
            raise ValueError(
                f"{err} It is in class_data_dir: delete it and the next run draws a new class image in its place."
            ) from err

    # ---------------------------------------------------------------------------------------------
    # phase 2: latents and embeddings, computed once
    # ---------------------------------------------------------------------------------------------
    def prepare_training_set(
        self,
        generated: list[Image.Image] | None = None,
        prompt_indices: list[int] | None = None,
        class_images: list[Image.Image] | None = None,
    ) -> TrainingSet:
        """Latents and prompt embeddings of the references, the generated images and the class images.

        The scorer embeds the references here once (validation needs them, and RPO's labels).
        """
        cfg = self.config
        self.scorer.set_reference_images(self.reference_images)
        dev, comp, res = self.accelerator.device, self.components, cfg.resolution
        instance = self._conditioning([cfg.instance_prompt])
        data = TrainingSet(
            reference_latents=comp.encode_images(images_to_tensor(self.reference_images, res).to(dev)).float(),
            instance_embedding=instance,
            # one row per photo: SDXL is also told each photo's original size and crop
            reference_conditioning=comp.condition_on_sizes(instance, [im.size for im in self.reference_images], res),
        )  # fmt: skip
        if generated:
            data.generated_images = list(generated)
            data.generated_prompt_indices = list(prompt_indices)
            data.generated_latents = comp.encode_images(images_to_tensor(generated, res).to(dev)).float()
            # drawn at the training resolution: original size = target size, no crop
            sizes = [(res, res)] * len(cfg.train_prompts)
            data.prompt_embeddings = comp.condition_on_sizes(comp.encode_prompts(cfg.train_prompts), sizes, res)
        if class_images:
            data.class_latents = self._encode_in_batches(class_images)
            data.class_embedding = self._conditioning([cfg.class_prompt])
            sizes = [im.size for im in class_images]
            data.class_conditioning = comp.condition_on_sizes(data.class_embedding, sizes, res)
        return data

    def _conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Cached embeddings, or token ids when the text encoder trains (the denoiser then embeds them)."""
        if self.config.train_text_encoder:
            return self.components.tokenize(prompts)
        return self.components.encode_prompts(prompts)

    def _encode_in_batches(self, images: list[Image.Image]) -> torch.Tensor:
        """VAE latents of many images, ``generation_batch_size`` at a time (100 class images at 512 px at once
        would need far more memory than the training step)."""
        cfg, dev = self.config, self.accelerator.device
        step = cfg.generation_batch_size
        return torch.cat(
            [
                self.components.encode_images(
                    images_to_tensor(images[i : i + step], cfg.resolution).to(dev)
                ).float()
                for i in range(0, len(images), step)
            ]
        )

    def record_training_rewards(self, gen_rewards: torch.Tensor, ref_rewards: torch.Tensor) -> None:
        """Write the training images' rewards into their manifest, beside the images (main process)."""
        if not self.is_main:
            return
        path = self.output_dir / TRAINING_IMAGES_DIR / "manifest.json"
        manifest = json.loads(path.read_text())
        for entry, r in zip(manifest["images"], gen_rewards.tolist()):
            entry["reward"] = r
        manifest["lambda_train"] = self.config.lambda_train
        manifest["reference_rewards"] = ref_rewards.tolist()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)

    # ---------------------------------------------------------------------------------------------
    # phase 3: which samples one micro-batch sees
    # ---------------------------------------------------------------------------------------------
    def sample_positions(self, step: int, micro: int) -> list[int]:
        """Positions in the run's sample stream of one micro-batch on this process.

        A pure function of (step, micro, rank): a resumed run and every rank agree without communication.
        """
        cfg, acc = self.config, self.accelerator
        first = (
            (step * cfg.gradient_accumulation_steps + micro) * acc.num_processes + acc.process_index
        ) * cfg.train_batch_size
        return list(range(first, first + cfg.train_batch_size))

    def _step_generator(self, step: int, micro: int) -> torch.Generator:
        acc = self.accelerator
        key = ((self.config.seed * 1_000_003 + step) * 1009 + micro) * 64 + acc.process_index
        return torch.Generator().manual_seed(key % (2**63))
    # ---------------------------------------------------------------------------------------------
    # phase 4: validation and selection
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_scores(self, settings: RPOConfig | None = None) -> tuple[list[Image.Image], Any]:
        """The current weights' validation images (``num_validation_images`` per validation prompt, fixed seeds)
        and their :class:`ScoreResult` at λ_val, under ``settings``' validation (default: this run's). Another
        selection rule on the same training (another sampler, say) sees exactly what its own run would."""
        cfg = settings or self.config
        prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
        seeds = [cfg.seed + 7919 * (1 + i) for i in range(len(prompts))]
        batches = self._generate_in_batches(prompts, seeds, validation=True, settings=settings)
        images = [im for batch in batches for im in batch]
        return images, self.scorer.score(images, prompts, lambda_=cfg.lambda_val)

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, Any]:
        """Mean λ_val reward of ``num_validation_images`` images per validation prompt (fixed seeds)."""
        from accelerate.utils import broadcast_object_list

        cfg = self.config
        entry: list[Any] = [None]
        if self.is_main:
            t0 = time.perf_counter()
            images, scores = self.validation_scores()
            per_prompt = {
                p: float(
                    scores.reward[i * cfg.num_validation_images : (i + 1) * cfg.num_validation_images].mean()
                )
                for i, p in enumerate(cfg.validation_prompts)
            }
            entry[0] = {
                "step": step,
                "reward": float(scores.reward.mean()),
                "align_i": float(scores.image_alignment.mean()),
                "align_t": float(scores.text_alignment.mean()),
                "per_prompt": per_prompt,
                # for callbacks, not the history: another λ_val's reward of the same images
                "per_image": {
                    "image_alignment": scores.image_alignment.tolist(),
                    "text_alignment": scores.text_alignment.tolist(),
                },
            }
            k = cfg.num_validation_images
            rows = [images[i * k : (i + 1) * k] for i in range(len(cfg.validation_prompts))]
            rewards = scores.reward.tolist()
            grid = labeled_grid(
                rows,
                row_labels=cfg.validation_prompts,
                captions=[[f"reward {r:.3f}" for r in rewards[i * k : (i + 1) * k]] for i in range(len(rows))],
                title=f"step {step}: validation reward {entry[0]['reward']:.3f} (λ_val {cfg.lambda_val})",
                cell_size=128,
            )
            cells = ([row[0] for row in rows], list(per_prompt.values()))
            if step == 0:
                self._base_cells = cells
            if entry[0]["reward"] > self.best_reward or not cfg.early_stopping:
                self._best_cells = cells
            val_dir = self.output_dir / "validation"
            val_dir.mkdir(parents=True, exist_ok=True)
            grid.save(val_dir / f"step_{step:05d}.png")
            self._log_images(grid, step)
            self.timings["validation"] += time.perf_counter() - t0
        if self.accelerator.num_processes > 1:
            broadcast_object_list(entry, from_process=0)
        return entry[0]

    def _log_images(self, grid: Image.Image, step: int) -> None:
        import numpy as np

        for tracker in getattr(self.accelerator, "trackers", []):
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid)]}, step=step)

    def _record_validation(self, entry: dict[str, Any]) -> bool:
        """Add a validation to the history; returns True when patience says stop."""
        per_image = entry.pop("per_image", None)
        self.history.append(entry)
        improved = entry["reward"] > self.best_reward
        if improved:
            self.validations_without_improvement = 0
        else:
            self.validations_without_improvement += 1
        if improved or not self.config.early_stopping:  # without early stopping the latest step is exported
            self.best_step, self.best_reward = entry["step"], entry["reward"]
            self.best_state = self.components.trainable_state_dict()
        self.accelerator.log(
            {"val/reward": entry["reward"], "val/align_i": entry["align_i"], "val/align_t": entry["align_t"]},
            step=entry["step"],
        )
        if self.is_main:
            logger.info(
                "step %d: validation reward %.4f%s",
                entry["step"],
                entry["reward"],
                " (best)" if improved else "",
            )
        extra = {"per_image": per_image} if per_image is not None else {}
        self._emit("validation", {**entry, "best_step": self.best_step, "best_reward": self.best_reward, **extra})
        patience = self.config.patience
        return patience is not None and self.validations_without_improvement >= patience

    # ---------------------------------------------------------------------------------------------
    # checkpoints (resumable state)
    # ---------------------------------------------------------------------------------------------
    def _register_checkpoint_hooks(self, prepared_denoiser) -> None:
        """The denoiser's trained weights go to one safetensors file (LoRA: the adapters only); accelerate
        saves the other prepared modules (an objective's critic) itself, in the order they were prepared."""
        acc = self.accelerator
        components = self.components

        denoiser = acc.unwrap_model(prepared_denoiser)

        def denoiser_index(models) -> int:
            return next(i for i, m in enumerate(models) if acc.unwrap_model(m) is denoiser)

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                atomic_save_file(components.trainable_state_dict(), Path(output_dir) / TRAINABLE_FILE)
            if weights:
                weights.pop(denoiser_index(models))

        def load_hook(models, input_dir):
            models.pop(denoiser_index(models))
            components.load_trainable_state_dict(load_safetensors_only(Path(input_dir) / TRAINABLE_FILE))

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _checkpoint_dirs(self) -> list[Path]:
        """The complete checkpoints, oldest first (the state file is written last, so it marks one)."""
        dirs = [
            d
            for d in self.output_dir.glob("checkpoint-*")
            if d.is_dir() and d.name.split("-")[-1].isdigit() and (d / STATE_FILE).is_file()
        ]
        return sorted(dirs, key=lambda d: int(d.name.split("-")[-1]))

    def _run_settings(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (JSON-normalised)."""
        settings = {k: v for k, v in self.config.to_dict().items() if k not in RESUME_FREE_SETTINGS}
        return json.loads(json.dumps(settings))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-N`` complete under a temp name, move it in with one rename, then drop old ones.

        So there is always at least one complete checkpoint once one was written (a kill at any instant
        included); a failed write removes its temp folder and says so, the earlier checkpoints untouched.
        """
        cfg, acc = self.config, self.accelerator
        final = self.output_dir / f"checkpoint-{self.global_step}"
        tmp = self.output_dir / f".checkpoint-{self.global_step}.tmp"
        if acc.is_main_process:  # what a killed run left: temp folders, half-removed old checkpoints
            for stale in [*self.output_dir.glob(".checkpoint-*.tmp"), *self.output_dir.glob(".checkpoint-*.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()  # every rank has written its RNG state before the folder is renamed
            if acc.is_main_process:
                if self.best_state is not None:
                    atomic_save_file(self.best_state, tmp / BEST_FILE)
                state = {
                    "global_step": self.global_step,
                    "history": self.history,
                    "best_step": self.best_step,
                    "best_reward": self.best_reward,
                    "validations_without_improvement": self.validations_without_improvement,
                    "settings": self._run_settings(),
                }
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: it marks the folder complete
                fsync_tree(tmp)
                replace_dir(tmp, final)  # a rerun of the same step: the new one replaces it in one step
        except (*WRITE_ERRORS, ExportError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = err.__cause__ if isinstance(err, ExportError) and err.__cause__ else err
            raise CheckpointError(
                f"Writing {final.name} in {str(self.output_dir)!r} failed ({describe_write_error(cause)}); "
                "earlier checkpoints are intact."
            ) from err
        if acc.is_main_process and cfg.checkpoints_total_limit is not None:
            existing = [d for d in self._checkpoint_dirs() if d != final]
            for old in existing[: max(0, len(existing) + 1 - cfg.checkpoints_total_limit)]:
                remove_dir(old)
        acc.wait_for_everyone()
        return final

    def _check_resumable(self, path: Path) -> None:
        """Refuse a checkpoint written by a run with other settings (another seed, method, data...)."""
        state = json.loads((path / STATE_FILE).read_text())
        earlier, now = state.get("settings"), self._run_settings()
        if earlier is None or earlier == now or self.config.resume_any_config:
            return
        changed = [k for k in sorted(set(earlier) | set(now)) if earlier.get(k) != now.get(k)]
        shown = ", ".join(f"{k}: {earlier.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise ValueError(
            f"{str(path)!r} was written by a run with other settings ({shown}{', ...' if len(changed) > 4 else ''}). "
            "Resume with the same settings, use another output_dir for a new run, or pass resume_any_config=True "
            "(--resume_any_config) to resume it anyway."
        )

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``resume_from_checkpoint`` names, checked before anything is loaded or written."""
        cfg = self.config
        if not cfg.resume_from_checkpoint:
            return None
        if cfg.resume_from_checkpoint == "latest":
            dirs = self._checkpoint_dirs()
            if not dirs:
                logger.warning(
                    "resume_from_checkpoint='latest' but no checkpoint in %s: starting fresh.",
                    self.output_dir,
                )
                return None
            path = dirs[-1]
        else:
            path = Path(cfg.resume_from_checkpoint)
            if not (path / STATE_FILE).exists():
                raise FileNotFoundError(f"{str(path)!r} is not an RPO checkpoint (no {STATE_FILE}).")
        self._check_resumable(path)
        return path

    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_step, self.best_reward = int(state["best_step"]), float(state["best_reward"])
        self.validations_without_improvement = int(state["validations_without_improvement"])
        if (path / BEST_FILE).exists():
            self.best_state = load_safetensors_only(path / BEST_FILE)
        logger.info("resumed from %s at step %d", path, self.global_step)

    # ---------------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------------
    def train(self) -> TrainingResult:
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        cfg, acc, comp = self.config, self.accelerator, self.components
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        comp.to(acc.device)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)

        objective = self.objective
        generated, prompt_indices = None, None
        if objective.needs_generated_images:
            t0 = time.perf_counter()
            generated, prompt_indices = self.generate_training_images()
            self.timings["generation"] = time.perf_counter() - t0
        class_images = self.generate_class_images() if cfg.with_prior_preservation else None
        objective.setup(self, self.prepare_training_set(generated, prompt_indices, class_images))

        if cfg.use_lora:
            comp.add_lora(cfg.rank, cfg.lora_alpha, cfg.lora_target_modules)
        if cfg.train_text_encoder:
            comp.train_text_encoder(cfg.use_lora, cfg.rank, cfg.lora_alpha, cfg.text_encoder_lora_target_modules)
        comp.freeze_reference()  # before resuming: the reference is the base model, never a checkpoint
        if cfg.gradient_checkpointing:
            comp.enable_gradient_checkpointing()
        params = comp.trainable_parameters()
        if not params:
            raise RuntimeError("The model has no trainable parameters.")
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.adam_weight_decay,
        )
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
            num_training_steps=cfg.max_train_steps * acc.num_processes,
        )
        model, optimizer, lr_scheduler = acc.prepare(comp.denoiser, optimizer, lr_scheduler)
        auxiliary = objective.auxiliary_parts()
        for part in auxiliary:  # prepared after the denoiser: checkpoints keep them in this order
            part.module, part.optimizer = acc.prepare(part.module, part.optimizer)
        optimizers = [optimizer, *(part.optimizer for part in auxiliary)]
        self._register_checkpoint_hooks(model)
        self._resume(self._resume_path)
        if acc.is_main_process and cfg.report_to not in ("none", "", None) and acc.log_with:
            acc.init_trackers(
                "rpo",
                config={
                    k: (str(v) if isinstance(v, (list, dict)) or v is None else v)
                    for k, v in cfg.to_dict().items()
                },
            )

        stopped_early, error, bar = False, None, None
        try:
            if not self.history:
                stopped_early = self._record_validation(self.validate(0))
            bar = tqdm(
                total=cfg.max_train_steps,
                initial=self.global_step,
                desc=objective.name.upper() if objective.name != "dreambooth" else "DreamBooth",
                disable=not acc.is_main_process,
                **_bar_pacing(),
            )
            t_train = time.perf_counter()
            while self.global_step < cfg.max_train_steps and not stopped_early:
                model.train()
                logs: dict[str, float] = {}
                for micro in range(cfg.gradient_accumulation_steps):
                    with acc.accumulate(model, *(part.module for part in auxiliary)):
                        with acc.autocast():  # fp16/bf16: the frozen parts are half, the trained ones may not be
                            loss, parts = objective.loss(
                                model,
                                self.sample_positions(self.global_step, micro),
                                self._step_generator(self.global_step, micro),
                            )
                        bad = acc.gather(
                            torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device)
                        ).sum()
                        if bad > 0:
                            raise NonFiniteLossError(
                                f"The loss became {loss.item()} at step {self.global_step}. Lower the learning rate "
                                "(or use fp32 / bf16 instead of fp16); the best model so far was exported."
                            )
                        acc.backward(loss)
                        if acc.sync_gradients:  # every trained part is clipped on its own
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)  # unscales every optimiser (fp16)
                            for part in auxiliary:
                                torch.nn.utils.clip_grad_norm_(part.module.parameters(), cfg.max_grad_norm)
                        for opt in optimizers:
                            opt.step()
                        lr_scheduler.step()
                        for opt in optimizers:
                            opt.zero_grad(set_to_none=True)
                    for k, v in parts.items():
                        logs[k] = logs.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
                self.global_step += 1
                bar.update(1)
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                acc.log({f"train/{k}": v for k, v in logs.items()}, step=self.global_step)
                self._emit("step", {"step": self.global_step, "total": cfg.max_train_steps, **logs})
                if self.global_step % cfg.validation_steps == 0 or self.global_step == cfg.max_train_steps:
                    self.timings["training"] += time.perf_counter() - t_train
                    stopped_early = self._record_validation(self.validate(self.global_step))
                    t_train = time.perf_counter()
                postfix = {_SHORT.get(k, k): logs[k] for k in (*objective.progress_keys, "loss_prior") if k in logs}
                if self.history:
                    postfix["val"] = self.history[-1]["reward"]
                bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()}, refresh=False)
                if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
            self.timings["training"] += time.perf_counter() - t_train
            bar.close()
        except BaseException as err:  # NaN, interrupt, callback stop: export the best so far, then re-raise
            error = err
        finally:
            if bar is not None:  # closed on every exit, or it prints at interpreter exit
                bar.close()
            acc.wait_for_everyone() if error is None else None
            files = self._finish(stopped_early)
            acc.end_training()
        if error is not None:
            raise error
        return TrainingResult(
            best_step=self.best_step,
            best_reward=self.best_reward,
            history=self.history,
            output_dir=str(self.output_dir),
            files=files,
            stopped_early=stopped_early,
            global_step=self.global_step,
            timings=dict(self.timings),
        )

    # ---------------------------------------------------------------------------------------------
    # phase 5: export the best
    # ---------------------------------------------------------------------------------------------
    def _prior_preservation_summary(self) -> dict[str, Any] | None:
        """What the history file records about DreamBooth prior preservation (None: it was off)."""
        cfg = self.config
        if not cfg.with_prior_preservation:
            return None
        return {
            "class_prompt": cfg.class_prompt,
            "class_data_dir": str(self.class_data_dir),
            "num_class_images": cfg.num_class_images,
            "prior_loss_weight": cfg.prior_loss_weight,
        }

    def _finish(self, stopped_early: bool) -> dict[str, str]:
        """Export the best weights with the history, the plot and a model card, published as one result.

        Everything is written into a staging folder first and appears in ``output_dir`` at once
        (:mod:`rpo_diffusers.publish`): a crash at any point leaves the previous result or this one.
        """
        if self.best_state is None or not self.is_main:
            return {}
        t0 = time.perf_counter()
        current = self.components.trainable_state_dict()
        self.components.load_trainable_state_dict(self.best_state)
        try:
            with result_transaction(self.output_dir, legacy_names=RESULT_NAMES) as stage:
                files = self.components.export(stage, {"best_step": self.best_step, "best_reward": self.best_reward})
                self._write_result_files(stage, stopped_early)
        finally:
            self.components.load_trainable_state_dict(current)
        self.timings["export"] = time.perf_counter() - t0
        files = {  # the names users load, not the staging folder's
            k: str(self.output_dir / Path(v).relative_to(stage)) if Path(v).is_relative_to(stage) else v
            for k, v in files.items()
        }
        files.update({"history": str(self.output_dir / HISTORY_FILE), "plot": str(self.output_dir / PLOT_FILE)})
        return files

    def _write_result_files(self, folder: Path, stopped_early: bool) -> None:
        """The history, reward plot, before/after grid and model card that describe the exported weights."""
        cfg = self.config
        summary = {
            "best_step": self.best_step,
            "best_reward": self.best_reward,
            "global_step": self.global_step,
            "stopped_early": stopped_early,
            **self.objective.summary(),
            "lambda_val": cfg.lambda_val,
            "early_stopping": cfg.early_stopping,
            "prior_preservation": self._prior_preservation_summary(),
            "history": self.history,
            "timings": self.timings,
        }
        (folder / HISTORY_FILE).write_text(json.dumps(summary, indent=2))
        reward_plot(
            [h["step"] for h in self.history],
            [h["reward"] for h in self.history],
            self.best_step,
            title=f"validation reward (λ-harmonic, λ_val {cfg.lambda_val})",
            method_label={"rpo": "RPO", "dreambooth": "DreamBooth", "dpg": "DPG"}.get(cfg.method, cfg.method),
        ).save(folder / PLOT_FILE)
        samples = []
        base, best = self._base_cells, self._best_cells
        if base is not None and best is not None:
            before_after_grid(
                base[0], best[0], cfg.validation_prompts, "step 0 (base)", f"step {self.best_step} (chosen)",
                base[1], best[1], title=f"{cfg.method.upper()}: validation prompts before and after",
            ).save(folder / "before_after.png")  # fmt: skip
            samples.append("before_after.png")
        write_model_card(
            folder,
            base_model=str(cfg.pretrained_model_name_or_path or "unknown"),
            instance_prompt=cfg.instance_prompt,
            lora=cfg.use_lora,
            config={k: v for k, v in cfg.to_dict().items() if k not in ("train_prompts", "validation_prompts")},
            history=self.history,
            sample_images=samples,
            best_step=self.best_step,
            best_reward=self.best_reward,
            method=cfg.method,
            reward=self.objective.summary().get("reward"),
            family=self.components.family,
            widget_prompts=[cfg.instance_prompt, *cfg.validation_prompts[:3]],
        )


RPOTrainer = PersonalizationTrainer
RPOTrainingResult = TrainingResult
