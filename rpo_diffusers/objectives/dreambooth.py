"""DreamBooth (Ruiz et al., CVPR 2023): the denoising loss on the subject's photos, + optional prior preservation.

The baseline every comparison is made against. Unlike ``method="rpo"`` with ``pref_loss_weight=0`` (which
still draws base-model images and runs the frozen model for a logged margin), this objective only forwards
what its loss uses: the references under the instance prompt, and the class images with prior preservation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..losses import denoising_error
from .base import EpochSampler, LoopContext, Objective, TrainingSet


class DreamBoothObjective(Objective):
    """L = L_sim + w_prior L_prior."""

    name = "dreambooth"
    progress_keys = ("loss", "loss_sim")

    def setup(self, ctx: LoopContext, data: TrainingSet) -> None:
        super().setup(ctx, data)
        self.reference_sampler = EpochSampler(len(data.reference_latents), self.config.seed, salt=2)

    def reference_batch(self, positions: Sequence[int], generator: torch.Generator):
        """Noisy reference latents under the instance prompt: each epoch visits every photo once."""
        data = self.data
        idx = self.reference_sampler(positions)
        latents = data.reference_latents[idx.to(data.reference_latents.device)]
        noisy, t, target = self.noisy(latents, generator)
        cond = data.reference_conditioning[idx.to(data.reference_conditioning.device)].to(self.device)
        return latents.to(self.device), noisy, t, cond, target

    def loss(self, model: nn.Module, positions: Sequence[int], generator: torch.Generator):
        _, noisy, t, cond, target = self.reference_batch(positions, generator)
        prior = self.class_batch(positions, generator)
        pred, class_error = self.denoise_with_prior(model, noisy, t, cond, prior)
        similarity = denoising_error(pred.float(), target).mean()
        parts = {"loss": similarity.detach(), "loss_sim": similarity.detach()}
        return self.add_prior(similarity, parts, class_error)
