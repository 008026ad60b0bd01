"""DreamBench metrics as reported by DreamBooth and RPO: DINO, CLIP-I and CLIP-T.

- DINO: cosine between ViT CLS features (``facebook/dino-vits16``) of generated and reference images.
- CLIP-I: cosine between CLIP image features (``openai/clip-vit-base-patch16``) of the same pairs.
- CLIP-T: max(cos(CLIP image, CLIP text of the prompt without the identifier), 0).

DINO and CLIP-I average over every (reference, generated) pair; each is computed per prompt, then averaged
per subject and over subjects. The "reference images" baseline scores the references against each other
(no self-pairs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .data import ImageInput, to_pil_images
from .prompts import DEFAULT_IDENTIFIER, strip_identifier
from .rewards import check_model_path, model_output_features

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
METRIC_NAMES = ("dino", "clip_i", "clip_t")


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> float:
    """Mean cosine over all (a_i, b_j) pairs; with ``exclude_diagonal`` the i == j pairs are skipped."""
    sims = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    if exclude_diagonal:
        n = min(sims.shape)
        if sims.numel() - n == 0:
            raise ValueError("The reference baseline needs at least two reference images.")
        mask = ~torch.eye(sims.shape[0], sims.shape[1], dtype=torch.bool)
        return float(sims[mask].mean())
    return float(sims.mean())


@dataclass
class PromptScores:
    prompt: str
    num_images: int
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class SubjectScores:
    subject: str
    dino: float
    clip_i: float
    clip_t: float
    prompts: list[PromptScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_scores(rows: Sequence[Any]) -> dict[str, float]:
    """Unweighted mean of dino/clip_i/clip_t over rows (prompts of a subject, or subjects)."""
    if not rows:
        raise ValueError("Nothing to average: no rows.")
    return {m: float(sum(getattr(r, m) for r in rows) / len(rows)) for m in METRIC_NAMES}


class DreamBenchEvaluator:
    """Loads the DINO ViT and the CLIP model once and computes DreamBench metrics."""

    def __init__(
        self,
        dino_model,
        dino_processor,
        clip_model,
        clip_processor,
        identifier: str = DEFAULT_IDENTIFIER,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.dino_model = dino_model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.clip_model = clip_model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.dino_processor, self.clip_processor = dino_processor, clip_processor
        self.identifier = identifier
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, dino: str | os.PathLike = DEFAULT_DINO, clip: str | os.PathLike = DEFAULT_CLIP, **kwargs: Any
    ) -> DreamBenchEvaluator:
        """Hub ids or local folders for the two models (same code path)."""
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor

        from .hub import load_pretrained

        # both checked before either loads: a missing CLIP fails in a second, not after DINO's download
        dino_path, clip_path = check_model_path(dino, "DINO model"), check_model_path(clip, "CLIP model")
        dino_model = load_pretrained(
            AutoModel.from_pretrained, dino_path, kind="DINO model", add_pooling_layer=False
        )
        clip_model = load_pretrained(AutoModel.from_pretrained, clip_path, kind="CLIP model")
        if not hasattr(clip_model, "get_image_features"):
            raise ValueError(
                f"{clip_path!r} is a {type(clip_model).__name__}, not a CLIP-style dual encoder."
            )
        return cls(
            dino_model,
            load_pretrained(AutoImageProcessor.from_pretrained, dino_path, kind="DINO model"),
            clip_model,
            load_pretrained(AutoProcessor.from_pretrained, clip_path, kind="CLIP model"),
            **kwargs,
        )

    def _batched(self, images: Sequence[ImageInput], fn) -> torch.Tensor:
        pils = to_pil_images(list(images))
        if not pils:
            raise ValueError("No images to evaluate.")
        return torch.cat([fn(pils[i : i + self.batch_size]) for i in range(0, len(pils), self.batch_size)])

    @torch.inference_mode()
    def dino_features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """ViT CLS token of the last layer (what DreamBooth's DINO metric uses)."""

        def run(batch):
            px = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(
                self.device, self.dtype
            )
            return self.dino_model(pixel_values=px).last_hidden_state[:, 0].float()

        return self._batched(images, run)

    @torch.inference_mode()
    def clip_image_features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        def run(batch):
            px = self.clip_processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            return model_output_features(
                self.clip_model.get_image_features(pixel_values=px.to(self.device, self.dtype))
            ).float()

        return self._batched(images, run)

    @torch.inference_mode()
    def clip_text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        texts = [strip_identifier(p, self.identifier) for p in prompts]
        tok = self.clip_processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return model_output_features(self.clip_model.get_text_features(**tok)).float()

    def evaluate_prompt(
        self,
        images: Sequence[ImageInput],
        reference_images: Sequence[ImageInput],
        prompt: str,
        reference_features: Mapping[str, torch.Tensor] | None = None,
    ) -> PromptScores:
        """Metrics for the images generated from one prompt."""
        refs = reference_features or self.reference_features(reference_images)
        scores = self.image_scores(images, [prompt] * len(images), refs)
        return PromptScores(
            prompt=prompt,
            num_images=len(scores["dino"]),
            dino=float(scores["dino"].mean()),
            clip_i=float(scores["clip_i"].mean()),
            clip_t=float(scores["clip_t"].clamp_min(0).mean()),
        )

    def image_scores(
        self, images: Sequence[ImageInput], prompts: Sequence[str], reference_features: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per image: DINO and CLIP-I (mean cosine to the references) and CLIP-T (cosine to its prompt, before
        DreamBench's clamp at 0), the scores :meth:`evaluate_prompt` averages; a fidelity study ranks them."""
        clip_img = F.normalize(self.clip_image_features(images), dim=-1)
        refs = {k: F.normalize(v.float(), dim=-1) for k, v in reference_features.items()}
        return {
            "dino": (F.normalize(self.dino_features(images), dim=-1) @ refs["dino"].T).mean(1),
            "clip_i": (clip_img @ refs["clip"].T).mean(1),
            "clip_t": (clip_img * F.normalize(self.clip_text_features(prompts), dim=-1)).sum(-1),
        }

    def reference_features(self, reference_images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        return {
            "dino": self.dino_features(reference_images),
            "clip": self.clip_image_features(reference_images),
        }

    def evaluate_subject(
        self,
        images_by_prompt: Mapping[str, Sequence[ImageInput]],
        reference_images: Sequence[ImageInput],
        subject: str = "subject",
    ) -> SubjectScores:
        """Per-prompt metrics and their mean for one subject (references embedded once)."""
        refs = self.reference_features(reference_images)
        rows = [self.evaluate_prompt(imgs, reference_images, p, refs) for p, imgs in images_by_prompt.items()]
        return SubjectScores(subject=subject, prompts=rows, **mean_scores(rows))

    def reference_baseline(self, reference_images: Sequence[ImageInput]) -> dict[str, float]:
        """DINO and CLIP-I of the references against each other, self-pairs excluded (the paper's upper row)."""
        refs = self.reference_features(reference_images)
        return {
            "dino": mean_pairwise_cosine(refs["dino"], refs["dino"], exclude_diagonal=True),
            "clip_i": mean_pairwise_cosine(refs["clip"], refs["clip"], exclude_diagonal=True),
        }
