"""What a training method is to the loop: the data it needs, its extra trainable parts, one micro-batch's loss.

The loop (:class:`~rpo_diffusers.trainer.PersonalizationTrainer`) owns everything else once: generation,
the training set's latents and embeddings, accelerate, checkpoints and resume, validation with the
λ-harmonic reward, selection, export and logging. A new method is a new :class:`Objective` subclass
registered in ``objectives/__init__.py``; the loop does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..losses import add_prior_preservation_loss, denoising_error, diffusion_target

if TYPE_CHECKING:
    from PIL import Image

    from ..components import DiffusionComponents
    from ..config import RPOConfig


@dataclass
class TrainingSet:
    """Everything the loss reads each step, computed once by the loop (no gradients, on the device).

    ``generated_*`` exist only for objectives with ``needs_generated_images``; ``class_*`` only with prior
    preservation.
    """

    reference_latents: torch.Tensor  # [R, C, h, w]
    instance_embedding: torch.Tensor  # [1, L, D], or token ids [1, L] when the text encoder trains
    generated_latents: torch.Tensor | None = None  # [N, C, h, w]
    prompt_embeddings: torch.Tensor | None = None  # [P, L, D]: the training prompts
    generated_prompt_indices: list[int] = field(default_factory=list)
    generated_images: list[Image.Image] = field(default_factory=list)
    class_latents: torch.Tensor | None = None  # [K, C, h, w]
    class_embedding: torch.Tensor | None = None  # [1, L, D]: the class prompt
    # one conditioning row per reference / class latent: the prompt's, plus what the model family conditions
    # on per image (SDXL: each photo's size and crop); by default the prompt's row repeated (a view)
    reference_conditioning: Any = None  # [R, ...]
    class_conditioning: Any = None  # [K, ...]

    def __post_init__(self) -> None:
        if self.reference_conditioning is None:
            self.reference_conditioning = repeat_rows(self.instance_embedding, len(self.reference_latents))
        if (
            self.class_conditioning is None
            and self.class_latents is not None
            and self.class_embedding is not None
        ):
            self.class_conditioning = repeat_rows(self.class_embedding, len(self.class_latents))


class LoopContext(Protocol):
    """The parts of the loop an objective may read (the trainer is one)."""

    config: RPOConfig
    accelerator: Any
    components: DiffusionComponents
    scorer: Any
    reference_images: list[Image.Image]

    def record_training_rewards(self, generated: torch.Tensor, references: torch.Tensor) -> None: ...


@dataclass
class AuxiliaryPart:
    """A trainable module an objective owns besides the denoiser (DPG's critic), with its own optimiser.

    The loop prepares both with accelerate (so ranks stay in sync), steps the optimiser with the main one and
    saves both in every checkpoint; after ``prepare`` the fields hold the prepared objects.
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer


def repeat_rows(conditioning: torch.Tensor, n: int) -> torch.Tensor:
    """One prompt's conditioning for ``n`` rows: embeddings ``[1, L, D]`` or token ids ``[1, L]``."""
    return conditioning.expand(n, *conditioning.shape[1:])


def epoch_order(n: int, epoch: int, seed: int, salt: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` for one epoch, so every item is visited once per epoch."""
    key = (seed * 1_000_003 + 7 * epoch + salt) % (2**63)
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class EpochSampler:
    """Items of one micro-batch: position k of the run's sample stream is item ``order(k // n)[k % n]``.

    Positions are a pure function of (step, micro, rank), so a resumed run and every rank agree.
    """

    def __init__(self, n: int, seed: int, salt: int) -> None:
        self.n, self.seed, self.salt = n, seed, salt
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, positions: Sequence[int]) -> torch.Tensor:
        out = []
        for k in positions:
            epoch = k // self.n
            if epoch not in self._cache:
                self._cache = {epoch: epoch_order(self.n, epoch, self.seed, self.salt)}
            out.append(int(self._cache[epoch][k % self.n]))
        return torch.tensor(out)


class Objective(ABC):
    """One personalization method's part of the loop.

    Class attributes:
        name: the ``method`` value that selects it.
        needs_generated_images: the loop draws ``images_per_prompt`` base-model images per training prompt
            and encodes them (RPO's preference pairs are built on them).
        progress_keys: logged parts shown on the progress bar.
    """

    name: ClassVar[str]
    needs_generated_images: ClassVar[bool] = False
    progress_keys: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, config: RPOConfig) -> None:
        self.config = config
        self.ctx: LoopContext | None = None
        self.data: TrainingSet | None = None
        self._class_sampler: EpochSampler | None = None

    # -- set-up -----------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: RPOConfig) -> None:
        """Refuse settings this method cannot use (called by the config, before any model loads)."""
        return None

    def setup(self, ctx: LoopContext, data: TrainingSet) -> None:
        """Called once the training set exists: build what the loss needs (pairs, reward features, critic)."""
        self.ctx, self.data = ctx, data

    def auxiliary_parts(self) -> list[AuxiliaryPart]:
        """Trainable parts besides the denoiser (none by default)."""
        return []

    def summary(self) -> dict[str, Any]:
        """What the history file and the model card record about the method."""
        return {"method": self.name}

    # -- one micro-batch --------------------------------------------------------------------------------
    @abstractmethod
    def loss(
        self, model: nn.Module, positions: Sequence[int], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the micro-batch at sample positions ``positions`` and its logged parts (detached).

        ``model`` is the prepared (possibly DDP-wrapped) denoiser; ``generator`` is the micro-batch's seeded
        CPU generator for timesteps and noise.
        """

    # -- shared pieces ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.accelerator.device

    def noisy(self, latents: torch.Tensor, generator: torch.Generator):
        """Noise, timesteps ``t ~ U[0, T)``, noisy latents and the regression target for ``latents``."""
        sched = self.ctx.components.noise_scheduler
        dev = self.device
        latents = latents.to(dev)
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator).to(dev)
        return sched.add_noise(latents, noise, t), t, diffusion_target(sched, latents, noise, t)

    def class_indices(self, positions: Sequence[int]) -> torch.Tensor:
        """Class images of one micro-batch: each epoch visits all of them in a seeded order."""
        if self.data is None or self.data.class_latents is None:
            raise ValueError("No class images: train with with_prior_preservation=True.")
        if self._class_sampler is None:
            self._class_sampler = EpochSampler(len(self.data.class_latents), self.config.seed, salt=1)
        return self._class_sampler(positions)

    def class_batch(self, positions: Sequence[int], generator: torch.Generator):
        """Noisy class latents, timesteps, the class prompt's conditioning and the target, or None."""
        if self.data is None or self.data.class_latents is None:
            return None
        idx = self.class_indices(positions)
        latents = self.data.class_latents[idx.to(self.data.class_latents.device)]
        noisy, t, target = self.noisy(latents, generator)
        conditioning = self.data.class_conditioning
        cond = conditioning[idx.to(conditioning.device)].to(self.device)
        return noisy, t, cond, target

    def denoise_with_prior(
        self,
        model: nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        prior: tuple[torch.Tensor, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trained model's prediction on the rows, and the class rows' denoising error (or None).

        With ``prior_loss_weight > 0`` the class rows join the same forward (one forward per step keeps DDP
        simple); with weight 0 L_prior is only logged, from a gradient-free forward, so training is exactly
        that of prior preservation off.
        """
        rows = len(noisy)
        joint = prior is not None and self.config.prior_loss_weight > 0
        if joint:
            pred = model(torch.cat([noisy, prior[0]]), torch.cat([t, prior[1]]), torch.cat([cond, prior[2]]))
            return pred[:rows], denoising_error(pred[rows:].float(), prior[3])
        pred = model(noisy, t, cond)
        if prior is None:
            return pred, None
        with torch.no_grad():
            class_pred = self.ctx.components.denoiser(*prior[:3])
        return pred, denoising_error(class_pred.float(), prior[3])

    def denoise_with_reference(
        self,
        model: nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        prior: tuple[torch.Tensor, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`denoise_with_prior`, plus the frozen reference model's (detached) prediction on the rows.

        With LoRA (and ``batch_reference_forward``) the reference rows join the trained forward with the
        adapters off for them: one UNet call instead of two, the same predictions. The rows never interact in
        the UNet, so the reference rows add nothing to the gradient.
        """
        comp, cfg = self.ctx.components, self.config
        batched = cfg.batch_reference_forward and not cfg.gradient_checkpointing and comp.can_mask_adapter_rows
        joint = prior is not None and cfg.prior_loss_weight > 0
        if not batched or (prior is not None and not joint):
            pred, class_error = self.denoise_with_prior(model, noisy, t, cond, prior)
            with torch.no_grad(), comp.reference_denoiser() as reference:
                return pred, class_error, reference(noisy, t, cond)
        rows, extra = len(noisy), (prior[:3] if joint else (noisy[:0], t[:0], cond[:0]))
        trained = rows + len(extra[0])
        mask = torch.zeros(trained + rows)
        mask[:trained] = 1.0
        with comp.adapters_on_rows(mask):
            out = model(torch.cat([noisy, extra[0], noisy]), torch.cat([t, extra[1], t]),
                        torch.cat([cond, extra[2], cond]))  # fmt: skip
        class_error = denoising_error(out[rows:trained].float(), prior[3]) if joint else None
        return out[:rows], class_error, out[trained:].detach()

    def add_prior(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor], class_error: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if class_error is None:
            return loss, parts
        return add_prior_preservation_loss(loss, parts, class_error, self.config.prior_loss_weight)
