"""Bradley-Terry preference labels for (reference, generated) pairs.

RPO pairs a reference photo ``x_ref`` with a generated image ``x_gen`` and its own prompt ``c``.
The probability that the reference is preferred is ``sigmoid(r(x_ref, c) - r(x_gen, c))``; a
label ``y ~ Bernoulli(p)`` is drawn again every epoch. The reward of a pair is always the reward of the
two images *in that pair* under *that pair's prompt* (the official code mixes them up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def bradley_terry_probability(reward_reference: torch.Tensor, reward_generated: torch.Tensor) -> torch.Tensor:
    """P(reference preferred) = sigmoid(r_ref - r_gen), elementwise."""
    return torch.sigmoid(torch.as_tensor(reward_reference) - torch.as_tensor(reward_generated))


def sample_preference_labels(
    probability: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw y ~ Bernoulli(p) (1.0 = reference preferred) with an optional seeded generator."""
    p = torch.as_tensor(probability, dtype=torch.float64)
    if torch.any((p < 0) | (p > 1)) or torch.any(torch.isnan(p)):
        raise ValueError("Preference probabilities must lie in [0, 1].")
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
    return (u < p).to(torch.float32)


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: which reference, which generated image, its prompt and the label."""

    reference_index: int
    generated_index: int
    prompt_index: int
    reward_reference: float
    reward_generated: float
    probability: float
    label: float


def epoch_pairs(
    generated_prompt_indices: list[int] | torch.Tensor,
    reference_rewards: torch.Tensor,
    generated_rewards: torch.Tensor,
    epoch: int,
    seed: int = 0,
) -> list[PreferencePair]:
    """Build one epoch of pairs: every generated image once, each with a random reference.

    Args:
        generated_prompt_indices: for each generated image, the index of the prompt it was made from.
        reference_rewards: ``[num_references, num_prompts]`` reward of each reference under each prompt.
        generated_rewards: ``[num_generated]`` reward of each generated image under its own prompt.
        epoch: epoch number; with ``seed`` it fixes the order, the reference choice and the labels, so
            an interrupted run resumes with exactly the same pairs.
        seed: base seed.

    Every generated image (hence every training prompt) is used once per epoch, and labels are drawn
    afresh for each epoch.
    """
    prompt_idx = torch.as_tensor(generated_prompt_indices, dtype=torch.long)
    ref_rewards = torch.as_tensor(reference_rewards, dtype=torch.float64)
    gen_rewards = torch.as_tensor(generated_rewards, dtype=torch.float64)
    num_gen = prompt_idx.numel()
    if gen_rewards.numel() != num_gen:
        raise ValueError("generated_rewards and generated_prompt_indices must have the same length.")
    if ref_rewards.ndim != 2 or ref_rewards.shape[0] == 0:
        raise ValueError(
            "reference_rewards must be [num_references, num_prompts] with at least one reference."
        )
    if num_gen and int(prompt_idx.max()) >= ref_rewards.shape[1]:
        raise ValueError("a generated image refers to a prompt with no reference reward.")
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    order = torch.randperm(num_gen, generator=gen)
    refs = torch.randint(ref_rewards.shape[0], (num_gen,), generator=gen)
    r_ref = ref_rewards[refs, prompt_idx[order]]
    r_gen = gen_rewards[order]
    prob = bradley_terry_probability(r_ref, r_gen)
    labels = sample_preference_labels(prob, generator=gen)
    return [
        PreferencePair(
            reference_index=int(refs[i]),
            generated_index=int(order[i]),
            prompt_index=int(prompt_idx[order[i]]),
            reward_reference=float(r_ref[i]),
            reward_generated=float(r_gen[i]),
            probability=float(prob[i]),
            label=float(labels[i]),
        )
        for i in range(num_gen)
    ]
