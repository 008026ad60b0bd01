"""The faster paths give what the plain ones give: the reference in the trained forward (LoRA), and the
validation's own sampler, steps and batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from rpo_diffusers import RPOTrainer
from rpo_diffusers.testing.configs import tiny_config


def lora_trainer(tiny_sd_dir, tmp_path, scorer, references, **overrides) -> RPOTrainer:
    cfg = tiny_config(tiny_sd_dir, tmp_path / "out", use_lora=True, learning_rate=1e-2, **overrides)
    return RPOTrainer(cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), scorer, references)


def randomize_adapters(unet: torch.nn.Module) -> None:
    """LoRA starts with lora_B = 0 (the adapters change nothing): give them weights that matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_masked_rows_are_the_reference_model_and_the_others_the_trained_one(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    trainer = lora_trainer(tiny_sd_dir, tmp_path, clip_scorer, references)
    comp = trainer.components
    comp.add_lora(4, 4.0, trainer.config.lora_target_modules)
    randomize_adapters(comp.unet)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    cond = comp.encode_prompts(["a sks dog", "a dog"])
    with torch.no_grad():
        trained = comp.denoiser(x, t, cond)
        with comp.reference_denoiser() as ref:
            base = ref(x, t, cond)
        assert not torch.allclose(trained, base, atol=1e-4)  # the adapters matter
        with comp.adapters_on_rows(torch.tensor([1.0, 1.0, 0.0, 0.0])):
            both = comp.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]))
        after = comp.denoiser(x, t, cond)  # the mask is gone once the block ends
    torch.testing.assert_close(both[:2], trained, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[2:], base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after, trained)
    with pytest.raises(RuntimeError, match="rows"), comp.adapters_on_rows(torch.ones(3)):
        comp.denoiser(x, t, cond)


@pytest.mark.parametrize("prior", [False, True])
def test_one_forward_or_two_train_the_same_lora(tiny_sd_dir, tmp_path, clip_scorer, references, prior):
    # same seeds, same data: the batched reference changes how many UNet calls a step makes, not the model
    extra = {"with_prior_preservation": True, "num_class_images": 2} if prior else {}
    states, histories = [], []
    for batched in (True, False):
        trainer = lora_trainer(
            tiny_sd_dir,
            tmp_path / str(batched),
            clip_scorer,
            references,
            batch_reference_forward=batched,
            **extra,
        )
        losses: list[float] = []
        trainer.callbacks.append(
            lambda event, p, out=losses: out.append(p["loss"]) if event == "step" else None
        )
        trainer.train()
        states.append(trainer.components.trainable_state_dict())
        histories.append(losses)
    assert histories[0] == pytest.approx(histories[1], rel=1e-4, abs=1e-6)
    assert any(v.abs().max() > 0 for k, v in states[0].items() if "lora_B" in k)  # it trained
    for key in states[0]:  # float sums in another order, through 4 Adam steps at lr 1e-2: ~1e-3 of a weight
        torch.testing.assert_close(states[0][key], states[1][key], atol=2e-4, rtol=1e-3)


def test_validation_samples_with_its_own_steps_scheduler_and_batch(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    trainer = lora_trainer(
        tiny_sd_dir, tmp_path, clip_scorer, references, num_inference_steps=3,
        validation_num_inference_steps=2, validation_sampling_scheduler="DDIMScheduler", validation_batch_size=8,
        generation_batch_size=1,
    )  # fmt: skip
    calls: list[tuple[int, int, str]] = []
    pipe = trainer.components.pipeline
    original = pipe.__call__

    def record(prompts, **kwargs):  # the real pipeline runs; the call's settings are noted
        calls.append((len(prompts), kwargs["num_inference_steps"], type(pipe.scheduler).__name__))
        return original(prompts, **kwargs)

    pipe.__class__ = type("Recorded", (type(pipe),), {"__call__": lambda self, p, **kw: record(p, **kw)})
    trainer.train()
    default = type(trainer.components._scheduler(None)).__name__
    generation = [c for c in calls if c[1] == 3]
    validation = [c for c in calls if c[1] == 2]
    assert generation and all(c == (1, 3, default) for c in generation)
    assert len(validation) == 3 and all(c == (8, 2, "DDIMScheduler") for c in validation)  # steps 0, 2, 4
    assert type(pipe.scheduler).__name__ == default  # restored after each validation


def test_sampling_with_merged_lora_keeps_the_base_weights_exactly(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    # LoRA is merged into the base weights while sampling; those weights are the frozen reference model
    trainer = lora_trainer(tiny_sd_dir, tmp_path, clip_scorer, references)
    comp = trainer.components
    comp.add_lora(4, 4.0, trainer.config.lora_target_modules)
    randomize_adapters(comp.unet)
    before = {k: v.detach().clone() for k, v in comp.unet.named_parameters()}
    prompts, seeds = ["a sks dog", "a dog on the Moon"], [1, 2]
    merged = comp.generate(prompts, seeds, 3, 2.0, 32)
    after = dict(comp.unet.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit, adapters included
    comp.is_lora = False  # the adapters stay attached and active, sampled without merging
    unmerged = comp.generate(prompts, seeds, 3, 2.0, 32)
    comp.is_lora = True
    base = comp.pipeline.unet
    base.disable_adapters()
    without = comp.generate(prompts, seeds, 3, 2.0, 32)
    base.enable_adapters()
    pixels = [torch.tensor(np.asarray(im), dtype=torch.int16) for im in (*merged, *unmerged, *without)]
    for m, u in zip(pixels[:2], pixels[2:4]):
        assert (m - u).abs().max() <= 1  # the same images, up to rounding
    assert any((m - w).abs().max() > 8 for m, w in zip(pixels[:2], pixels[4:]))  # the adapters were in them


def test_a_checkpoint_resumes_with_the_other_reference_batching(tiny_sd_dir, tmp_path, clip_scorer, references):
    # one UNet call or two is the same math: a run may switch it when it resumes (other settings are refused)
    lora_trainer(tiny_sd_dir, tmp_path, clip_scorer, references, max_train_steps=2, checkpointing_steps=2).train()
    resumed = lora_trainer(
        tiny_sd_dir, tmp_path, clip_scorer, references, max_train_steps=4, checkpointing_steps=2,
        batch_reference_forward=False, resume_from_checkpoint="latest",
    )  # fmt: skip
    assert resumed.train().global_step == 4
    with pytest.raises(ValueError, match="other settings"):
        lora_trainer(
            tiny_sd_dir, tmp_path, clip_scorer, references, max_train_steps=6, resume_from_checkpoint="latest",
            validation_num_inference_steps=1,
        ).train()  # fmt: skip


def test_validation_defaults_to_20_dpm_solver_steps_and_the_papers_50_ddim_steps_are_one_setting():
    """Validation is most of a run: by default it samples 20 DPM-Solver++ steps (the benchmarks measure that it
    picks the paper's checkpoint); the base model's training images keep the paper's 50 steps."""
    from rpo_diffusers.config import FAST_VALIDATION, PAPER_VALIDATION, RPOConfig

    cfg = RPOConfig()
    assert cfg.num_inference_steps == 50
    assert {k: getattr(cfg, k) for k in FAST_VALIDATION} == FAST_VALIDATION
    paper = RPOConfig(**PAPER_VALIDATION)
    assert (paper.validation_num_inference_steps, paper.validation_sampling_scheduler) == (50, "DDIMScheduler")
