"""The pure math: λ-harmonic mean, Bradley-Terry labels, the RPO loss."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from rpo_diffusers.losses import (
    denoising_error,
    diffusion_target,
    implicit_accuracy,
    preference_loss,
    preference_margin,
    rpo_loss,
)
from rpo_diffusers.preferences import bradley_terry_probability, epoch_pairs, sample_preference_labels
from rpo_diffusers.rewards import check_lambda, cosine_to_unit, lambda_harmonic


def test_lambda_harmonic_matches_paper_examples():
    assert lambda_harmonic(0.9, 0.01, 0.5) == pytest.approx(0.0198, abs=5e-5)
    assert lambda_harmonic(0.7, 0.21, 0.5) == pytest.approx(0.323, abs=5e-4)


def test_lambda_harmonic_endpoints_and_formula():
    assert lambda_harmonic(0.8, 0.3, 1.0) == pytest.approx(0.8)
    assert lambda_harmonic(0.8, 0.3, 0.0) == pytest.approx(0.3)
    lam, i, t = 0.3, 0.62, 0.41
    assert lambda_harmonic(i, t, lam) == pytest.approx(1 / (lam / i + (1 - lam) / t))
    # Harmonic mean lies between min and max and favours the smaller one.
    v = lambda_harmonic(0.9, 0.1, 0.5)
    assert 0.1 < v < (0.9 + 0.1) / 2


def test_lambda_harmonic_tensors_keep_dtype_and_guard_zero():
    i = torch.tensor([0.5, 0.0], dtype=torch.float32)
    t = torch.tensor([0.5, 0.5], dtype=torch.float32)
    out = lambda_harmonic(i, t, 0.5)
    assert out.dtype == torch.float32
    assert out[0].item() == pytest.approx(0.5)
    assert torch.isfinite(out).all() and out[1].item() < 1e-6


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), 2])
def test_lambda_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_lambda(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lambda_harmonic(0.5, 0.5, bad)


def test_cosine_to_unit_range():
    assert cosine_to_unit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_bradley_terry_label_frequency_matches_probability():
    r_ref = torch.tensor([0.9, 0.5, 0.2])
    r_gen = torch.tensor([0.1, 0.5, 0.8])
    p = bradley_terry_probability(r_ref, r_gen)
    assert p[1].item() == pytest.approx(0.5)
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(-0.8)))
    n = 20000
    g = torch.Generator().manual_seed(0)
    labels = sample_preference_labels(p.repeat(n, 1), generator=g)
    freq = labels.mean(dim=0)
    # 4 sigma of a Bernoulli mean over 20k draws is < 0.015: a wrong probability fails this.
    assert torch.allclose(freq, p.float(), atol=0.015)


def test_epoch_pairs_use_every_prompt_and_tie_rewards_to_their_pair():
    num_prompts, per_prompt, num_refs = 8, 4, 3
    prompt_idx = [p for p in range(num_prompts) for _ in range(per_prompt)]
    ref_rewards = torch.rand(num_refs, num_prompts, generator=torch.Generator().manual_seed(1))
    gen_rewards = torch.rand(len(prompt_idx), generator=torch.Generator().manual_seed(2))
    pairs = epoch_pairs(prompt_idx, ref_rewards, gen_rewards, epoch=0, seed=7)
    assert sorted(p.generated_index for p in pairs) == list(range(len(prompt_idx)))
    assert {p.prompt_index for p in pairs} == set(range(num_prompts))
    for p in pairs:
        assert p.prompt_index == prompt_idx[p.generated_index]
        assert p.reward_generated == pytest.approx(gen_rewards[p.generated_index].item())
        assert p.reward_reference == pytest.approx(ref_rewards[p.reference_index, p.prompt_index].item())
        assert p.probability == pytest.approx(1 / (1 + math.exp(p.reward_generated - p.reward_reference)))
    again = epoch_pairs(prompt_idx, ref_rewards, gen_rewards, epoch=0, seed=7)
    assert again == pairs
    other = epoch_pairs(prompt_idx, ref_rewards, gen_rewards, epoch=1, seed=7)
    assert [p.generated_index for p in other] != [p.generated_index for p in pairs]


def test_denoising_error_is_per_sample_mean():
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # [2, 1, 1, 2]
    target = torch.zeros_like(pred)
    assert denoising_error(pred, target).tolist() == [2.5, 0.0]


def test_diffusion_target_epsilon_and_v():
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    ab = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    assert torch.allclose(diffusion_target(v, latents, noise, t), expected, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_preference_margin_sign_and_loss_by_hand():
    # θ improves on the reference (1.0 -> 0.4) but not on the generated image: d > 0.
    d = preference_margin(torch.tensor([1.0]), torch.tensor([0.4]), torch.tensor([0.5]), torch.tensor([0.5]))
    assert d.item() == pytest.approx(0.6)
    y = torch.tensor([1.0])
    beta = 2.0
    expected = -math.log(1 / (1 + math.exp(-beta * 0.6)))
    assert preference_loss(d, y, beta).item() == pytest.approx(expected, rel=1e-6)
    expected0 = -math.log(1 / (1 + math.exp(beta * 0.6)))
    assert preference_loss(d, torch.tensor([0.0]), beta).item() == pytest.approx(expected0, rel=1e-6)
    assert implicit_accuracy(d, y).item() == 1.0
    assert implicit_accuracy(d, torch.tensor([0.0])).item() == 0.0


def test_rpo_loss_total_and_gradients():
    e_theta_ref = torch.tensor([0.3, 0.6], requires_grad=True)
    e_theta_gen = torch.tensor([0.5, 0.2], requires_grad=True)
    e_ref_ref = torch.tensor([0.4, 0.5])
    e_ref_gen = torch.tensor([0.45, 0.25])
    y = torch.tensor([1.0, 0.0])
    total, parts = rpo_loss(
        e_theta_ref, e_ref_ref, e_theta_gen, e_ref_gen, y, beta=1.0, preference_weight=0.5
    )
    d = (e_ref_ref - e_theta_ref) - (e_ref_gen - e_theta_gen)
    lp = -(y * torch.log(torch.sigmoid(d)) + (1 - y) * torch.log(torch.sigmoid(-d))).mean()
    assert total.item() == pytest.approx((e_theta_ref.mean() + 0.5 * lp).item(), rel=1e-6)
    assert parts["loss_sim"].item() == pytest.approx(0.45)
    total.backward()
    assert e_theta_gen.grad is not None and e_theta_gen.grad.abs().sum() > 0
    # Without the preference term, generated images get no gradient.
    e_theta_gen.grad = None
    total0, _ = rpo_loss(e_theta_ref, e_ref_ref, e_theta_gen, e_ref_gen, y, preference_weight=0.0)
    total0.backward()
    assert e_theta_gen.grad is None
