"""Stable Diffusion XL as a model family: its conditioning reaches the UNet, every method trains on the loop,
every export reloads to the same model, the script runs end to end, and what is not SDXL base is refused.

All on a tiny SDXL pipeline built from configs (both text encoders, size/crop conditioning), 32 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.export import (
    FULL_UNET_FILENAME,
    LORA_DIFFUSERS_FILENAME,
    LORA_KOHYA_FILENAME,
    write_model_card,
)
from rpo_diffusers.families import UnsupportedModelError, load_components, model_family
from rpo_diffusers.sdxl import SDXLComponents, SDXLConditioning
from rpo_diffusers.testing.compare import assert_same_weights
from rpo_diffusers.testing.configs import tiny_config
from rpo_diffusers.testing.tiny_pipeline import build_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_examples" / "train_rpo.py"
PROMPT = "a photo of sks dog"
SUPPORTED = (
    "supported are Stable Diffusion 1.x / 2.x (StableDiffusionPipeline) and Stable Diffusion XL base "
    "(StableDiffusionXLPipeline) text-to-image pipelines"
)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    build_tiny_sdxl_pipeline(path)
    return path


@pytest.fixture(scope="module")
def sdxl_v_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdxl-v") / "tiny-sdxl-v"
    build_tiny_sdxl_pipeline(path, prediction_type="v_prediction")
    return path


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three photos of different shapes: their size ids differ (landscape, portrait, square)."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 48), (64, 40), (36, 36))
    ]


def _components(path, **kwargs) -> SDXLComponents:
    return SDXLComponents(StableDiffusionXLPipeline.from_pretrained(path), resolution=32, **kwargs)


def _generate(components) -> np.ndarray:
    images = components.generate([PROMPT, "a sks dog on the beach"], [1, 2], 2, 2.0, 32)
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def _assert_same_images(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1.0) -> None:
    """uint8 images equal up to rounding (the same weights sampled twice differ in the last float bits)."""
    assert np.abs(actual - expected).max() <= tolerance, np.abs(actual - expected).max()


# --------------------------------------------------------------------------------------------------
# conditioning
# --------------------------------------------------------------------------------------------------


def test_prompt_conditioning_is_the_pipelines_own(sdxl_dir):
    """Both encoders' penultimate states concatenated and the second's pooled projection, as diffusers has them."""
    comp = _components(sdxl_dir)
    cond = comp.encode_prompts([PROMPT])
    embeds, _, pooled, _ = comp.pipeline.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=False
    )
    assert cond.prompt_embeds.shape == (1, 77, 64) and cond.text_embeds.shape == (1, 32)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.text_embeds, pooled)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]  # drawn at 32 px: original = target, no crop


def test_size_ids_of_each_photo_follow_diffusers_order(sdxl_dir, photos):
    """original (h, w) + crop top-left (top, left) in the resized photo + target (h, w), per photo."""
    comp = _components(sdxl_dir)
    rows = comp.condition_on_sizes(comp.encode_prompts([PROMPT]), [p.size for p in photos], 32)
    # 48x40 -> resized 38x32, crop left 3; 40x64 -> resized 32x51, crop top 9; 36x36 -> no crop
    assert rows.time_ids.tolist() == [[40, 48, 0, 3, 32, 32], [64, 40, 9, 0, 32, 32], [36, 36, 0, 0, 32, 32]]
    diffusers_ids = comp.pipeline._get_add_time_ids(
        (64, 40), (9, 0), (32, 32), torch.float32, text_encoder_projection_dim=32
    )
    assert torch.equal(rows.time_ids[1:2], diffusers_ids)
    assert torch.equal(
        rows.prompt_embeds[0], rows.prompt_embeds[2]
    )  # one prompt, rows differ in size ids only


def test_time_ids_and_pooled_embeddings_reach_the_unet(sdxl_dir):
    """The denoiser's prediction is the UNet's with diffusers' added_cond_kwargs; zeros or swapped ids change it."""
    comp = _components(sdxl_dir)
    cond = comp.condition_on_sizes(comp.encode_prompts([PROMPT]), [(48, 40)], 32)
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    embeds, _, pooled, _ = comp.pipeline.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=False
    )
    ids = comp.pipeline._get_add_time_ids(
        (40, 48), (0, 3), (32, 32), torch.float32, text_encoder_projection_dim=32
    )
    with torch.no_grad():
        expected = comp.unet(
            noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        got = comp.denoiser(noisy, t, cond)
        assert torch.equal(got, expected)
        for wrong in (
            SDXLConditioning(cond.prompt_embeds, cond.text_embeds, torch.zeros_like(cond.time_ids)),
            SDXLConditioning(cond.prompt_embeds, cond.text_embeds, cond.time_ids[:, [1, 0, 3, 2, 4, 5]]),
            SDXLConditioning(cond.prompt_embeds, torch.zeros_like(cond.text_embeds), cond.time_ids),
        ):
            assert (comp.denoiser(noisy, t, wrong) - got).abs().max() > 1e-4


def test_training_steps_see_each_photos_size_ids(sdxl_dir, photos, clip_scorer, tmp_path):
    """What the UNet is given while training: the instance prompt's pooled embedding and the photo's size ids."""
    cfg = tiny_config(sdxl_dir, tmp_path / "out", method="dreambooth", max_train_steps=3, validation_steps=3,
                      train_prompts=["a sks dog on the beach"], train_batch_size=3)  # fmt: skip
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(sdxl_dir), clip_scorer, photos)
    assert isinstance(trainer.components, SDXLComponents)
    seen: list[dict[str, torch.Tensor]] = []

    def record(module, args, kwargs):
        if module.training:  # the training forward, not sampling
            seen.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})

    trainer.components.unet.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    assert len(seen) == 3
    expected = {
        (40.0, 48.0, 0.0, 3.0, 32.0, 32.0),
        (64.0, 40.0, 9.0, 0.0, 32.0, 32.0),
        (36.0, 36.0, 0.0, 0.0, 32.0, 32.0),
    }
    pooled = trainer.components.encode_prompts([PROMPT]).text_embeds
    for call in seen:  # a batch of 3 per step: one epoch, every photo once with its own ids
        assert {tuple(row) for row in call["time_ids"].tolist()} == expected
        assert torch.allclose(call["text_embeds"], pooled.expand(3, -1))


@pytest.mark.filterwarnings("ignore:.*smaller than the training resolution")
def test_resolution_defaults_to_the_familys_size(sdxl_dir, tiny_sd_dir, clip_scorer, photos, tmp_path):
    """No resolution set: 1024 for SDXL, 512 for SD; the SDXL size ids then describe 1024 px."""
    for path, size in ((sdxl_dir, 1024), (tiny_sd_dir, 512)):
        cfg = RPOConfig(
            pretrained_model_name_or_path=str(path), output_dir=str(tmp_path / "o"), report_to="none"
        )
        assert cfg.resolution is None
        trainer = RPOTrainer(cfg, scorer=clip_scorer, reference_images=photos)
        assert cfg.resolution == size
    assert trainer.components.family == "sd"
    sdxl = load_components(sdxl_dir)
    assert sdxl.encode_prompts([PROMPT]).time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]]


def test_validation_at_a_lower_resolution(sdxl_dir, clip_scorer, photos, tmp_path):
    """validation_resolution: the base model's training images at the training size, validation images smaller."""
    cfg = tiny_config(sdxl_dir, tmp_path / "out", max_train_steps=2, validation_resolution=16,
                      train_prompts=["a sks dog on the beach"])  # fmt: skip
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(sdxl_dir), clip_scorer, photos)
    drawn: list[tuple[int, tuple[int, int]]] = []
    generate = trainer.components.generate

    def recording(prompts, seeds, steps, guidance, resolution, **kwargs):
        images = generate(prompts, seeds, steps, guidance, resolution, **kwargs)
        drawn.extend((resolution, im.size) for im in images)
        return images

    trainer.components.generate = recording
    trainer.train()
    assert drawn[0] == (32, (32, 32))  # the training image
    assert set(drawn[1:]) == {(16, (16, 16))} and len(drawn) == 1 + 2  # validations at steps 0 and 2
    with pytest.raises(ValueError, match="validation_resolution must be a positive multiple of 8, got 20"):
        tiny_config(sdxl_dir, tmp_path / "o", validation_resolution=20)


def test_a_separate_vae_replaces_the_pipelines(sdxl_dir, tmp_path):
    """--pretrained_vae_model_name_or_path: the AutoencoderKL in that folder is the one encoding and decoding."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    vae.save_pretrained(tmp_path / "vae")
    comp = load_components(sdxl_dir, resolution=32, vae_name_or_path=tmp_path / "vae")
    assert_same_weights(comp.pipeline.vae.state_dict(), vae.state_dict())


# --------------------------------------------------------------------------------------------------
# training and exports
# --------------------------------------------------------------------------------------------------


def test_lora_exports_reproduce_the_trained_model(sdxl_dir, clip_scorer, photos, tmp_path):
    """DreamBooth LoRA with both text encoders: the diffusers LoRA and the kohya file (real alpha, lora_te1 /
    lora_te2) reload into StableDiffusionXLPipeline and draw the in-memory model's images."""
    out = tmp_path / "out"
    cfg = tiny_config(sdxl_dir, out, method="dreambooth", use_lora=True, rank=4, lora_alpha=8.0, learning_rate=1e-2,
                      train_text_encoder=True, early_stopping=False, max_train_steps=2, validation_steps=2,
                      train_prompts=["a sks dog on the beach"])  # fmt: skip
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(sdxl_dir), clip_scorer, photos)
    trainer.train()
    trained = trainer.components
    expected = _generate(trained)
    assert np.abs(expected - _generate(_components(sdxl_dir))).max() > 2, "training did not change the images"

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(out, weight_name=LORA_DIFFUSERS_FILENAME)
    for loaded, original in ((pipe.unet, trained.unet), (pipe.text_encoder, trained.pipeline.text_encoder),
                             (pipe.text_encoder_2, trained.pipeline.text_encoder_2)):  # fmt: skip
        got = get_peft_model_state_dict(loaded, adapter_name=pipe.get_active_adapters()[0])
        assert_same_weights(got, get_peft_model_state_dict(original))
    _assert_same_images(_generate(SDXLComponents(pipe, resolution=32)), expected)

    kohya = load_file(str(out / LORA_KOHYA_FILENAME))
    prefixes = {k.split(".")[0].split("_")[0] + "_" + k.split(".")[0].split("_")[1] for k in kohya}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {
        8.0
    }  # the real alpha, not the rank
    unet_modules = {name.replace(".", "_") for name, _ in trained.unet.named_modules()}
    for key in kohya:  # ComfyUI maps lora_unet_<diffusers module path with _>: every key names a module
        if key.startswith("lora_unet_"):
            assert key.split(".")[0].removeprefix("lora_unet_") in unet_modules, key
        else:
            assert key.split(".")[0].split("_", 2)[2].startswith("text_model_encoder_layers_"), key
    kohya_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    kohya_pipe.load_lora_weights(str(out), weight_name=LORA_KOHYA_FILENAME)  # diffusers' kohya converter: every key used
    _assert_same_images(
        _generate(SDXLComponents(kohya_pipe, resolution=32)), expected, tolerance=3.0
    )  # fp16 file


def test_dpg_trains_both_text_encoders_with_prior_preservation(sdxl_dir, clip_scorer, photos, tmp_path):
    """DPG (its paper trains the text encoder): the critic learns, both encoders' LoRA moves, class rows join."""
    cfg = tiny_config(sdxl_dir, tmp_path / "out", method="dpg", use_lora=True, train_text_encoder=True,
                      with_prior_preservation=True, num_class_images=2, max_train_steps=2, learning_rate=1e-2,
                      train_prompts=["a sks dog on the beach"])  # fmt: skip
    steps = []
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(sdxl_dir), clip_scorer, photos,
                         callbacks=[lambda e, p: steps.append(p) if e == "step" else None])  # fmt: skip
    trainer.train()
    losses = np.array([[s["loss"], s["loss_critic"], s["loss_prior"]] for s in steps])
    assert losses.shape == (2, 3) and np.isfinite(losses).all()
    for encoder in (trainer.components.pipeline.text_encoder, trainer.components.pipeline.text_encoder_2):
        lora_b = [v for k, v in get_peft_model_state_dict(encoder).items() if "lora_B" in k]
        assert lora_b and any(v.abs().max() > 0 for v in lora_b), "a text encoder LoRA did not train"
    kohya = load_file(str(tmp_path / "out" / LORA_KOHYA_FILENAME))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)


@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_lora_trains_in_half_precision(mixed_precision, sdxl_dir, clip_scorer, photos, tmp_path):
    """Frozen parts in half precision, except SDXL's VAE in fp16 (it overflows there; diffusers keeps it fp32);
    the LoRA weights train in fp32 and the validation images are real images."""
    cfg = tiny_config(sdxl_dir, tmp_path / "out", use_lora=True, mixed_precision=mixed_precision, max_train_steps=2,
                      train_prompts=["a sks dog on the beach"], gradient_checkpointing=True)  # fmt: skip
    losses = []
    from accelerate import Accelerator

    # handed over: fp16 on a CPU is refused in a config's own accelerator
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(sdxl_dir), clip_scorer, photos,
                         accelerator=accelerator,
                         callbacks=[lambda e, p: losses.append(p["loss"]) if e == "step" else None])  # fmt: skip
    half = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    pipe = trainer.components.pipeline
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == half
    assert pipe.vae.dtype == (torch.float32 if mixed_precision == "fp16" else half)
    result = trainer.train()
    assert trainer.components.unet.is_gradient_checkpointing
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(p.dtype == torch.float32 for p in trainer.components.trainable_parameters())
    assert all(np.isfinite(h["reward"]) for h in result.history)
    with trainer.accelerator.autocast():  # as the loop samples
        images = _generate(trainer.components)
    assert all(im.std() > 1.0 for im in images)  # pictures, not the black of a NaN decode


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_full_exports_reproduce_the_trained_model(
    prediction, sdxl_dir, sdxl_v_dir, clip_scorer, photos, tmp_path
):
    """RPO on the full UNet, ε and v: the pipeline folder and the single-file UNet hold the trained weights."""
    base = sdxl_dir if prediction == "epsilon" else sdxl_v_dir
    out = tmp_path / "out"
    cfg = tiny_config(base, out, early_stopping=False, learning_rate=1e-3, max_train_steps=2, validation_steps=2,
                      train_prompts=["a sks dog on the beach"])  # fmt: skip
    losses = []
    trainer = RPOTrainer(cfg, StableDiffusionXLPipeline.from_pretrained(base), clip_scorer, photos,
                         callbacks=[lambda e, p: losses.append(p["loss"]) if e == "step" else None])  # fmt: skip
    trainer.train()
    assert trainer.components.noise_scheduler.config.prediction_type == prediction
    assert len(losses) == 2 and all(np.isfinite(losses))
    trained = trainer.components
    loaded = StableDiffusionXLPipeline.from_pretrained(out)
    assert_same_weights(loaded.unet.state_dict(), trained.unet.state_dict())
    _assert_same_images(_generate(SDXLComponents(loaded, resolution=32)), _generate(trained))
    single = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(out, subfolder="unet"))
    single.load_state_dict(load_file(str(out / FULL_UNET_FILENAME)))  # what ComfyUI's UNETLoader takes
    assert_same_weights(single.state_dict(), trained.unet.state_dict())
    card = ModelCard.load(out / "README.md")
    assert {"stable-diffusion-xl", "text-to-image", "full-finetune"} <= set(card.data.tags)
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text


@pytest.mark.skipif(
    not (os.environ.get("COMFYUI_PATH") and os.environ.get("COMFYUI_PYTHON")),
    reason="set COMFYUI_PATH and COMFYUI_PYTHON to check the kohya keys against a real ComfyUI",
)
def test_comfyui_maps_every_sdxl_kohya_key():
    """ComfyUI's own key map (UNet from its detected SDXL config, CLIP-L / CLIP-G) covers every exported kohya key,
    and its UNETLoader conversion takes the single-file UNet's every tensor as an SDXL model."""
    script = REPO / "tests" / "scripts" / "comfy_sdxl_lora_keys.py"
    proc = subprocess.run([os.environ["COMFYUI_PYTHON"], str(script), os.environ["COMFYUI_PATH"], str(REPO)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "736 kohya modules, 0 not mapped by ComfyUI" in proc.stdout  # 560 UNet + 48 CLIP-L + 128 CLIP-G
    assert "UNETLoader: SDXL, 1680 tensors, 0 not converted" in proc.stdout


def test_model_card_says_sdxl(tmp_path):
    """Hub metadata as SDXL LoRA cards have it: base_model, tags, license, widget with the sample image."""
    path = write_model_card(
        tmp_path, base_model="stabilityai/stable-diffusion-xl-base-1.0", instance_prompt=PROMPT, lora=True,
        config={}, history=[{"step": 0, "reward": 0.5, "align_i": 0.5, "align_t": 0.5}], family="sdxl",
        sample_images=["before_after.png"], widget_prompts=[PROMPT, "a sks dog on the beach"],
    )  # fmt: skip
    card = ModelCard.load(path)
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "lora"} <= set(
        card.data.tags
    )
    assert "stable-diffusion" not in card.data.tags and card.data.license == "openrail++"
    assert card.data.widget == [
        {"text": PROMPT, "output": {"url": "before_after.png"}},
        {"text": "a sks dog on the beach"},
    ]
    assert 'StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"' in card.text


# --------------------------------------------------------------------------------------------------
# train_rpo.py end to end
# --------------------------------------------------------------------------------------------------


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=REPO)  # fmt: skip


@pytest.fixture(scope="module")
def photo_dir(photos, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i, im in enumerate(photos):
        im.save(d / f"{i}.png")
    return d


def _script_args(model, tiny_scorer_dirs, photo_dir, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--scorer_model_name_or_path", str(tiny_scorer_dirs["clip"]),
        "--instance_data_dir", str(photo_dir), "--class_noun", "dog", "--output_dir", str(out),
        "--resolution", "32", "--num_inference_steps", "2", "--validation_num_inference_steps", "2", "--images_per_prompt", "1", "--num_validation_images",
        "1", "--validation_steps", "2", "--report_to", "none", "--train_prompts", "a sks dog on the beach", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_script_lora_run_and_resume(sdxl_dir, tiny_scorer_dirs, photo_dir, tmp_path):
    """RPO LoRA through train_rpo.py, stopped at step 2 and resumed to 4; the LoRA loads into SDXL."""
    out = tmp_path / "lora"
    args = _script_args(
        sdxl_dir, tiny_scorer_dirs, photo_dir, out, "--use_lora", "--checkpointing_steps", "2"
    )
    first = _run_script(*args, "--max_train_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_script(*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "checkpoint-2" in second.stderr
    history = json.loads((out / "rpo_history.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 2, 4] and history["global_step"] == 4
    card = ModelCard.load(out / "README.md")
    assert {"stable-diffusion-xl", "lora", "rpo"} <= set(card.data.tags)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(out, weight_name=LORA_DIFFUSERS_FILENAME)
    assert pipe.get_active_adapters()


@pytest.mark.slow
def test_script_full_dreambooth_with_prior_preservation(sdxl_dir, tiny_scorer_dirs, photo_dir, tmp_path):
    """Full UNet, DreamBooth with class images and a VAE from its own folder: the result is an SDXL pipeline."""
    out = tmp_path / "full"
    proc = _run_script(*_script_args(sdxl_dir, tiny_scorer_dirs, photo_dir, out, "--method", "dreambooth",
                                     "--with_prior_preservation", "--num_class_images", "2", "--max_train_steps", "2",
                                     "--pretrained_vae_model_name_or_path", str(sdxl_dir / "vae")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "class_images").glob("*.png"))) == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.text_encoder_2 is not None and (out / FULL_UNET_FILENAME).exists()
    assert json.loads((out / "rpo_history.json").read_text())["prior_preservation"]["num_class_images"] == 2


@pytest.mark.slow
def test_two_process_run(sdxl_dir, tiny_scorer_dirs, photo_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: DDP carries SDXL's conditioning, prior rows too."""
    from rpo_diffusers.testing.ports import free_local_port

    out = tmp_path / "ddp"
    launcher = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_local_port()),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1"]  # fmt: skip
    args = _script_args(sdxl_dir, tiny_scorer_dirs, photo_dir, out, "--method", "dreambooth", "--max_train_steps", "4",
                        "--validation_steps", "4", "--checkpointing_steps", "4", "--with_prior_preservation",
                        "--num_class_images", "2")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl",
    ]  # fmt: skip
    assert StableDiffusionXLPipeline.from_pretrained(out).text_encoder_2 is not None


# --------------------------------------------------------------------------------------------------
# what is refused, before anything loads
# --------------------------------------------------------------------------------------------------


def _config_only_pipeline(root: Path, class_name: str, unet: dict | None = None, vae: dict | None = None,
                          text_encoder: bool = True) -> Path:  # fmt: skip
    """A pipeline folder with configs and no weights: a refusal must come before anything would load."""
    root.mkdir(parents=True)
    index = {"_class_name": class_name, "text_encoder": ["transformers", "CLIPTextModel"] if text_encoder else [None, None],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    for sub in ("text_encoder", "unet", "vae"):  # every listed part has its folder: complete but for weights
        (root / sub).mkdir()
    for sub, config in (("unet", unet), ("vae", vae)):
        if config is not None:
            (root / sub / "config.json").write_text(json.dumps(config))
    return root


SDXL_UNET = {"in_channels": 4, "block_out_channels": [320, 640, 1280], "addition_embed_type": "text_time"}
SDXL_VAE = {"block_out_channels": [128, 256, 512, 512]}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("refiner", "is a Stable Diffusion XL refiner (StableDiffusionXLImg2ImgPipeline, aesthetic-score conditioning), "
         "which refines images instead of drawing them from a prompt: train on the SDXL base model (e.g. "
         f"'stabilityai/stable-diffusion-xl-base-1.0') instead; {SUPPORTED}."),
        ("inpainting", "is an inpainting model (StableDiffusionXLPipeline, a UNet with 9 input channels); "
         f"personalization trains text-to-image models: use the base model it was made from; {SUPPORTED}."),
        ("sd3", f"is a StableDiffusion3Pipeline model, which rpo-diffusers cannot train; {SUPPORTED}."),
        ("flux", f"is a FluxPipeline model, which rpo-diffusers cannot train; {SUPPORTED}."),
        ("edm", "has a VAE with latents_mean / latents_std (an EDM-style SDXL such as Playground v2.5), which this "
         f"trainer does not normalise for; {SUPPORTED}."),
        ("resolution", "resolution 520 cannot be described by this SDXL model's size conditioning: it must be a "
         "multiple of 32 (the VAE and UNet downsampling), e.g. 512 or 544."),
    ],
)  # fmt: skip
def test_unsupported_models_are_refused_in_one_line(
    kind, message, tmp_path, tiny_scorer_dirs, photo_dir, capsys
):
    root = tmp_path / kind
    resolution = "32"
    if kind == "refiner":
        _config_only_pipeline(
            root, "StableDiffusionXLImg2ImgPipeline", SDXL_UNET, SDXL_VAE, text_encoder=False
        )
    elif kind == "inpainting":
        _config_only_pipeline(root, "StableDiffusionXLPipeline", {**SDXL_UNET, "in_channels": 9}, SDXL_VAE)
    elif kind == "sd3":
        _config_only_pipeline(root, "StableDiffusion3Pipeline")
    elif kind == "flux":
        _config_only_pipeline(root, "FluxPipeline")
    elif kind == "edm":
        _config_only_pipeline(root, "StableDiffusionXLPipeline", SDXL_UNET, {**SDXL_VAE, "latents_mean": [0.0] * 4,
                              "latents_std": [1.0] * 4})  # fmt: skip
    else:
        _config_only_pipeline(root, "StableDiffusionXLPipeline", SDXL_UNET, SDXL_VAE)
        resolution = "520"
    full = message if kind == "resolution" else f"{str(root)!r} {message}"
    with pytest.raises(UnsupportedModelError) as err:
        load_components(root, resolution=int(resolution))
    assert str(err.value) == full
    # the script: exit 2 with that line, before the output folder exists
    from test_train_script import _script_module

    args = _script_args(root, tiny_scorer_dirs, photo_dir, tmp_path / "o", "--resolution", resolution)
    with pytest.raises(SystemExit) as exit_info:
        _script_module().parse_args(args)
    assert exit_info.value.code == 2
    assert f"--pretrained_model_name_or_path: {full}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refiner_pipeline_object_is_refused(sdxl_dir, tmp_path, clip_scorer, photos):
    """Through the Python API too: an SDXL img2img pipeline object without its first text encoder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler, requires_aesthetics_score=True,
    )  # fmt: skip
    with pytest.raises(
        UnsupportedModelError, match=r"^'StableDiffusionXLImg2ImgPipeline' is a Stable Diffusion XL refiner"
    ):
        RPOTrainer(tiny_config(sdxl_dir, tmp_path / "o"), refiner, clip_scorer, photos)


def test_family_comes_from_the_pipeline_class(sdxl_dir, tiny_sd_dir):
    assert model_family(sdxl_dir) == "sdxl" and model_family(tiny_sd_dir) == "sd"


def test_sdxl_shaped_configs_have_sdxl_base_sizes():
    """The benchmark's real-size stand-in (built on the meta device here): SDXL base 1.0's parameter counts."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rpo_diffusers.testing.tiny_pipeline import SDXL_TEXT_CONFIGS, SDXL_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        encoders = [cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c))
                    for cls, c in zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_CONFIGS)]  # fmt: skip
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, *encoders)]
    assert sizes == [2_567_463_684, 123_060_480, 694_659_840]


def test_family_of_a_cached_hub_id_is_read_offline(tmp_path, monkeypatch):
    """A Hub id in the local cache: its model_index.json (and unet config) decide, nothing is downloaded."""
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--my-sdxl" / "snapshots" / ("a" * 40)
    _config_only_pipeline(snapshot, "StableDiffusionXLPipeline", SDXL_UNET, SDXL_VAE)
    (tmp_path / "models--someone--my-sdxl" / "refs").mkdir()
    (tmp_path / "models--someone--my-sdxl" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_family("someone/my-sdxl") == "sdxl"
    with pytest.raises(UnsupportedModelError, match="must be a multiple of 32"):
        load_components("someone/my-sdxl", resolution=1000)
