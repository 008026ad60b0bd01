"""Held-out evaluation of a personalized pipeline: generate with fixed seeds, then score with every judge.

Shared by ``rpo-diffusers demo`` and ``training_examples/benchmark_methods.py`` so that the demo's
before/after numbers and the benchmark's table are the same measurement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .data import ImageInput
from .export import LORA_DIFFUSERS_FILENAME


def load_result_pipeline(
    base_model: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    use_lora: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """The pipeline an RPO run ended with, loaded the way a user loads it: the full model from
    ``output_dir``, or the base model plus ``load_lora_weights(output_dir)``; ``output_dir=None`` is the
    base model itself."""
    from diffusers import StableDiffusionPipeline

    from .hub import load_pretrained, pipeline_dtype_kwargs

    full = output_dir is not None and not use_lora
    pipe = load_pretrained(
        StableDiffusionPipeline.from_pretrained,
        output_dir if full else base_model,
        kind="base model",
        safety_checker=None,
        **pipeline_dtype_kwargs(dtype),
    )
    if output_dir is not None and use_lora:
        # the file named: diffusers < 0.40 (the newest that installs beside transformers 4) refuses a local
        # folder without weight_name when HF_HUB_OFFLINE is set
        pipe.load_lora_weights(output_dir, weight_name=LORA_DIFFUSERS_FILENAME)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def generate_images(
    pipe,
    prompts: Sequence[str],
    per_prompt: int,
    *,
    seed: int = 0,
    resolution: int = 512,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
) -> dict[str, list[Image.Image]]:
    """``per_prompt`` images for each prompt; image i of prompt p always gets seed ``seed + 1000 p + i``,
    so two models are compared on the same noise."""
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, list[Image.Image]] = {}
    for p_idx, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(seed + 1000 * p_idx + i) for i in range(per_prompt)]
        out[prompt] = pipe(
            [prompt] * per_prompt,
            height=resolution,
            width=resolution,
            generator=gens,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        ).images
    return out


@dataclass
class Judges:
    """The models that score generated images, loaded once: DreamBench's DINO / CLIP evaluator, the
    λ-harmonic scorer and, on the toy world, the ground-truth attribute classifier."""

    evaluator: Any
    scorer: Any
    classifier: Any = None

    @classmethod
    def from_pretrained(
        cls,
        dino: str | os.PathLike,
        clip: str | os.PathLike,
        scorer: str | os.PathLike,
        classifier: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        identifier: str = "sks",
    ) -> Judges:
        from .metrics import DreamBenchEvaluator
        from .rewards import LambdaHarmonicScorer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        evaluator = DreamBenchEvaluator.from_pretrained(
            dino=dino, clip=clip, device=device, identifier=identifier
        )
        reward = LambdaHarmonicScorer.from_pretrained(scorer, device=device, identifier=identifier)
        judge = None
        if classifier is not None:
            from .toy.models import AttributeClassifier

            judge = AttributeClassifier.from_pretrained(classifier)
        return cls(evaluator, reward, judge)

    @classmethod
    def for_toy_world(cls, root: str | os.PathLike | None = None, **kwargs: Any) -> Judges:
        """The bundled toy world's judges (evaluation encoders, scorer, attribute classifier)."""
        from .toy.models import DEFAULT_EVALUATOR, DEFAULT_SCORER, EVALUATORS, asset_path

        dino, clip = EVALUATORS[DEFAULT_EVALUATOR]
        return cls.from_pretrained(
            dino=asset_path(dino, root),
            clip=asset_path(clip, root),
            scorer=asset_path(DEFAULT_SCORER, root),
            classifier=asset_path("classifier", root),
            **kwargs,
        )

    def score(
        self,
        references: Sequence[ImageInput],
        images_by_prompt: dict[str, list[Image.Image]],
        subject_name: str = "subject",
        toy_subject: Any = None,
        per_image: dict[str, list] | None = None,
    ) -> dict[str, float]:
        """DINO, CLIP-I, CLIP-T, the λ-harmonic reward at λ 0.5 and, for a toy subject, identity and
        context accuracy (the ground truth).

        ``per_image``, when given, is filled with the per-image values behind the means (``lambda_harmonic``
        and, for a toy subject, ``identity`` / ``context`` hits) in ``images_by_prompt`` order, so a picture
        can caption each image without scoring it twice.
        """
        dream = self.evaluator.evaluate_subject(images_by_prompt, references, subject_name)
        images = [im for ims in images_by_prompt.values() for im in ims]
        prompts = [p for p, ims in images_by_prompt.items() for _ in ims]
        reward = self.scorer.score(images, prompts, reference_images=references, lambda_=0.5).reward
        row = {
            "dino": dream.dino,
            "clip_i": dream.clip_i,
            "clip_t": dream.clip_t,
            "lambda_harmonic": float(reward.mean()),
        }
        details: dict[str, list] = {"lambda_harmonic": reward.tolist()}
        if toy_subject is not None and self.classifier is not None:
            from .toy.models import context_hits, identity_hits

            details["identity"] = identity_hits(images, toy_subject, prompts, self.classifier)
            details["context"] = context_hits(images, prompts, self.classifier)
            row["identity_acc"] = sum(details["identity"]) / len(images)
            row["context_acc"] = sum(details["context"]) / len(images)
        if per_image is not None:
            per_image.update(details)
        return row
