"""DPG's critic Q_φ: a small network that learns the look-forward reward, so the policy gets a gradient
through it even when the reward itself (VAE decode + DINO, any non-differentiable score) has none.

The shape follows DPG's released code (Conv 4->1 3x3, LeakyReLU, Linear, ReLU, Linear -> 1; about 262k
parameters at 64x64 latents), sized here from the latent shape instead of a hard-coded 64x64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CRITIC_INPUTS = ("residual", "latent")


def check_latent_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """A latent's ``(C, h, w)``, or a clear error for anything the critic cannot be sized from."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(
            f"The DPG critic is sized from a latent (channels, height, width); got shape {tuple(shape)}. "
            "Pass the VAE latent shape, e.g. (4, 64, 64) for 512 px Stable Diffusion."
        )
    return dims  # type: ignore[return-value]


def critic_input(x0_hat: torch.Tensor, x0: torch.Tensor, kind: str = "residual") -> torch.Tensor:
    """What the critic sees: the squared look-forward residual (x0_hat - x0)^2 (official) or x0_hat itself."""
    if kind == "residual":
        return (x0_hat.float() - x0.float()).pow(2)
    if kind == "latent":
        return x0_hat.float()
    raise ValueError(f"Unknown critic input {kind!r}: choose one of {', '.join(CRITIC_INPUTS)}.")


class LookForwardCritic(nn.Module):
    """Q_φ(input) -> one value per sample.

    Args:
        latent_shape: ``(C, h, w)`` of the latents it judges.
        hidden: width of the hidden layer (64 in DPG's code).
        seed: initialisation seed, so every rank and a rerun start from the same critic.
    """

    def __init__(self, latent_shape: Sequence[int], hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        channels, height, width = check_latent_shape(latent_shape)
        self.latent_shape = (channels, height, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(channels, 1, kernel_size=3, padding=1),
                nn.LeakyReLU(),
                nn.Flatten(),
                nn.Linear(height * width, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"The critic was sized for latents {self.latent_shape}, got {tuple(x.shape[1:])}."
            )
        return self.net(x.float()).squeeze(-1)
