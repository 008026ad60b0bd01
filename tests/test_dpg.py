"""DPG on the shared loop: look-forward math, the critic, the rewards on x0_hat, end-to-end runs and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.critic import LookForwardCritic, critic_input
from rpo_diffusers.data import to_pil_images
from rpo_diffusers.losses import (
    diffusion_target,
    dpg_policy_loss,
    latent_reconstruction_reward,
    look_forward,
    timestep_discount,
)
from rpo_diffusers.objectives import DPGObjective, DreamBoothObjective
from rpo_diffusers.rewards import DinoReward
from rpo_diffusers.testing.configs import tiny_config


def make_config(tiny_sd_dir, output_dir, **overrides) -> RPOConfig:
    """A DPG run on the tiny pipeline."""
    settings = dict(method="dpg", learning_rate=1e-3, train_prompts=["a sks dog on the beach", "a sks dog in the snow"])
    return tiny_config(tiny_sd_dir, output_dir, **{**settings, **overrides})


def make_trainer(tiny_sd_dir, output_dir, scorer, references, objective=None, **overrides) -> RPOTrainer:
    cfg = make_config(tiny_sd_dir, output_dir, **overrides)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    return RPOTrainer(cfg, pipe, scorer, references, objective=objective)


def ready(trainer: RPOTrainer) -> DPGObjective:
    """Set the objective up on the training set, as train() does before the first step."""
    trainer.components.freeze_reference()
    trainer.objective.setup(trainer, trainer.prepare_training_set())
    return trainer.objective


# --------------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_look_forward_is_exact_for_the_true_target(prediction_type):
    sched = DDPMScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 400, 800, 999])
    noisy = sched.add_noise(x0, noise, t)
    x0_hat = look_forward(sched, noisy, diffusion_target(sched, x0, noise, t), t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    wrong = look_forward(sched, noisy, torch.zeros_like(noise), t)
    assert (wrong - x0).abs().max() > 0.1


def test_discount_is_per_sample():
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(timestep_discount(t, 0.9986), torch.tensor([1.0, 0.9986**500, 0.9986**999]))
    values = torch.tensor([1.0, 2.0, -1.0])
    expected = -0.5 * (1.0 + 2.0 * 0.9986**500 - 0.9986**999) / 3
    assert float(dpg_policy_loss(values, t, 0.9986, weight=0.5)) == pytest.approx(expected, rel=1e-6)
    # the official code's bug: the first sample's t for the whole batch gives another value
    assert float(dpg_policy_loss(values, t, 0.9986, 0.5)) != pytest.approx(-0.5 * float(values.mean()))


def test_critic_is_sized_from_the_latent_shape_and_learns_a_known_reward():
    critic = LookForwardCritic((4, 64, 64))
    assert 250_000 < sum(p.numel() for p in critic.parameters()) < 270_000  # DPG's ~262k at 64x64
    small = LookForwardCritic((4, 16, 16), seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 16, 16, generator=g)
    x0_hat = x0 + torch.rand(64, 1, 1, 1, generator=g) * torch.randn(x0.shape, generator=g)
    inputs = critic_input(x0_hat, x0)
    reward = latent_reconstruction_reward(x0_hat, x0)
    with torch.no_grad():
        untrained = float(torch.nn.functional.mse_loss(small(inputs), reward))
    opt = torch.optim.SGD(small.parameters(), lr=0.01)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(small(inputs), reward)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = float(torch.nn.functional.mse_loss(small(inputs), reward))
    bound = 0.05 * float(reward.var())
    assert trained < bound < untrained, (trained, bound, untrained)
    with pytest.raises(ValueError, match=r"sized for latents \(4, 16, 16\)"):
        small(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="channels, height, width"):
        LookForwardCritic((768,))


# --------------------------------------------------------------------------------------------------
# gradients through the objective
# --------------------------------------------------------------------------------------------------


def _unet_grad(trainer, objective, positions=(0, 1)):
    unet = trainer.components.unet
    unet.zero_grad(set_to_none=True)
    loss, parts = objective.loss(
        trainer.components.denoiser, list(positions), torch.Generator().manual_seed(5)
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return loss, parts, grads


def test_policy_gradient_reaches_the_unet_through_the_critic(tiny_sd_dir, tmp_path, clip_scorer, references):
    trainer = make_trainer(
        tiny_sd_dir, tmp_path, clip_scorer, references, sim_loss_weight=0.0, train_batch_size=2
    )
    dpg = ready(trainer)
    critic = dpg.critic.module
    before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    _, parts, grads = _unet_grad(trainer, dpg)
    assert grads and max(float(g.abs().max()) for g in grads.values()) > 0, "no gradient reached the UNet"
    # the critic's gradient comes from its own MSE only: the same as that loss's gradient alone
    assert math.isfinite(float(parts["loss_critic"])) and "reward" in parts
    critic_grads = {n: p.grad.clone() for n, p in critic.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in critic.named_parameters())
    critic.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(
        critic(critic_input(*_x0_hat_and_x0(trainer, dpg))), _reward(trainer, dpg)
    ).backward()
    for n, p in critic.named_parameters():
        torch.testing.assert_close(critic_grads[n], p.grad, atol=1e-6, rtol=1e-5)


def _x0_hat_and_x0(trainer, dpg, positions=(0, 1)):
    g = torch.Generator().manual_seed(5)
    x0, noisy, t, cond, _ = dpg.reference_batch(list(positions), g)
    with torch.no_grad():
        pred = trainer.components.denoiser(noisy, t, cond)
    return look_forward(trainer.components.noise_scheduler, noisy, pred, t), x0


def _reward(trainer, dpg):
    x0_hat, x0 = _x0_hat_and_x0(trainer, dpg)
    return latent_reconstruction_reward(x0_hat, x0)


def test_without_a_critic_the_gradient_is_the_rewards_own(tiny_sd_dir, tmp_path, clip_scorer, references):
    trainer = make_trainer(
        tiny_sd_dir, tmp_path, clip_scorer, references, sim_loss_weight=0.0, train_batch_size=2,
        dpg_critic="none", dpg_weight=0.7,
    )  # fmt: skip
    dpg = ready(trainer)
    assert dpg.auxiliary_parts() == []
    _, _, grads = _unet_grad(trainer, dpg)
    # the same loss written out by hand
    unet = trainer.components.unet
    unet.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(5)
    x0, noisy, t, cond, _ = dpg.reference_batch([0, 1], g)
    x0_hat = look_forward(
        trainer.components.noise_scheduler, noisy, trainer.components.denoiser(noisy, t, cond), t
    )
    reward = -((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    (-0.7 * (0.9986 ** t.double()).float() * reward).mean().backward()
    manual = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert manual.keys() == grads.keys()
    for n in manual:
        torch.testing.assert_close(grads[n], manual[n], atol=1e-7, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# rewards on x0_hat
# --------------------------------------------------------------------------------------------------


def test_dino_reward_matches_a_direct_computation(tiny_vit_dir, sample_images, references):
    from transformers import ViTModel

    from rpo_diffusers.data import images_to_tensor

    reward = DinoReward.from_pretrained(tiny_vit_dir)
    reward.set_reference_images(references)
    vit = ViTModel.from_pretrained(tiny_vit_dir, add_pooling_layer=False).eval()

    def cls(pixels01):
        x = (pixels01 - 0.5) / 0.5  # ViTImageProcessor's mean and std
        return torch.nn.functional.normalize(vit(pixel_values=x).last_hidden_state[:, 0], dim=-1)

    images = (images_to_tensor(sample_images, 32) + 1) / 2
    refs = (images_to_tensor(references, 32) + 1) / 2
    with torch.no_grad():
        expected = (cls(images) @ cls(refs).T).mean(dim=1)
    rewards, _ = reward(images, ["a sks dog"] * len(images), {})
    torch.testing.assert_close(torch.tensor(rewards), expected, atol=1e-5, rtol=1e-5)
    assert len(set(round(r, 5) for r in rewards)) > 1
    pixels = images.clone().requires_grad_(True)
    reward.reward(pixels).sum().backward()
    assert pixels.grad.abs().sum() > 0, "the DINO reward should be differentiable"


def test_lambda_harmonic_reward_on_decoded_x0_hat_is_the_scorers(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    trainer = make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references, dpg_reward="lambda_harmonic")
    dpg = ready(trainer)
    x0_hat, x0 = _x0_hat_and_x0(trainer, dpg)
    with torch.no_grad():
        observed = dpg.observe_reward(x0_hat, x0)
        images = to_pil_images(trainer.components.decode_pixels(x0_hat).cpu())
    direct = clip_scorer.score(
        images, trainer.config.instance_prompt, lambda_=trainer.config.lambda_val
    ).reward
    torch.testing.assert_close(observed.cpu(), direct, atol=1e-5, rtol=1e-5)


def test_a_custom_trl_reward_function_trains_through_the_critic(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    seen = []

    def brightness(images, prompts, metadata):
        seen.append((tuple(images.shape), list(prompts)))
        return images.mean(dim=(1, 2, 3)).tolist(), {}

    cfg = make_config(tiny_sd_dir, tmp_path, max_train_steps=2)
    trainer = RPOTrainer(
        cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
        objective=DPGObjective(cfg, reward_fn=brightness),
    )  # fmt: skip
    result = trainer.train()
    assert seen and seen[0][0][1:] == (3, 32, 32) and seen[0][1] == [cfg.instance_prompt]
    history = json.loads((tmp_path / "rpo_history.json").read_text())
    assert history["method"] == "dpg" and history["reward"] == "brightness"
    assert result.global_step == 2


# --------------------------------------------------------------------------------------------------
# end to end, resume, prior preservation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lora", [True, False])
def test_dpg_trains_and_exports_with_prior_preservation_and_batch_2(
    tiny_sd_dir, tmp_path, clip_scorer, references, use_lora
):
    steps = []
    cfg = make_config(
        tiny_sd_dir, tmp_path, use_lora=use_lora, with_prior_preservation=True, num_class_images=2,
        train_batch_size=2, early_stopping=False,
    )  # fmt: skip
    trainer = RPOTrainer(
        cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
        callbacks=[lambda e, p: steps.append(p) if e == "step" else None],
    )  # fmt: skip
    result = trainer.train()
    assert result.best_step == 4 and len(steps) == 4
    for s in steps:
        assert {"loss", "loss_sim", "loss_prior", "loss_dpg", "reward", "loss_critic"} <= s.keys()
        assert s["reward"] <= 0  # the latent reconstruction reward is a negative error
    assert not (tmp_path / "training_images").exists(), "DPG needs no base-model training images"
    history = json.loads((tmp_path / "rpo_history.json").read_text())
    assert history["method"] == "dpg" and history["critic"] == "residual"
    assert "look-forward" in history["reward"]
    name = "pytorch_lora_weights.safetensors" if use_lora else "rpo_unet.safetensors"
    assert (tmp_path / name).exists()


def test_dpg_resume_reproduces_the_uninterrupted_run_with_the_critic(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    common = dict(max_train_steps=6, validation_steps=2, checkpointing_steps=2, seed=3, use_lora=True)
    steps = {"full": [], "resumed": []}

    def run(out, key, **kw):
        cfg = make_config(tiny_sd_dir, out, **{**common, **kw})
        t = RPOTrainer(
            cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
            callbacks=[lambda e, p: steps[key].append(p) if e == "step" and key else None],
        )  # fmt: skip
        return t, t.train()

    full_t, full = run(tmp_path / "a", "full")
    run(tmp_path / "b", None, max_train_steps=4)
    assert (tmp_path / "b/checkpoint-4/model.safetensors").exists(), "the critic is checkpointed"
    resumed_t, resumed = run(tmp_path / "b", "resumed", resume_from_checkpoint="latest")
    assert [s["step"] for s in steps["resumed"]] == [5, 6]
    for key in ("loss", "loss_critic", "reward"):
        assert [s[key] for s in steps["resumed"]] == pytest.approx(
            [s[key] for s in steps["full"][4:]], rel=1e-4
        )
    assert [h["reward"] for h in resumed.history] == pytest.approx(
        [h["reward"] for h in full.history], abs=1e-6
    )
    a, b = full_t.objective.critic.module.state_dict(), resumed_t.objective.critic.module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    critic_file = load_file(str(tmp_path / "b/checkpoint-6/model.safetensors"))
    assert critic_file.keys() == a.keys()


def test_dreambooth_method_trains_on_references_only(tiny_sd_dir, tmp_path, clip_scorer, references):
    steps = []
    cfg = make_config(tiny_sd_dir, tmp_path, method="dreambooth", max_train_steps=3)
    trainer = RPOTrainer(
        cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
        callbacks=[lambda e, p: steps.append(p) if e == "step" else None],
    )  # fmt: skip
    assert isinstance(trainer.objective, DreamBoothObjective)
    trainer.train()
    assert all(set(s) >= {"loss", "loss_sim"} and "loss_pref" not in s for s in steps)
    assert all(s["loss"] == s["loss_sim"] for s in steps)
    assert not (tmp_path / "training_images").exists()
    assert cfg.max_train_steps == 3 and cfg.learning_rate == 1e-3
    # every reference is visited once per epoch
    picked = [
        int(i) for s in range(6) for i in trainer.objective.reference_sampler(trainer.sample_positions(s, 0))
    ]
    assert sorted(picked[:3]) == sorted(picked[3:]) == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# bad input: clear errors before any model loads
# --------------------------------------------------------------------------------------------------


def test_method_defaults_follow_the_papers(tiny_sd_dir, tmp_path):
    dpg = RPOConfig(method="dpg", output_dir=str(tmp_path))
    assert (dpg.max_train_steps, dpg.learning_rate, dpg.dpg_gamma, dpg.dpg_weight) == (
        1000,
        1e-6,
        0.9986,
        1.0,
    )
    assert RPOConfig(method="dpg", use_lora=True).learning_rate == 1e-4
    rpo = RPOConfig()
    assert (rpo.method, rpo.max_train_steps, rpo.learning_rate) == ("rpo", 400, 5e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "ddpo"}, "Unknown method 'ddpo': choose one of rpo, dreambooth, dpg"),
        ({"dpg_weight": -0.1}, r"dpg_weight \(λ_dpg\) must be a number >= 0"),
        ({"dpg_gamma": 0.0}, r"dpg_gamma must be in \(0, 1\]"),
        ({"dpg_gamma": 1.5}, r"dpg_gamma must be in \(0, 1\]"),
        ({"dpg_gamma": float("nan")}, r"dpg_gamma must be in \(0, 1\]"),
        ({"dpg_reward": "clip"}, "dpg_reward must be one of latent, dino, lambda_harmonic"),
        ({"dpg_critic": "mlp"}, "dpg_critic must be one of residual, latent, none"),
        ({"dpg_critic": "none", "dpg_reward": "lambda_harmonic"}, "has no gradient: use a critic"),
        ({"dpg_critic_learning_rate": 0.0}, "dpg_critic_learning_rate must be a positive number"),
        ({"sim_loss_weight": -1.0}, "sim_loss_weight must be a number >= 0"),
    ],
)
def test_bad_dpg_settings_are_refused(tiny_sd_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tiny_sd_dir, tmp_path, **overrides)


def test_a_reward_model_without_an_image_tower_is_refused_before_loading(tmp_path, tiny_sd_dir, references):
    text_only = tmp_path / "bert"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    cfg = make_config(tiny_sd_dir, tmp_path / "out", dpg_reward="dino", dpg_reward_model=str(text_only))
    with pytest.raises(ValueError, match="bert with no image tower"):
        RPOTrainer(cfg, reference_images=references)  # would load the pipeline and scorer after this check


@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_dpg_trains_in_half_precision(tiny_sd_dir, tmp_path, clip_scorer, references, mixed_precision):
    cfg = make_config(tiny_sd_dir, tmp_path, use_lora=True, mixed_precision=mixed_precision, max_train_steps=2)
    steps = []
    from accelerate import Accelerator

    trainer = RPOTrainer(  # the accelerator handed over: fp16 is refused on a CPU otherwise (GPU code path here)
        cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
        accelerator=Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision),
        callbacks=[lambda e, p: steps.append(p) if e == "step" else None],
    )  # fmt: skip
    trainer.train()
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and math.isfinite(s["loss_critic"]) for s in steps)
    assert all(p.dtype == torch.float32 for p in trainer.objective.critic.module.parameters())


def test_dpg_on_a_v_prediction_model(tmp_path, clip_scorer, references):
    from rpo_diffusers.testing.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "sd-v", prediction_type="v_prediction")
    trainer = make_trainer(tmp_path / "sd-v", tmp_path / "out", clip_scorer, references, max_train_steps=2)
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    result = trainer.train()
    assert result.global_step == 2 and json.loads((tmp_path / "out/rpo_history.json").read_text())["method"] == "dpg"
