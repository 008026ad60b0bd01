"""DreamBooth prior preservation in RPOTrainer, on the tiny Stable Diffusion and the tiny CLIP scorer.

Class images are drawn by the base model, saved as PNG files and reused; L_prior joins the training step;
w_prior = 0 trains exactly like prior preservation off; the script exposes the flags; bad input fails clearly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from example_scripts import load_example
from PIL import Image

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.testing.configs import tiny_config

TWO_PROMPTS = ["a sks dog on the beach", "a sks dog in the snow"]


def make_config(tiny_sd_dir: Path, output_dir: Path, **overrides) -> RPOConfig:
    """DreamBooth-style prior preservation on the tiny pipeline."""
    settings = dict(
        train_prompts=TWO_PROMPTS, generation_batch_size=2, max_train_steps=3, validation_steps=3,
        learning_rate=1e-3, with_prior_preservation=True, num_class_images=3,
    )  # fmt: skip
    return tiny_config(tiny_sd_dir, output_dir, **{**settings, **overrides})


def make_trainer(tiny_sd_dir, output_dir, clip_scorer, references, events=None, **overrides) -> RPOTrainer:
    callbacks = [lambda event, payload: events.append((event, payload))] if events is not None else []
    cfg = make_config(tiny_sd_dir, output_dir, **overrides)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    return RPOTrainer(cfg, pipe, clip_scorer, references, callbacks=callbacks)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_class_images_are_generated_once_as_pngs_and_reused(tiny_sd_dir, tmp_path, clip_scorer, references):
    events: list = []
    trainer = make_trainer(tiny_sd_dir, tmp_path / "out", clip_scorer, references, events)
    assert trainer.config.class_prompt == "a photo of dog"
    folder = tmp_path / "out" / "class_images"
    assert trainer.class_data_dir == folder
    images = trainer.generate_class_images()
    files = sorted(folder.glob("*.png"))
    assert len(images) == len(files) == 3
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (32, 32)
            im.verify()
    assert len(set(im.tobytes() for im in images)) == 3, "every class image has its own seed"
    generated = [p["done"] for e, p in events if e == "class_generation"]
    assert generated == [2, 3]  # generation_batch_size 2, progress reported per batch
    assert json.loads((folder / "class_images.json").read_text())["class_prompt"] == "a photo of dog"

    # A rerun (another output dir, the same class folder) reuses them: no generation, files untouched.
    before, events[:] = _mtimes(folder), []
    again = make_trainer(
        tiny_sd_dir, tmp_path / "out2", clip_scorer, references, events, class_data_dir=str(folder)
    )
    reused = again.generate_class_images()
    assert _mtimes(folder) == before and not [e for e, _ in events if e == "class_generation"]
    assert [im.tobytes() for im in reused] == [im.tobytes() for im in images]

    # Asking for more draws only the shortfall; the user's own images in the folder count too.
    Image.new("RGB", (48, 40), (200, 10, 10)).save(folder / "mine.jpg")
    more = make_trainer(
        tiny_sd_dir, tmp_path / "out3", clip_scorer, references, events, class_data_dir=str(folder),
        num_class_images=5,
    )  # fmt: skip
    assert len(more.generate_class_images()) == 5
    assert len(list(folder.glob("*.png"))) == 4 and _mtimes(folder).items() >= before.items()

    # The same seed draws the same class images in a fresh folder (seeded, from the base model).
    fresh = make_trainer(tiny_sd_dir, tmp_path / "fresh", clip_scorer, references)
    assert [im.tobytes() for im in fresh.generate_class_images()] == [im.tobytes() for im in images]


def _train(tiny_sd_dir, output_dir, clip_scorer, references, **overrides):
    events: list = []
    trainer = make_trainer(tiny_sd_dir, output_dir, clip_scorer, references, events, **overrides)
    result = trainer.train()
    steps = [p for e, p in events if e == "step"]
    return trainer, result, steps


def test_prior_loss_is_logged_and_weight_zero_trains_like_prior_off(
    tiny_sd_dir, tmp_path, clip_scorer, references
):
    # The benchmark's "DreamBooth with prior preservation": no preference loss, no early stopping.
    dreambooth = dict(pref_loss_weight=0.0, early_stopping=False)
    off, off_result, off_steps = _train(
        tiny_sd_dir, tmp_path / "off", clip_scorer, references, with_prior_preservation=False, **dreambooth
    )
    zero, _, zero_steps = _train(
        tiny_sd_dir, tmp_path / "zero", clip_scorer, references, prior_loss_weight=0.0, **dreambooth
    )
    on, on_result, on_steps = _train(
        tiny_sd_dir, tmp_path / "on", clip_scorer, references, prior_loss_weight=1.0, **dreambooth
    )
    assert len(off_steps) == len(zero_steps) == len(on_steps) == 3
    assert all("loss_prior" not in s for s in off_steps)
    for s in zero_steps + on_steps:
        assert math.isfinite(s["loss_prior"]) and s["loss_prior"] > 0
    # w_prior = 0: exactly the trajectory of prior preservation off (L_prior is only logged).
    assert [s["loss_sim"] for s in zero_steps] == pytest.approx([s["loss_sim"] for s in off_steps], rel=1e-6)
    assert [s["loss"] for s in zero_steps] == [s["loss_sim"] for s in zero_steps]
    off_w, zero_w, on_w = (t.components.trainable_state_dict() for t in (off, zero, on))
    for name in off_w:  # two runs: equal up to the CPU kernels' last bits
        torch.testing.assert_close(zero_w[name], off_w[name], atol=1e-6, rtol=1e-6)
    # w_prior = 1: L = L_sim + L_prior, and the weights go elsewhere.
    for s in on_steps:
        assert s["loss"] == pytest.approx(s["loss_sim"] + s["loss_prior"], rel=1e-5)
    assert max(float((on_w[n] - off_w[n]).abs().max()) for n in off_w) > 1e-4
    assert on_steps[0]["loss_sim"] == pytest.approx(off_steps[0]["loss_sim"], rel=1e-4)  # step 1: same start
    # The history file and the model card say prior preservation was used.
    history = json.loads((tmp_path / "on/rpo_history.json").read_text())
    assert history["prior_preservation"] == {
        "class_prompt": "a photo of dog",
        "class_data_dir": str(tmp_path / "on/class_images"),
        "num_class_images": 3,
        "prior_loss_weight": 1.0,
    }
    assert json.loads((tmp_path / "off/rpo_history.json").read_text())["prior_preservation"] is None
    card = (tmp_path / "on/README.md").read_text()
    assert "| with_prior_preservation | true |" in card and "| class_prompt | a photo of dog |" in card
    assert on_result.timings["class_images"] > 0 and off_result.timings["class_images"] == 0


def test_lora_with_prior_resumes_like_an_uninterrupted_run(tiny_sd_dir, tmp_path, clip_scorer, references):
    common = dict(
        use_lora=True, learning_rate=5e-2, max_train_steps=4, validation_steps=2, checkpointing_steps=2, seed=5,
        train_batch_size=2, num_class_images=3,
    )  # fmt: skip
    _, full, full_steps = _train(tiny_sd_dir, tmp_path / "a", clip_scorer, references, **common)
    _train(tiny_sd_dir, tmp_path / "b", clip_scorer, references, **{**common, "max_train_steps": 2})
    assert (tmp_path / "b/checkpoint-2").is_dir()
    png_times = _mtimes(tmp_path / "b/class_images")
    resumed, result, resumed_steps = _train(
        tiny_sd_dir, tmp_path / "b", clip_scorer, references, **common, resume_from_checkpoint="latest"
    )
    assert _mtimes(tmp_path / "b/class_images") == png_times  # the rerun drew no class image
    assert [s["step"] for s in resumed_steps] == [3, 4]
    for key in ("loss", "loss_sim", "loss_prior"):
        assert [s[key] for s in resumed_steps] == pytest.approx([s[key] for s in full_steps[2:]], rel=1e-4)
    assert [h["reward"] for h in result.history] == pytest.approx(
        [h["reward"] for h in full.history], abs=1e-6
    )
    assert resumed.components.is_lora and (tmp_path / "b/pytorch_lora_weights.safetensors").exists()


def test_class_batches_visit_every_class_image_each_epoch(tiny_sd_dir, tmp_path, clip_scorer, references):
    trainer = make_trainer(tiny_sd_dir, tmp_path / "out", clip_scorer, references, num_class_images=3)
    data = trainer.prepare_training_set(*trainer.generate_training_images(), trainer.generate_class_images())
    assert data.class_latents.shape == (3, *data.reference_latents.shape[1:])
    assert data.class_embedding.shape[0] == 1
    trainer.objective.setup(trainer, data)
    picked = [int(i) for s in range(6) for i in trainer.objective.class_indices(trainer.sample_positions(s, 0))]
    assert sorted(picked[:3]) == sorted(picked[3:]) == [0, 1, 2]
    assert picked == [
        int(i) for s in range(6) for i in trainer.objective.class_indices(trainer.sample_positions(s, 0))
    ]


def test_bad_prior_settings_give_clear_errors(tiny_sd_dir, tmp_path, clip_scorer, references):
    with pytest.raises(ValueError, match="num_class_images must be >= 1"):
        make_config(tiny_sd_dir, tmp_path, num_class_images=0)
    with pytest.raises(ValueError, match="prior_loss_weight must be a number >= 0"):
        make_config(tiny_sd_dir, tmp_path, prior_loss_weight=-0.5)
    with pytest.raises(ValueError, match="drop the identifier"):
        make_config(tiny_sd_dir, tmp_path, class_prompt="a photo of sks dog")
    a_file = tmp_path / "not_a_folder.png"
    a_file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        make_config(tiny_sd_dir, tmp_path, class_data_dir=str(a_file))
    with pytest.warns(UserWarning, match="ignored without with_prior_preservation"):
        make_config(tiny_sd_dir, tmp_path, with_prior_preservation=False, class_prompt="a photo of dog")
    broken = tmp_path / "classes"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"\x89PNG not really")
    trainer = make_trainer(tiny_sd_dir, tmp_path / "o", clip_scorer, references, class_data_dir=str(broken))
    with pytest.raises(ValueError, match=r"0\.png.*class_data_dir: delete it"):
        trainer.generate_class_images()
    off = make_trainer(tiny_sd_dir, tmp_path / "o", clip_scorer, references, with_prior_preservation=False)
    with pytest.raises(ValueError, match="with_prior_preservation=True"):
        off.generate_class_images()


def _train_script():
    """training_examples/train_rpo.py imported in-process."""
    return load_example("train_rpo")


def test_train_script_exposes_the_flags(tiny_sd_dir, tiny_scorer_dirs, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(instance / "0.png")
    base = [
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--instance_data_dir", str(instance),
        "--scorer_model_name_or_path", str(tiny_scorer_dirs["clip"]), "--output_dir", str(tmp_path / "o"),
    ]  # fmt: skip
    parse_args = _train_script().parse_args
    config, _ = parse_args([*base, "--with_prior_preservation", "--class_prompt", "a photo of a dog",
                            "--num_class_images", "7", "--prior_loss_weight", "0.5"])  # fmt: skip
    assert config.with_prior_preservation and config.class_prompt == "a photo of a dog"
    assert config.num_class_images == 7 and config.prior_loss_weight == 0.5
    assert config.class_data_dir == str(tmp_path / "o" / "class_images")
    config, _ = parse_args(base)
    assert not config.with_prior_preservation and config.num_class_images == 100
    with pytest.raises(ValueError, match="num_class_images"):
        parse_args([*base, "--with_prior_preservation", "--num_class_images", "0"])
