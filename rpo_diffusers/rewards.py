"""The λ-harmonic reward (DESIGN.md section 2).

``lambda_harmonic`` is the pure math. ``LambdaHarmonicScorer`` (below) wraps an image-text dual
encoder (ALIGN, CLIP, SigLIP) to compute ALIGN-I and ALIGN-T for images.
"""

from __future__ import annotations

import torch

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
