"""The model card's metadata and usage say what the Hub accepts and what the reader can run."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from rpo_diffusers.export import hub_base_model, write_model_card
from rpo_diffusers.toy import asset_path

HISTORY = [{"step": 0, "reward": 0.70, "align_i": 0.6, "align_t": 0.8}]


def _card(tmp_path, base_model, lora=False, **kwargs) -> ModelCard:
    kwargs.setdefault("config", {})
    path = write_model_card(
        tmp_path, base_model=base_model, instance_prompt="a sks ring", lora=lora, history=HISTORY, **kwargs
    )
    return ModelCard.load(path)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("/tmp/abs/path/sd", None),
        ("toy-sd", None),
        ("unknown", None),
        ("a/b/c", None),
    ],
)
def test_hub_base_model_is_an_id_or_nothing(base, expected):
    assert hub_base_model(base) == expected


def test_local_base_model_leaves_the_field_out(tmp_path):
    local = tmp_path / "my-sd15"
    local.mkdir()
    card = _card(tmp_path, str(local), lora=True)
    assert card.data.base_model is None and str(local) not in card.content  # no path reaches the Hub
    assert "a local model (`my-sd15`)" in card.text
    assert "torch.float32  # half precision on a GPU" in card.text  # GPU/CPU choice, not fp16 on cuda always
    assert '.to("cuda")' not in card.text


def test_toy_base_model_card_is_plain(tmp_path):
    card = _card(tmp_path, str(asset_path("sd")), config={"resolution": 32, "num_inference_steps": 20})
    assert card.data.base_model is None
    assert "bundled toy Stable Diffusion" in card.text
    assert "float16" not in card.text and "cuda" not in card.text
    assert "height=32, width=32, num_inference_steps=20" in card.text


def test_hub_base_model_card_keeps_the_id(tmp_path):
    card = _card(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", lora=True)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=dtype)' in card.text


@pytest.mark.parametrize(
    ("method", "present", "absent", "title"),
    [
        ("rpo", {"rpo", "dreambooth"}, {"dpg"}, "# RPO personalization"),
        ("dreambooth", {"dreambooth"}, {"rpo", "dpg"}, "# DreamBooth personalization"),
        ("dpg", {"dpg", "dreambooth"}, {"rpo"}, "# DPG personalization"),
    ],
)
def test_method_and_reward_in_tags_and_text(tmp_path, method, present, absent, title):
    card = _card(tmp_path, "my/base", method=method, reward="λ-harmonic (toy-scorer), λ_train 0.0")
    tags = set(card.data.tags)
    assert present <= tags and not (absent & tags)
    assert title in card.text and "Reward: λ-harmonic (toy-scorer), λ_train 0.0." in card.text
