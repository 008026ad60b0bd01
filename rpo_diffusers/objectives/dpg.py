"""DPG (Wei et al., ECCV 2024): DreamBooth plus a reward on the image the model is heading for.

From each training prediction the objective looks forward to x0_hat (``losses.look_forward``), scores it
with a reward (latent reconstruction, DINO against the references, the λ-harmonic reward, or any TRL-style
reward function) and trains the policy through a critic Q_φ that learns that reward (``critic.py``):

    L = w_sim L_sim + w_prior L_prior - λ_dpg · mean_b γ^t_b · Q_φ(x0_hat_b)

The reward runs without gradients; the critic is fit to it by MSE on the same, detached input after each
step, with its own optimiser, prepared by accelerate and checkpointed with the rest. ``dpg_critic="none"``
backpropagates through a differentiable reward instead. DESIGN.md section 2b has the math and the official
code's bugs that are not repeated here (batch > 1, no prior preservation, an unsynchronised, unsaved critic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..critic import CRITIC_INPUTS, LookForwardCritic, critic_input
from ..losses import denoising_error, dpg_policy_loss, latent_reconstruction_reward, look_forward
from .base import AuxiliaryPart, LoopContext, TrainingSet
from .dreambooth import DreamBoothObjective

DPG_REWARDS = ("latent", "dino", "lambda_harmonic")
DIFFERENTIABLE_REWARDS = ("latent", "dino")
RewardFn = Callable[[Any, Sequence[str], Any], tuple[Sequence[float], dict[str, Any]]]


class DPGObjective(DreamBoothObjective):
    """DreamBooth + the look-forward reward, learned by a critic.

    Args:
        config: the run's settings (``dpg_*`` fields).
        reward_fn: a TRL-style ``reward_fn(images, prompts, metadata) -> (rewards, info)`` to use instead of
            ``config.dpg_reward``; it sees the decoded x0_hat as ``[B, 3, H, W]`` tensors in [0, 1].
    """

    name = "dpg"
    progress_keys = ("loss", "loss_sim", "reward", "loss_critic")

    def __init__(self, config, reward_fn: RewardFn | None = None) -> None:
        super().__init__(config)
        self.reward_fn = reward_fn
        if reward_fn is None and config.dpg_reward == "dino":
            from ..rewards import check_image_tower

            check_image_tower(config.dpg_reward_model)  # a local folder fails before any model loads
        self.critic: AuxiliaryPart | None = None

    @classmethod
    def check_config(cls, config) -> None:
        gamma, weight = float(config.dpg_gamma), float(config.dpg_weight)
        if not (math.isfinite(gamma) and 0 < gamma <= 1):
            raise ValueError(f"dpg_gamma must be in (0, 1], got {config.dpg_gamma} (the paper's is 0.9986).")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"dpg_weight (λ_dpg) must be a number >= 0, got {config.dpg_weight} (paper: 0.1 or 1)."
            )
        if config.dpg_reward not in DPG_REWARDS:
            raise ValueError(
                f"dpg_reward must be one of {', '.join(DPG_REWARDS)}, got {config.dpg_reward!r}."
            )
        if config.dpg_critic not in (*CRITIC_INPUTS, "none"):
            raise ValueError(
                f"dpg_critic must be one of {', '.join((*CRITIC_INPUTS, 'none'))}, got {config.dpg_critic!r}."
            )
        if config.dpg_critic == "none" and config.dpg_reward not in DIFFERENTIABLE_REWARDS:
            raise ValueError(
                f"dpg_critic='none' backpropagates through the reward, and {config.dpg_reward!r} has no gradient: "
                f"use a critic (dpg_critic='residual') or a differentiable reward ({', '.join(DIFFERENTIABLE_REWARDS)})."
            )
        lr = float(config.dpg_critic_learning_rate)
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"dpg_critic_learning_rate must be a positive number, got {lr}.")

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, ctx: LoopContext, data: TrainingSet) -> None:
        super().setup(ctx, data)
        cfg = self.config
        if self.reward_fn is None and cfg.dpg_reward == "dino":
            from ..rewards import DinoReward

            self.reward_fn = DinoReward.from_pretrained(cfg.dpg_reward_model, device=ctx.accelerator.device)
            self.reward_fn.set_reference_images(ctx.reference_images)  # features computed once
        elif self.reward_fn is None and cfg.dpg_reward == "lambda_harmonic":
            self.reward_fn = ctx.scorer  # references already embedded by the loop
        if cfg.dpg_critic != "none" and self.critic is None:
            module = LookForwardCritic(data.reference_latents.shape[1:], seed=cfg.seed).to(
                ctx.accelerator.device
            )
            optimizer = torch.optim.SGD(module.parameters(), lr=cfg.dpg_critic_learning_rate)
            self.critic = AuxiliaryPart("critic", module, optimizer)

    def auxiliary_parts(self) -> list[AuxiliaryPart]:
        return [self.critic] if self.critic is not None else []

    def reward_name(self) -> str:
        cfg = self.config
        if self.reward_fn is not None and cfg.dpg_reward not in ("dino", "lambda_harmonic"):
            return getattr(self.reward_fn, "__name__", type(self.reward_fn).__name__)
        return {
            "latent": "look-forward latent reconstruction",
            "dino": f"DINO ({cfg.dpg_reward_model})",
            "lambda_harmonic": f"λ-harmonic ({cfg.scorer_model_name_or_path}), λ {cfg.lambda_val}",
        }[cfg.dpg_reward]

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": self.name,
            "reward": self.reward_name(),
            "critic": cfg.dpg_critic,
            "dpg_weight": cfg.dpg_weight,
            "dpg_gamma": cfg.dpg_gamma,
            "sim_loss_weight": cfg.sim_loss_weight,
        }

    # -- the reward on x0_hat ---------------------------------------------------------------------------
    def observe_reward(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``[B]`` reward of the look-forward latents (with gradients only when the caller enables them)."""
        if self.reward_fn is None:
            return latent_reconstruction_reward(x0_hat, x0)
        pixels = self.ctx.components.decode_pixels(x0_hat)
        if torch.is_grad_enabled() and hasattr(self.reward_fn, "reward"):
            return self.reward_fn.reward(pixels).to(x0_hat.device)
        prompts = [self.config.instance_prompt] * len(pixels)
        rewards, _ = self.reward_fn(pixels.detach().float().cpu(), prompts, {})
        return torch.as_tensor(list(rewards), dtype=torch.float32, device=x0_hat.device)

    def critic_value(self, inputs: torch.Tensor) -> torch.Tensor:
        """Q_φ(inputs) with φ held fixed: the policy's gradient flows into the inputs only."""
        base = self.ctx.accelerator.unwrap_model(self.critic.module)
        params = {name: p.detach() for name, p in base.named_parameters()}
        return torch.func.functional_call(base, params, (inputs,))

    # -- one micro-batch --------------------------------------------------------------------------------
    def loss(self, model: nn.Module, positions: Sequence[int], generator: torch.Generator):
        cfg = self.config
        x0, noisy, t, cond, target = self.reference_batch(positions, generator)
        prior = self.class_batch(positions, generator)
        pred, class_error = self.denoise_with_prior(model, noisy, t, cond, prior)
        similarity = denoising_error(pred.float(), target).mean()
        x0_hat = look_forward(self.ctx.components.noise_scheduler, noisy, pred, t)
        critic_loss = None
        if self.critic is not None:
            inputs = critic_input(x0_hat, x0, cfg.dpg_critic)
            value = self.critic_value(inputs)
            with torch.no_grad():
                reward = self.observe_reward(x0_hat.detach(), x0)
            critic_loss = F.mse_loss(self.critic.module(inputs.detach()).float(), reward.float())
        else:
            reward = value = self.observe_reward(x0_hat, x0)
        policy = dpg_policy_loss(value, t, cfg.dpg_gamma, cfg.dpg_weight)
        loss = cfg.sim_loss_weight * similarity + policy
        parts = {
            "loss": loss.detach(),
            "loss_sim": similarity.detach(),
            "loss_dpg": policy.detach(),
            "reward": reward.detach().float().mean(),
        }
        loss, parts = self.add_prior(loss, parts, class_error)
        if critic_loss is not None:  # the critic's own loss: its gradient reaches φ only (inputs detached)
            parts["loss_critic"] = critic_loss.detach()
            loss = loss + critic_loss
        return loss, parts
