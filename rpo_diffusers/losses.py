"""The RPO objective as pure tensor functions (DESIGN.md section 2).

Nothing here knows about pipelines or optimisers: each function takes tensors and returns tensors, so
the math can be checked by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the denoiser should predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")


def denoising_error(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample e(x, c) = mean over C, H, W of (prediction - target)^2, computed in fp32."""
    diff = model_pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def preference_margin(
    ref_error_on_reference: torch.Tensor,
    model_error_on_reference: torch.Tensor,
    ref_error_on_generated: torch.Tensor,
    model_error_on_generated: torch.Tensor,
) -> torch.Tensor:
    """d = (e_ref(x_ref) - e_θ(x_ref)) - (e_ref(x_gen) - e_θ(x_gen)).

    d > 0 means the trained model improved more on the reference image than on the generated one,
    i.e. it implicitly prefers the reference.
    """
    return (ref_error_on_reference - model_error_on_reference) - (
        ref_error_on_generated - model_error_on_generated
    )


def preference_loss(margin: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """L_pref = -mean[y log σ(βd) + (1 - y) log σ(-βd)], with y = 1 when the reference is preferred."""
    return F.binary_cross_entropy_with_logits(beta * margin, labels.to(margin.dtype))


def implicit_accuracy(margin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the sign of d agrees with the label (ties count as wrong)."""
    predicted = (margin > 0).to(labels.dtype)
    return (predicted == labels).float().mean()


def rpo_loss(
    model_error_on_reference: torch.Tensor,
    ref_error_on_reference: torch.Tensor,
    model_error_on_generated: torch.Tensor,
    ref_error_on_generated: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1.0,
    preference_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_sim + w_pref * L_pref, with L_sim = mean e_θ(x_ref, instance prompt).

    Returns the total loss and its parts (detached) for logging.
    """
    similarity = model_error_on_reference.mean()
    margin = preference_margin(
        ref_error_on_reference, model_error_on_reference, ref_error_on_generated, model_error_on_generated
    )
    if preference_weight:
        pref = preference_loss(margin, labels, beta)
        total = similarity + preference_weight * pref
    else:
        pref = preference_loss(margin.detach(), labels, beta)
        total = similarity
    parts = {
        "loss": total.detach(),
        "loss_sim": similarity.detach(),
        "loss_pref": pref.detach(),
        "margin": margin.detach().mean(),
        "implicit_acc": implicit_accuracy(margin.detach(), labels),
    }
    return total, parts


def add_prior_preservation_loss(
    loss: torch.Tensor,
    parts: dict[str, torch.Tensor],
    model_error_on_class: torch.Tensor,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DreamBooth's prior preservation: L + w_prior * L_prior, with L_prior = mean e_θ(x_class, class prompt).

    ``loss`` and ``parts`` are what :func:`rpo_loss` returns; the class images are the base model's own
    samples, so fitting them keeps the class prior while L_sim fits the subject. ``w_prior = 0`` logs
    L_prior without letting it reach the gradients.
    """
    prior = model_error_on_class.mean()
    total = loss + prior_weight * prior if prior_weight else loss
    return total, {**parts, "loss": total.detach(), "loss_prior": prior.detach()}
