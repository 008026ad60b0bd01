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


# --------------------------------------------------------------------------------------------------
# DPG (Wei et al., ECCV 2024; DESIGN.md section 2b)
# --------------------------------------------------------------------------------------------------
def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, torch.float32)


def look_forward(
    noise_scheduler, noisy_latents: torch.Tensor, model_pred: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x0_hat, the clean latent the prediction points to (diffusers' ``pred_original_sample``).

    ε-prediction: x0_hat = (x_t - sqrt(1 - ab_t) p) / sqrt(ab_t); v-prediction: x0_hat = sqrt(ab_t) x_t -
    sqrt(1 - ab_t) p. Exact when ``model_pred`` is the true target. Differentiable in ``model_pred``.
    """
    prediction_type = noise_scheduler.config.prediction_type
    alphas = noise_scheduler.alphas_cumprod.to(noisy_latents.device)[timesteps.to(noisy_latents.device)]
    sqrt_ab = _per_sample(alphas.sqrt(), noisy_latents)
    sqrt_1m = _per_sample((1 - alphas).sqrt(), noisy_latents)
    x_t, pred = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        return (x_t - sqrt_1m * pred) / sqrt_ab
    if prediction_type == "v_prediction":
        return sqrt_ab * x_t - sqrt_1m * pred
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")


def timestep_discount(timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ^t for each sample's own timestep (the official code used the first sample's t for the batch)."""
    return torch.pow(torch.tensor(float(gamma), dtype=torch.float64), timesteps.double()).float()


def latent_reconstruction_reward(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """r = -mean over C, H, W of (x0_hat - x0)^2: the look-forward reward of DPG's released code."""
    diff = x0_hat.float() - x0.float()
    return -diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def dpg_policy_loss(
    values: torch.Tensor, timesteps: torch.Tensor, gamma: float, weight: float = 1.0
) -> torch.Tensor:
    """-λ_dpg · mean over the batch of γ^t · Q(x0_hat): higher value, lower loss."""
    discount = timestep_discount(timesteps, gamma).to(values.device)
    return -weight * (discount * values.float()).mean()
