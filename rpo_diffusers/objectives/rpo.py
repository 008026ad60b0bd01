"""RPO (Miao et al., NeurIPS 2024): L_sim + w_pref L_pref on (reference, base-model image) pairs.

Preference labels come from the λ_train reward of the images in each pair (Bradley-Terry, drawn again every
epoch); DESIGN.md section 2 has the math, ``losses.rpo_loss`` the formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..losses import denoising_error, rpo_loss
from ..preferences import PreferencePair, epoch_pairs
from .base import LoopContext, Objective, TrainingSet


class RPOObjective(Objective):
    """Reward Preference Optimization: the default method."""

    name = "rpo"
    needs_generated_images = True
    progress_keys = ("loss", "loss_sim", "loss_pref", "implicit_acc")

    @classmethod
    def check_config(cls, config) -> None:
        if config.train_text_encoder:
            raise ValueError(
                "train_text_encoder is for method 'dreambooth' or 'dpg': RPO keeps the text encoder frozen (its "
                "reference model shares it). Drop train_text_encoder, or pick another method."
            )

    def setup(self, ctx: LoopContext, data: TrainingSet) -> None:
        """The λ_train reward of every generated image under its prompt and of every reference under every
        prompt: what the Bradley-Terry labels are drawn from."""
        super().setup(ctx, data)
        cfg, scorer, refs = self.config, ctx.scorer, ctx.reference_images
        prompts = cfg.train_prompts
        self.generated_rewards = (
            scorer.score(
                data.generated_images,
                [prompts[i] for i in data.generated_prompt_indices],
                lambda_=cfg.lambda_train,
            )
            .reward.float()
            .cpu()
        )
        self.reference_rewards = (
            torch.stack(
                [scorer.score(refs, [p] * len(refs), lambda_=cfg.lambda_train).reward for p in prompts], dim=1
            )
            .float()
            .cpu()
        )
        ctx.record_training_rewards(self.generated_rewards, self.reference_rewards)
        self._pairs_cache: dict[int, list[PreferencePair]] = {}

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": self.name,
            "reward": f"λ-harmonic ({cfg.scorer_model_name_or_path}), λ_train {cfg.lambda_train}",
            "beta": cfg.beta,
            "pref_loss_weight": cfg.pref_loss_weight,
        }

    def pairs_for_epoch(self, epoch: int) -> list[PreferencePair]:
        if epoch not in self._pairs_cache:
            self._pairs_cache = {
                epoch: epoch_pairs(
                    self.data.generated_prompt_indices,
                    self.reference_rewards,
                    self.generated_rewards,
                    epoch,
                    self.config.seed,
                )
            }
        return self._pairs_cache[epoch]

    def pairs(self, positions: Sequence[int]) -> list[PreferencePair]:
        """The pairs at these sample positions: one epoch visits every generated image once."""
        n = len(self.data.generated_prompt_indices)
        return [self.pairs_for_epoch(k // n)[k % n] for k in positions]

    def loss(self, model: nn.Module, positions: Sequence[int], generator: torch.Generator):
        """L_sim + w_pref L_pref on the pairs (+ w_prior L_prior with class images).

        The reference half is conditioned on the instance prompt, the generated half on its own prompt; both
        halves draw their own timesteps and noise, the class rows after them. The frozen reference model only
        sees the pairs (with LoRA in the same forward, :meth:`denoise_with_reference`).
        """
        data, cfg = self.data, self.config
        pairs = self.pairs(positions)
        b = len(pairs)
        ref_idx = torch.tensor([p.reference_index for p in pairs])
        gen_idx = torch.tensor([p.generated_index for p in pairs])
        prompt_idx = torch.tensor([p.prompt_index for p in pairs])
        labels = torch.tensor([p.label for p in pairs], device=self.device)
        latents = torch.cat(
            [
                data.reference_latents[ref_idx.to(data.reference_latents.device)],
                data.generated_latents[gen_idx.to(data.generated_latents.device)],
            ]
        )
        cond = torch.cat(
            [
                data.reference_conditioning[ref_idx.to(data.reference_conditioning.device)],
                data.prompt_embeddings[prompt_idx.to(data.prompt_embeddings.device)],
            ]
        ).to(self.device)
        noisy, t, target = self.noisy(latents, generator)
        prior = self.class_batch(positions, generator)  # drawn after the pairs' noise
        pred, class_error, ref_pred = self.denoise_with_reference(model, noisy, t, cond, prior)
        err = denoising_error(pred.float(), target)
        ref_err = denoising_error(ref_pred.float(), target)
        loss, parts = rpo_loss(
            err[:b], ref_err[:b], err[b:], ref_err[b:], labels,
            beta=cfg.beta, preference_weight=cfg.pref_loss_weight,
        )  # fmt: skip
        return self.add_prior(loss, parts, class_error)
