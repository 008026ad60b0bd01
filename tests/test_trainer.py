"""RPOTrainer on a tiny Stable Diffusion: the loop trains, selects, exports, resumes and fails cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.components import DiffusersComponents
from rpo_diffusers.export import LORA_DIFFUSERS_FILENAME
from rpo_diffusers.rewards import ScoreResult
from rpo_diffusers.testing.configs import tiny_config
from rpo_diffusers.trainer import NonFiniteLossError


class ScriptedScorer:
    """Training rewards from a seeded RNG; validation rewards from a script (so the best step is known)."""

    def __init__(self, validation_rewards: list[float], lambda_val: float = 0.5):
        self.validation_rewards = list(validation_rewards)
        self.lambda_val = lambda_val
        self.rng = torch.Generator().manual_seed(0)
        self.calls = 0

    def set_reference_images(self, images):
        self.num_refs = len(images)

    def score(self, images, prompts, reference_images=None, lambda_=None):
        n = len(images)
        if lambda_ == self.lambda_val:
            value = self.validation_rewards[self.calls]
            self.calls += 1
            r = torch.full((n,), value)
        else:
            r = torch.rand(n, generator=self.rng)
        return ScoreResult(image_alignment=r, text_alignment=r, reward=r, lambda_=float(lambda_ or 0))


def make_config(tiny_sd_dir: Path, output_dir: Path, **overrides) -> RPOConfig:
    return tiny_config(tiny_sd_dir, output_dir, **overrides)


def _cpu_accelerator(mixed_precision: str):
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def make_trainer(tiny_sd_dir, tmp_path, scorer, references, **overrides) -> RPOTrainer:
    cfg = make_config(tiny_sd_dir, tmp_path / "out", **overrides)
    return RPOTrainer(cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), scorer, references)


def test_pairs_tie_rewards_to_their_images_and_use_every_prompt(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    trainer = make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references, images_per_prompt=2)
    generated, prompt_idx = trainer.generate_training_images()
    assert len(generated) == 16 and sorted(set(prompt_idx)) == list(range(8))
    manifest = json.loads((tmp_path / "out/training_images/manifest.json").read_text())
    assert [e["prompt"] for e in manifest["images"]] == [trainer.config.train_prompts[i] for i in prompt_idx]
    rpo = trainer.objective
    rpo.setup(trainer, trainer.prepare_training_set(generated, prompt_idx))
    # The reward of a generated image is its own reward under its own prompt.
    direct = clip_scorer.score(
        generated, [trainer.config.train_prompts[i] for i in prompt_idx], lambda_=0.0
    ).reward
    assert torch.allclose(rpo.generated_rewards, direct, atol=1e-6)
    seen_prompts, seen_images = set(), set()
    for step in range(16):
        (pair,) = rpo.pairs(trainer.sample_positions(step, 0))
        assert pair.prompt_index == prompt_idx[pair.generated_index]
        assert pair.reward_generated == pytest.approx(float(rpo.generated_rewards[pair.generated_index]))
        assert pair.reward_reference == pytest.approx(
            float(rpo.reference_rewards[pair.reference_index, pair.prompt_index])
        )
        seen_prompts.add(pair.prompt_index)
        seen_images.add(pair.generated_index)
    assert seen_prompts == set(range(8)) and seen_images == set(range(16))  # one epoch = every image once
    # Rewards are recorded on disk next to the images, and a rerun reuses them.
    manifest = json.loads((tmp_path / "out/training_images/manifest.json").read_text())
    assert manifest["images"][0]["reward"] == pytest.approx(float(direct[0]), abs=1e-6)
    mtime = (tmp_path / "out/training_images" / manifest["images"][0]["file"]).stat().st_mtime_ns
    trainer.generate_training_images()
    assert (tmp_path / "out/training_images" / manifest["images"][0]["file"]).stat().st_mtime_ns == mtime


def test_similarity_loss_goes_down_on_a_fixed_batch(tiny_sd_dir, tmp_path, clip_scorer, references):
    trainer = make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references, learning_rate=2e-3)
    trainer.objective.setup(trainer, trainer.prepare_training_set(*trainer.generate_training_images()))
    comp = trainer.components
    comp.freeze_reference()
    params = comp.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=2e-3)
    positions = trainer.sample_positions(0, 0)
    losses = []
    for _ in range(150):
        loss, parts = trainer.objective.loss(comp.denoiser, positions, torch.Generator().manual_seed(123))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(parts["loss_sim"]))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def _unet_params(unet, lora: bool):
    # peft renames a wrapped layer's weight to "<layer>.base_layer.weight": compare by the original name.
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in unet.named_parameters()
        if ("lora_" in k) == lora
    }


@pytest.mark.parametrize("use_lora", [True, False])
def test_training_changes_only_what_it_should_and_reference_stays(
    tiny_sd_dir, tmp_path, clip_scorer, references, use_lora
):
    trainer = make_trainer(
        tiny_sd_dir,
        tmp_path,
        clip_scorer,
        references,
        use_lora=use_lora,
        max_train_steps=6,
        validation_steps=6,
        learning_rate=1e-3,
    )
    comp = trainer.components
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    cond = comp.encode_prompts(["a sks dog", "a dog"])
    with torch.no_grad():
        before = comp.denoiser(x, t, cond)
    base_before = _unet_params(comp.unet, lora=False)
    trainer.train()
    with torch.no_grad(), comp.reference_denoiser() as ref:
        assert torch.allclose(ref(x, t, cond), before, atol=1e-6), "the reference model moved"
    with torch.no_grad():
        after = comp.denoiser(x, t, cond)
    assert not torch.allclose(after, before, atol=1e-6), "training did not change the model"
    base_after = _unet_params(comp.unet, lora=False)
    changed = [k for k in base_before if not torch.equal(base_before[k], base_after[k])]
    if use_lora:
        assert not changed, f"LoRA training changed base weights: {changed[:3]}"
        assert all(p.requires_grad == ("lora_" in n) for n, p in comp.unet.named_parameters())
    else:
        assert changed


def snapshot_at_validations(trainer: RPOTrainer) -> dict[int, dict[str, torch.Tensor]]:
    """The trainable weights at every validation step, filled in as training runs."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(event: str, payload: dict) -> None:
        if event == "validation":
            snapshots[payload["step"]] = trainer.components.trainable_state_dict()

    trainer.callbacks.append(keep)
    return snapshots


def test_early_stopping_picks_the_best_validation_and_exports_it(tiny_sd_dir, tmp_path, references):
    # validations at steps 0, 2, 4, 6, 8 -> best at 4, patience 2 stops after step 8 (max is 12).
    scorer = ScriptedScorer([0.1, 0.3, 0.7, 0.4, 0.2, 0.9, 0.9])
    trainer = make_trainer(
        tiny_sd_dir, tmp_path, scorer, references, max_train_steps=12, patience=2, learning_rate=1e-3
    )
    snapshots = snapshot_at_validations(trainer)
    result = trainer.train()
    assert [h["step"] for h in result.history] == [0, 2, 4, 6, 8]
    assert result.best_step == 4 and result.best_reward == pytest.approx(0.7)
    assert result.stopped_early and result.global_step == 8
    exported = load_file(str(tmp_path / "out/rpo_unet.safetensors"))
    best = snapshots[4]
    for name, value in best.items():
        assert torch.equal(exported[name.removeprefix("unet.")], value)
    assert not torch.equal(exported["conv_in.weight"], snapshots[8]["unet.conv_in.weight"])
    history = json.loads((tmp_path / "out/rpo_history.json").read_text())
    assert history["best_step"] == 4 and len(history["history"]) == 5
    assert (tmp_path / "out/reward_plot.png").exists() and (tmp_path / "out/before_after.png").exists()
    card = (tmp_path / "out/README.md").read_text()
    assert card.startswith("---") and "instance_prompt" in card and "step **4**" in card


def test_without_early_stopping_the_last_step_is_exported(tiny_sd_dir, tmp_path, references):
    # the same rewards as above: the best is at step 4, but the DreamBooth-style baseline keeps step 6
    scorer = ScriptedScorer([0.1, 0.3, 0.7, 0.4])
    trainer = make_trainer(
        tiny_sd_dir, tmp_path, scorer, references, max_train_steps=6, early_stopping=False, learning_rate=1e-3
    )
    snapshots = snapshot_at_validations(trainer)
    result = trainer.train()
    assert [h["step"] for h in result.history] == [0, 2, 4, 6]
    assert result.best_step == 6 and result.best_reward == pytest.approx(0.4) and not result.stopped_early
    exported = load_file(str(tmp_path / "out/rpo_unet.safetensors"))
    for name, value in snapshots[6].items():
        assert torch.equal(exported[name.removeprefix("unet.")], value)
    assert not torch.equal(exported["conv_in.weight"], snapshots[4]["unet.conv_in.weight"])
    assert json.loads((tmp_path / "out/rpo_history.json").read_text())["early_stopping"] is False
    with pytest.raises(ValueError, match="needs early_stopping=True"):
        make_config(tiny_sd_dir, tmp_path, early_stopping=False, patience=2)


def test_exported_full_pipeline_reproduces_the_model(tiny_sd_dir, tmp_path, clip_scorer, references):
    scorer = ScriptedScorer([0.1, 0.5, 0.9])  # best = last step, so the in-memory model is the exported one
    trainer = make_trainer(tiny_sd_dir, tmp_path, scorer, references, learning_rate=1e-3)
    trainer.train()
    args = (["a sks dog on the Moon", "a sks dog"], [1, 2], 3, 2.0, 32)
    mine = trainer.components.generate(*args)
    loaded = DiffusersComponents(StableDiffusionPipeline.from_pretrained(tmp_path / "out")).generate(*args)
    for a, b in zip(mine, loaded):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    base = DiffusersComponents(StableDiffusionPipeline.from_pretrained(tiny_sd_dir)).generate(*args)
    assert any(
        np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 1 for a, b in zip(mine, base)
    )


def test_exported_lora_reproduces_the_model(tiny_sd_dir, tmp_path, references):
    scorer = ScriptedScorer([0.1, 0.5, 0.9])
    trainer = make_trainer(
        tiny_sd_dir, tmp_path, scorer, references, use_lora=True, rank=4, lora_alpha=8, learning_rate=5e-2
    )
    trainer.train()
    args = (["a sks dog on the Moon", "a sks dog"], [1, 2], 3, 2.0, 32)
    mine = trainer.components.generate(*args)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base = DiffusersComponents(pipe).generate(*args)
    pipe.load_lora_weights(tmp_path / "out", weight_name=LORA_DIFFUSERS_FILENAME)  # diffusers < 0.40 offline
    loaded = DiffusersComponents(pipe).generate(*args)
    for a, b in zip(mine, loaded):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert any(
        np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 1 for a, b in zip(mine, base)
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_mixed_precision_trains_and_exports_fp32_weights(
    tiny_sd_dir, tmp_path, clip_scorer, references, precision, use_lora
):
    # the half-precision frozen parts, the fp32 trained UNet / LoRA and the frozen reference copy must all
    # meet in generation, the loss and validation (a dtype mismatch crashed every fp16/bf16 run on a GPU)
    cfg = make_config(
        tiny_sd_dir, tmp_path / "out", mixed_precision=precision, use_lora=use_lora, max_train_steps=2,
        validation_steps=2, learning_rate=1e-3,
    )  # fmt: skip
    # fp16 is refused on a CPU unless the caller hands over the accelerator; here that runs the GPU's code path
    # (half-precision frozen parts) with CPU arithmetic
    trainer = RPOTrainer(
        cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references,
        accelerator=_cpu_accelerator(precision),
    )  # fmt: skip
    result = trainer.train()
    assert [h["step"] for h in result.history] == [0, 2]
    assert all(math.isfinite(h["reward"]) for h in result.history)
    trained = [p for p in trainer.components.trainable_parameters()]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    name = "pytorch_lora_weights.safetensors" if use_lora else "rpo_unet.safetensors"
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "out" / name)).values())


def test_v_prediction_model_trains(tmp_path, clip_scorer, references):
    from rpo_diffusers.testing.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "sd-v", prediction_type="v_prediction")
    trainer = make_trainer(tmp_path / "sd-v", tmp_path, clip_scorer, references, max_train_steps=2)
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    losses = []
    trainer.callbacks.append(lambda e, p: losses.append(p["loss"]) if e == "step" else None)
    result = trainer.train()
    assert len(losses) == 2 and all(np.isfinite(losses)) and result.global_step == 2


def test_resume_gives_the_same_history_as_an_uninterrupted_run(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    common = dict(max_train_steps=6, validation_steps=2, checkpointing_steps=2, learning_rate=1e-3, seed=3)
    full = make_trainer(tiny_sd_dir, tmp_path / "a", clip_scorer, references, **common).train()
    interrupted = make_trainer(
        tiny_sd_dir, tmp_path / "b", clip_scorer, references, **{**common, "max_train_steps": 4}
    )
    interrupted.train()
    assert (tmp_path / "b/out/checkpoint-4").is_dir()
    resumed = make_trainer(
        tiny_sd_dir, tmp_path / "b", clip_scorer, references, **common, resume_from_checkpoint="latest"
    ).train()
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history] == [0, 2, 4, 6]
    assert [h["reward"] for h in resumed.history] == pytest.approx(
        [h["reward"] for h in full.history], abs=1e-6
    )
    assert resumed.best_step == full.best_step


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_best(tiny_sd_dir, tmp_path, references):
    scorer = ScriptedScorer([0.2, 0.6, 0.1, 0.1])
    trainer = make_trainer(tiny_sd_dir, tmp_path, scorer, references, max_train_steps=8, learning_rate=1e-3)

    def poison(event, payload):
        if event == "step" and payload["step"] == 3:
            with torch.no_grad():
                trainer.components.unet.conv_in.weight.fill_(float("nan"))

    trainer.callbacks.append(poison)
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        trainer.train()
    exported = load_file(str(tmp_path / "out/rpo_unet.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert json.loads((tmp_path / "out/rpo_history.json").read_text())["best_step"] == 2


def test_bad_inputs_give_clear_errors(tiny_sd_dir, tmp_path, clip_scorer, references):
    with pytest.raises(ValueError, match="identifier 'sks'"):
        make_config(tiny_sd_dir, tmp_path, train_prompts=["a dog on the beach"])
    with pytest.raises(ValueError, match=r"lambda_val must be in \[0, 1\]"):
        make_config(tiny_sd_dir, tmp_path, lambda_val=1.5)
    with pytest.raises(ValueError, match="reference_images is empty"):
        RPOTrainer(
            make_config(tiny_sd_dir, tmp_path),
            StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
            clip_scorer,
            [],
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RPOTrainer(make_config(tmp_path / "no-such-model", tmp_path), None, clip_scorer, references)
    with pytest.raises(ValueError, match="No images found"):
        (tmp_path / "empty").mkdir()
        RPOTrainer(
            make_config(tiny_sd_dir, tmp_path, instance_data_dir=str(tmp_path / "empty")), None, clip_scorer
        )


def test_checkpoint_limit_keeps_a_complete_checkpoint_and_resume_refuses_other_settings(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    common = dict(max_train_steps=4, validation_steps=2, checkpointing_steps=2, checkpoints_total_limit=1, seed=3)
    make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references, **common).train()
    out = tmp_path / "out"
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "rpo_trainer_state.json").exists()
    assert not list(out.glob(".checkpoint-*")), "a temporary checkpoint was left behind"
    # another seed: 'latest' is refused, naming what differs, before anything changes on disk
    with pytest.raises(ValueError, match=r"seed: 3 -> 4.*resume_any_config"):
        make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references,
                     **{**common, "seed": 4, "max_train_steps": 6}, resume_from_checkpoint="latest").train()  # fmt: skip
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-4"]
    resumed = make_trainer(
        tiny_sd_dir, tmp_path, clip_scorer, references, **{**common, "seed": 4, "max_train_steps": 6},
        resume_from_checkpoint="latest", resume_any_config=True,
    ).train()  # fmt: skip
    assert [h["step"] for h in resumed.history] == [0, 2, 4, 6]
    # a longer run with the same settings resumes without a word
    more = make_trainer(tiny_sd_dir, tmp_path, clip_scorer, references,
                        **{**common, "seed": 4, "max_train_steps": 8}, resume_from_checkpoint="latest").train()  # fmt: skip
    assert more.global_step == 8


def test_silent_wrong_settings_are_refused_and_weak_photos_warned(tiny_sd_dir, tmp_path, tiny_scorer_dirs):
    from PIL import Image

    from rpo_diffusers.rewards import LambdaHarmonicScorer

    with pytest.raises(ValueError, match=r"guidance_scale must be a number >= 0, got nan"):
        make_config(tiny_sd_dir, tmp_path, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"lora_alpha must be a positive number, got nan"):
        make_config(tiny_sd_dir, tmp_path, use_lora=True, lora_alpha=float("nan"))
    zwx = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"], identifier="zwx")
    photos = [Image.new("RGB", (40, 40), (i * 80, 30, 90)) for i in range(3)]
    with pytest.raises(ValueError, match=r"strips the identifier 'zwx' but this run's is 'sks'"):
        RPOTrainer(make_config(tiny_sd_dir, tmp_path), StableDiffusionPipeline.from_pretrained(tiny_sd_dir), zwx, photos)
    sks = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"])
    with pytest.warns(UserWarning, match=r"Only 1 reference photo") as caught:
        RPOTrainer(make_config(tiny_sd_dir, tmp_path), StableDiffusionPipeline.from_pretrained(tiny_sd_dir), sks,
                   [Image.new("RGB", (1, 1))])  # fmt: skip
    assert any("smaller than the training resolution 32 px (1x1)" in str(w.message) for w in caught)
