"""Rewards: the λ-harmonic reward (DESIGN.md section 2) and DPG's DINO reward (section 2b).

``lambda_harmonic`` is the pure math. ``LambdaHarmonicScorer`` wraps an image-text dual encoder (ALIGN, CLIP,
SigLIP) to compute ALIGN-I and ALIGN-T for images; ``DinoReward`` scores images by their ViT features'
similarity to the references. Both are TRL-style reward functions ``reward_fn(images, prompts, metadata)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .data import ImageInput, to_pil_images
from .prompts import DEFAULT_IDENTIFIER, strip_identifier

EPS = 1e-8


def check_lambda(lambda_: float, name: str = "lambda_") -> float:
    """Validate λ ∈ [0, 1] with a clear error."""
    value = float(lambda_)
    if not 0.0 <= value <= 1.0 or value != value:
        raise ValueError(
            f"{name} must be in [0, 1] (1 = image similarity only, 0 = text alignment only), got {lambda_!r}."
        )
    return value


def cosine_to_unit(cosine: torch.Tensor) -> torch.Tensor:
    """Map a cosine similarity from [-1, 1] to [0, 1]: (cos + 1) / 2."""
    return (cosine + 1.0) / 2.0


def lambda_harmonic(image_alignment, text_alignment, lambda_: float = 0.5, eps: float = EPS):
    """r_λ = 1 / (λ / ALIGN-I + (1 - λ) / ALIGN-T), the weighted harmonic mean.

    λ = 1 gives ALIGN-I and λ = 0 gives ALIGN-T exactly (the unused term is dropped, not divided by).
    Works on floats and tensors. Paper check: I = 0.9, T = 0.01, λ = 0.5 -> 0.0198.
    """
    lam = check_lambda(lambda_)
    i = torch.as_tensor(image_alignment, dtype=torch.float64)
    t = torch.as_tensor(text_alignment, dtype=torch.float64)
    if lam == 1.0:
        out = i.clone()
    elif lam == 0.0:
        out = t.clone()
    else:
        out = 1.0 / (lam / i.clamp_min(eps) + (1.0 - lam) / t.clamp_min(eps))
    if not isinstance(image_alignment, torch.Tensor) and not isinstance(text_alignment, torch.Tensor):
        return float(out) if out.ndim == 0 else out
    ref = image_alignment if isinstance(image_alignment, torch.Tensor) else text_alignment
    return out.to(ref.dtype if ref.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------------------------------
# The scorer: an image-text dual encoder (ALIGN / CLIP / SigLIP) turned into ALIGN-I, ALIGN-T and r_λ.
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Per-image scores. All tensors are 1-D float32 on the CPU, one entry per image."""

    image_alignment: torch.Tensor
    text_alignment: torch.Tensor
    reward: torch.Tensor
    lambda_: float
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.reward.numel())

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per image (for tables, JSON and CSV)."""
        return [
            {
                "prompt": self.prompts[i] if i < len(self.prompts) else "",
                "align_i": float(self.image_alignment[i]),
                "align_t": float(self.text_alignment[i]),
                "reward": float(self.reward[i]),
            }
            for i in range(len(self))
        ]


def model_output_features(output: Any) -> torch.Tensor:
    """Features from ``get_image_features``/``get_text_features`` across transformers versions.

    transformers < 5 returns a tensor; 5.x returns a ``BaseModelOutputWithPooling`` whose ``pooler_output``
    holds the projected features.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"Cannot read features from {type(output).__name__}: no pooler_output.")
    return pooled


def check_model_path(name_or_path: str | os.PathLike, kind: str | None = None) -> str:
    """The path or Hub id to load, or a one-line error now instead of a long traceback later.

    Bundled short names (``toy-sd``, ``toy-scorer``, ``toy-dino``, ``toy-clip``) become the toy world's
    folders; a local-looking path that does not exist fails naming it; a Hub id that is not cached fails
    at once when the Hub cannot be reached (offline mode, no network). ``kind`` ("base model", "scorer",
    "DINO model", "CLIP model") picks the bundled model the message suggests. See ``rpo_diffusers.hub``.
    """
    from .hub import resolve_model

    return resolve_model(name_or_path, kind)


def load_dual_encoder(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load a transformers image-text dual encoder and its processor (same path for hub ids and folders)."""
    from transformers import AutoModel, AutoProcessor

    from .hub import load_pretrained

    path = check_model_path(name_or_path, "scorer")
    model = load_pretrained(AutoModel.from_pretrained, path, kind="scorer", **kwargs)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(
            f"{path!r} holds a {type(model).__name__}, which has no image and text towers. "
            "The λ-harmonic scorer needs a dual encoder such as AlignModel, CLIPModel or SiglipModel."
        )
    processor = load_pretrained(AutoProcessor.from_pretrained, path, kind="scorer")
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"{path!r} has no processor with both an image processor and a tokenizer.")
    return model.eval(), processor


class LambdaHarmonicScorer:
    """Scores images with the λ-harmonic reward of an image-text dual encoder (ALIGN, CLIP, SigLIP).

    ALIGN-I is the mean over references of (cos + 1) / 2 between image features, ALIGN-T is
    (cos + 1) / 2 between the image and its prompt with the identifier removed, and the reward is
    their λ-weighted harmonic mean. Reference features are cached by ``set_reference_images`` and text
    features by prompt, since training scores the same references and prompts over and over.
    """

    def __init__(
        self,
        model,
        processor,
        lambda_: float = 0.5,
        identifier: str = DEFAULT_IDENTIFIER,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.lambda_ = check_lambda(lambda_)
        self.identifier = identifier
        self.batch_size = int(batch_size)
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self._text_padding = "max_length" if "siglip" in type(model).__name__.lower() else True
        self._text_cache: dict[str, torch.Tensor] = {}
        self._reference_features: torch.Tensor | None = None
        self.to(device or "cpu", dtype)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "kakaobrain/align-base",
        lambda_: float = 0.5,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        identifier: str = DEFAULT_IDENTIFIER,
        **load_kwargs: Any,
    ) -> LambdaHarmonicScorer:
        """Load from a hub id or a local folder (ALIGN by default; CLIP and SigLIP work the same)."""
        check_lambda(lambda_)
        model, processor = load_dual_encoder(name_or_path, **load_kwargs)
        return cls(
            model,
            processor,
            lambda_=lambda_,
            identifier=identifier,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )

    # -- device handling ---------------------------------------------------------------------------
    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LambdaHarmonicScorer:
        """Move the model; cached features are kept in float32 and moved along."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        elif not hasattr(self, "dtype"):
            self.dtype = next(self.model.parameters()).dtype
        self.model.to(device=self.device, dtype=self.dtype)
        self._text_cache = {k: v.to(self.device) for k, v in self._text_cache.items()}
        if self._reference_features is not None:
            self._reference_features = self._reference_features.to(self.device)
        return self

    # -- embeddings ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised image features ``[N, D]`` (float32, on the scorer's device)."""
        pils = to_pil_images(images)
        if not pils:
            raise ValueError("No images to embed.")
        feats = []
        for start in range(0, len(pils), self.batch_size):
            batch = self.processor.image_processor(
                images=pils[start : start + self.batch_size], return_tensors="pt"
            )
            pixel_values = batch["pixel_values"].to(self.device, self.dtype)
            feats.append(
                model_output_features(self.model.get_image_features(pixel_values=pixel_values)).float()
            )
        return F.normalize(torch.cat(feats), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features ``[N, D]`` of the prompts with the identifier stripped (cached)."""
        stripped = [strip_identifier(p, self.identifier) for p in prompts]
        missing = [p for p in dict.fromkeys(stripped) if p not in self._text_cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tok = self.processor.tokenizer(
                chunk, padding=self._text_padding, truncation=True, return_tensors="pt"
            )
            tok = {
                k: v.to(self.device)
                for k, v in tok.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            if self._text_padding == "max_length":
                tok.pop("attention_mask", None)  # SigLIP is trained without a text attention mask
            feats = F.normalize(model_output_features(self.model.get_text_features(**tok)).float(), dim=-1)
            self._text_cache.update(zip(chunk, feats))
        return torch.stack([self._text_cache[p] for p in stripped])

    def set_reference_images(self, images: ImageInput | Sequence[ImageInput]) -> None:
        """Embed the subject's reference images once; later ``score`` calls reuse them."""
        self._reference_features = self.embed_images(images)

    @property
    def has_reference_images(self) -> bool:
        return self._reference_features is not None

    # -- scoring -------------------------------------------------------------------------------------
    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        reference_images: ImageInput | Sequence[ImageInput] | None = None,
        lambda_: float | None = None,
    ) -> ScoreResult:
        """ALIGN-I, ALIGN-T and r_λ for each image under its prompt (identifier stripped)."""
        lam = self.lambda_ if lambda_ is None else check_lambda(lambda_)
        if reference_images is not None:
            refs = self.embed_images(reference_images)
        elif self._reference_features is not None:
            refs = self._reference_features
        else:
            raise ValueError(
                "No reference images: call scorer.set_reference_images(images) once, or pass reference_images=."
            )
        if any(not str(p).strip() for p in ([prompts] if isinstance(prompts, str) else prompts)):
            raise ValueError(
                "An empty prompt: ALIGN-T would measure nothing. Give each image the prompt it was made for."
            )
        image_feats = self.embed_images(images)
        n = image_feats.shape[0]
        prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != n:
            raise ValueError(
                f"Got {n} images but {len(prompt_list)} prompts: pass one prompt per image or a single string."
            )
        text_feats = self.embed_texts(prompt_list)
        image_alignment = cosine_to_unit(image_feats @ refs.T).mean(dim=1)
        text_alignment = cosine_to_unit((image_feats * text_feats).sum(dim=-1))
        reward = lambda_harmonic(image_alignment, text_alignment, lam)
        return ScoreResult(
            image_alignment=image_alignment.float().cpu(),
            text_alignment=text_alignment.float().cpu(),
            reward=reward.float().cpu(),
            lambda_=lam,
            prompts=[strip_identifier(p, self.identifier) for p in prompt_list],
        )

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], prompts: str | Sequence[str], metadata: Any = None
    ) -> tuple[list[float], dict[str, Any]]:
        """TRL-style reward function: ``(rewards, info)``; ``metadata`` may carry ``reference_images``/``lambda_``."""
        meta = metadata if isinstance(metadata, dict) else {}
        result = self.score(images, prompts, meta.get("reference_images"), meta.get("lambda_"))
        info = {
            "align_i": result.image_alignment.tolist(),
            "align_t": result.text_alignment.tolist(),
            "lambda": result.lambda_,
        }
        return result.reward.tolist(), info


DEFAULT_DINO_REWARD = "facebook/dino-vits16"


def check_image_tower(name_or_path: str | os.PathLike) -> None:
    """Refuse a local model folder whose config has no image tower, before its weights load.

    A hub id cannot be checked offline; it is checked when it loads.
    """
    path = os.path.expanduser(os.fspath(name_or_path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return
    import json
    from pathlib import Path

    config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    if "vision_config" in config or "image_size" in config:
        return
    raise ValueError(
        f"{os.fspath(name_or_path)!r} is a {config.get('model_type', 'model')} with no image tower: the DINO reward "
        f"needs a vision model (a ViT such as {DEFAULT_DINO_REWARD!r}, or a CLIP / SigLIP dual encoder)."
    )


def _processor_side(processor) -> int | None:
    """The square input side an image processor produces (its crop size, else its resize size)."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if size is None:
            continue
        if isinstance(size, int):
            return size
        get = size.get if isinstance(size, dict) else lambda k, s=size: getattr(s, k, None)
        side = get("height") or get("shortest_edge")
        if side:
            return int(side)
    return None


class DinoReward:
    """DPG's DINO reward: mean over the references of cos(ViT CLS(x), ViT CLS(reference)).

    Works on tensors end to end (resize and normalise in torch), so it is differentiable in the image when
    called with gradients enabled; ``__call__`` is the TRL-style reward function. Reference features are
    computed once by ``set_reference_images``. Any transformers ViT works (``facebook/dino-vits16`` by default,
    the paper's); a dual encoder's image tower (CLIP, SigLIP) too.
    """

    differentiable = True

    def __init__(
        self,
        model,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.image_size = int(image_size)
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._reference_features: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike = DEFAULT_DINO_REWARD, device: str | torch.device = "cpu"
    ) -> DinoReward:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        from .hub import load_pretrained

        path = check_model_path(name_or_path, "DINO model")
        check_image_tower(path)
        config = load_pretrained(AutoConfig.from_pretrained, path, kind="DINO model")
        kwargs = {"add_pooling_layer": False} if config.model_type in ("vit", "dinov2", "deit") else {}
        model = AutoModel.from_pretrained(path, **kwargs)
        takes_pixels = "pixel_values" in inspect.signature(model.forward).parameters
        if not hasattr(model, "get_image_features") and not takes_pixels:
            raise ValueError(f"{path!r} holds a {type(model).__name__}, which has no image tower.")
        processor = AutoImageProcessor.from_pretrained(path)
        side = _processor_side(processor) or getattr(config, "image_size", None)
        side = side or getattr(getattr(config, "vision_config", None), "image_size", 224)
        return cls(model, side, processor.image_mean, processor.image_std, device)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS features ``[B, D]`` of ``[B, 3, H, W]`` images in [0, 1]."""
        x = pixels.float().to(self.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        dtype = next(self.model.parameters()).dtype
        if hasattr(self.model, "get_image_features"):
            out = model_output_features(self.model.get_image_features(pixel_values=x.to(dtype)))
        else:
            out = self.model(pixel_values=x.to(dtype)).last_hidden_state[:, 0]
        return F.normalize(out.float(), dim=-1)

    def set_reference_images(self, images: ImageInput | Sequence[ImageInput]) -> None:
        from .data import images_to_tensor

        pils = to_pil_images(images)
        with torch.no_grad():
            pixels = (images_to_tensor(pils, self.image_size) + 1) / 2
            self._reference_features = self.features(pixels)

    def reward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean cosine to the references (differentiable in ``pixels``)."""
        if self._reference_features is None:
            raise ValueError("No reference images: call set_reference_images(images) first.")
        return (self.features(pixels) @ self._reference_features.T).mean(dim=1)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], prompts: Any = None, metadata: Any = None
    ) -> tuple[list[float], dict[str, Any]]:
        """TRL-style reward function (prompts are not used: DINO sees only images)."""
        from .data import images_to_tensor

        if isinstance(images, torch.Tensor) and images.dim() == 4:
            pixels = images
        else:
            pixels = (images_to_tensor(to_pil_images(images), self.image_size) + 1) / 2
        with torch.no_grad():
            rewards = self.reward(pixels)
        return rewards.cpu().tolist(), {"dino": rewards.cpu().tolist()}
