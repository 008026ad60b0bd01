"""train_text_encoder for DreamBooth and DPG: full and LoRA, exports diffusers and ComfyUI/A1111 load."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.export import (
    LORA_DIFFUSERS_FILENAME,
    LORA_KOHYA_FILENAME,
    PORTABLE_LORA_FIELDS,
    kohya_lora_delta,
)
from rpo_diffusers.testing.compare import assert_same_weights
from rpo_diffusers.testing.configs import tiny_config


def make_config(tiny_sd_dir, output_dir, **overrides) -> RPOConfig:
    """DreamBooth with the text encoder trained, on the tiny pipeline."""
    settings = dict(
        method="dreambooth", max_train_steps=3, validation_steps=3, learning_rate=1e-2,
        train_prompts=["a sks dog on the beach"], train_text_encoder=True, early_stopping=False,
        checkpointing_steps=3,
    )  # fmt: skip
    return tiny_config(tiny_sd_dir, output_dir, **{**settings, **overrides})


def _ids(pipe) -> torch.Tensor:
    return pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids


def _text_out(text_encoder, ids) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_full_text_encoder_trains_and_the_exported_pipeline_has_it(tiny_sd_dir, tmp_path, clip_scorer, references):
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    trainer = RPOTrainer(make_config(tiny_sd_dir, tmp_path), StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
                         clip_scorer, references)  # fmt: skip
    trainer.train()
    trained = trainer.components.pipeline.text_encoder
    changed = [k for k, v in base.text_encoder.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed, "the text encoder did not train"
    checkpoint = load_file(str(tmp_path / "checkpoint-3" / "trainable_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in checkpoint), "the checkpoint lacks the text encoder"
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert_same_weights(reloaded.text_encoder.state_dict(), trained.state_dict())
    torch.testing.assert_close(_text_out(reloaded.text_encoder, _ids(base)), _text_out(trained, _ids(base)))


def test_text_encoder_lora_loads_in_diffusers_and_in_the_kohya_file(tiny_sd_dir, tmp_path, clip_scorer, references):
    cfg = make_config(tiny_sd_dir, tmp_path, use_lora=True, rank=4, lora_alpha=8.0)
    trainer = RPOTrainer(cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references)
    trainer.train()
    trained = trainer.components.pipeline.text_encoder
    ids = _ids(trainer.components.pipeline)
    expected = _text_out(trained, ids)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert not torch.allclose(_text_out(fresh.text_encoder, ids), expected, atol=1e-4), "the LoRA has no effect"
    try:
        fresh.load_lora_weights(tmp_path, weight_name=LORA_DIFFUSERS_FILENAME)
    except ValueError as err:  # transformers >= 5 wants peft >= 0.22 for any adapter, newer than PyPI has
        if "version of PEFT" not in str(err):
            raise
        diffusers_loaded = False  # checked by the floors environment (transformers 4.57, peft 0.15)
    else:
        diffusers_loaded = True
    if diffusers_loaded:
        assert getattr(fresh.text_encoder, "peft_config", None), "diffusers loaded no text-encoder adapter"
        torch.testing.assert_close(_text_out(fresh.text_encoder, ids), expected, atol=1e-5, rtol=1e-4)
    keys = load_file(str(tmp_path / LORA_DIFFUSERS_FILENAME)).keys()
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys), sorted(keys)[:3]
    # only the LoraConfig fields every supported peft knows: a newer peft's extra fields break older loaders
    with safe_open(str(tmp_path / LORA_DIFFUSERS_FILENAME), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k.split(".", 1)[1] for k in meta} <= set(PORTABLE_LORA_FIELDS)
    assert meta["text_encoder.lora_alpha"] == 8.0 and meta["unet.r"] == 4

    kohya = load_file(str(tmp_path / LORA_KOHYA_FILENAME))
    te = sorted({k.rsplit(".", 2)[0] for k in kohya if k.startswith("lora_te_")})
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te), te[:3]
    assert {k.split("_self_attn_")[-1] for k in te} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(float(kohya[f"{name}.alpha"]) == 8.0 for name in te)  # the real alpha, not the rank
    # the kohya delta of one module equals what PEFT adds to that layer's output
    layer = next(m for n, m in trained.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        peft_delta = layer(x) - layer.base_layer(x)
    delta = kohya_lora_delta(kohya, "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    torch.testing.assert_close(x @ delta.T, peft_delta, atol=2e-3, rtol=1e-2)  # kohya file is fp16


def test_dpg_trains_the_text_encoder_too(tiny_sd_dir, tmp_path, clip_scorer, references):
    cfg = make_config(tiny_sd_dir, tmp_path, method="dpg", use_lora=True, max_train_steps=2, validation_steps=2)
    trainer = RPOTrainer(cfg, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), clip_scorer, references)
    trainer.train()
    grads_reached = any("lora_" in k for k in trainer.components.trainable_state_dict() if "text_encoder" in k)
    assert grads_reached and "lora_te_" in " ".join(load_file(str(tmp_path / LORA_KOHYA_FILENAME)))


def test_rpo_refuses_text_encoder_training(tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="RPO keeps the text encoder frozen"):
        make_config(tiny_sd_dir, tmp_path, method="rpo")
