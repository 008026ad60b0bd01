"""DreamBench metrics against their definitions, on tiny ViT (DINO stand-in) and CLIP models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rpo_diffusers.metrics import DreamBenchEvaluator, mean_pairwise_cosine
from rpo_diffusers.rewards import model_output_features


@pytest.fixture(scope="module")
def evaluator(tiny_vit_dir, tiny_scorer_dirs):
    return DreamBenchEvaluator.from_pretrained(dino=tiny_vit_dir, clip=tiny_scorer_dirs["clip"], batch_size=2)


def test_mean_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = 1 / 2**0.5
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + s + 0 + s) / 4)
    assert mean_pairwise_cosine(b, b, exclude_diagonal=True) == pytest.approx(s)
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_cosine(a[:1], a[:1], exclude_diagonal=True)


def test_prompt_metrics_match_direct_computation(evaluator, sample_images):
    refs, gen = sample_images[:3], sample_images[3:]
    row = evaluator.evaluate_prompt(gen, refs, "a sks dog on the beach")
    with torch.no_grad():

        def px(ims):
            return evaluator.dino_processor(images=ims, return_tensors="pt")["pixel_values"]

        def cp(ims):
            return evaluator.clip_processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]

        d_gen = evaluator.dino_model(pixel_values=px(gen)).last_hidden_state[:, 0]
        d_ref = evaluator.dino_model(pixel_values=px(refs)).last_hidden_state[:, 0]
        c_gen = model_output_features(evaluator.clip_model.get_image_features(pixel_values=cp(gen)))
        c_ref = model_output_features(evaluator.clip_model.get_image_features(pixel_values=cp(refs)))
        tok = evaluator.clip_processor.tokenizer(["a dog on the beach"], padding=True, return_tensors="pt")
        text = model_output_features(evaluator.clip_model.get_text_features(**tok))
    dino = (F.normalize(d_gen, dim=-1) @ F.normalize(d_ref, dim=-1).T).mean()
    clip_i = (F.normalize(c_gen, dim=-1) @ F.normalize(c_ref, dim=-1).T).mean()
    clip_t = (F.normalize(c_gen, dim=-1) @ F.normalize(text, dim=-1).T).clamp_min(0).mean()
    assert row.dino == pytest.approx(float(dino), abs=1e-5)
    assert row.clip_i == pytest.approx(float(clip_i), abs=1e-5)
    assert row.clip_t == pytest.approx(float(clip_t), abs=1e-5)
    assert row.num_images == 3


def test_subject_mean_and_reference_baseline(evaluator, sample_images):
    refs = sample_images[:3]
    result = evaluator.evaluate_subject(
        {"a sks dog": sample_images[3:5], "a red sks dog": sample_images[5:]}, refs, "dog"
    )
    assert len(result.prompts) == 2
    assert result.dino == pytest.approx(sum(p.dino for p in result.prompts) / 2)
    base = evaluator.reference_baseline(refs)
    feats = evaluator.dino_features(refs)
    sims = F.normalize(feats, dim=-1) @ F.normalize(feats, dim=-1).T
    off_diag = (sims.sum() - sims.diagonal().sum()) / 6
    assert base["dino"] == pytest.approx(float(off_diag), abs=1e-5)
    assert base["dino"] < 1.0  # self-pairs (cos = 1) are excluded


def test_clip_t_is_clamped_at_zero(evaluator, sample_images):
    rows = [
        evaluator.evaluate_prompt(sample_images[:2], sample_images[2:4], p)
        for p in ("a sks dog", "a cube shaped sks can", "a wet sks toy")
    ]
    assert all(r.clip_t >= 0 for r in rows)


def test_unknown_model_paths(tmp_path, tiny_vit_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DreamBenchEvaluator.from_pretrained(dino=tmp_path / "nope", clip=tmp_path / "nope2")
    with pytest.raises(ValueError, match="not a CLIP-style"):
        DreamBenchEvaluator.from_pretrained(dino=tiny_vit_dir, clip=tiny_vit_dir)
