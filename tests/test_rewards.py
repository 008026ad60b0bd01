"""LambdaHarmonicScorer on tiny ALIGN / CLIP / SigLIP models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_diffusers.data import load_image_folder
from rpo_diffusers.prompts import load_dreambench_classes
from rpo_diffusers.rewards import LambdaHarmonicScorer, lambda_harmonic, model_output_features


@pytest.fixture(scope="module", params=["align", "clip", "siglip"])
def scorer(request, tiny_scorer_dirs):
    return LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs[request.param], lambda_=0.5, batch_size=4)


def _direct_scores(scorer, images, refs, prompt, lam):
    """The definition, computed straight from the bare model and processor."""
    proc, model = scorer.processor, scorer.model
    with torch.no_grad():
        img = model_output_features(
            model.get_image_features(**proc.image_processor(images=images, return_tensors="pt"))
        )
        ref = model_output_features(
            model.get_image_features(**proc.image_processor(images=refs, return_tensors="pt"))
        )
        tok = proc.tokenizer([prompt], padding=scorer._text_padding, return_tensors="pt")
        tok = {k: v for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if scorer._text_padding == "max_length":
            tok.pop("attention_mask", None)
        txt = model_output_features(model.get_text_features(**tok))
    img, ref, txt = F.normalize(img, dim=-1), F.normalize(ref, dim=-1), F.normalize(txt, dim=-1)
    i_align = ((img @ ref.T + 1) / 2).mean(1)
    t_align = ((img @ txt.T)[:, 0] + 1) / 2
    return i_align, t_align, 1 / (lam / i_align + (1 - lam) / t_align)


def test_scores_match_direct_computation(scorer, sample_images):
    refs, images = sample_images[:3], sample_images[3:]
    res = scorer.score(images, "a sks dog on the Moon", reference_images=refs, lambda_=0.3)
    i_align, t_align, reward = _direct_scores(scorer, images, refs, "a dog on the Moon", 0.3)
    assert torch.allclose(res.image_alignment, i_align, atol=1e-5)
    assert torch.allclose(res.text_alignment, t_align, atol=1e-5)
    assert torch.allclose(res.reward, reward.float(), atol=1e-5)
    for t in (res.image_alignment, res.text_alignment, res.reward):
        assert t.shape == (3,) and t.dtype == torch.float32 and ((t >= 0) & (t <= 1)).all()
    assert res.prompts == ["a dog on the Moon"] * 3


def test_cached_references_equal_passed_references_and_batching(scorer, sample_images):
    refs, images = sample_images[:3], sample_images
    passed = scorer.score(images, "a sks dog", reference_images=refs)
    scorer.set_reference_images(refs)
    cached = scorer.score(images, "a sks dog")
    assert torch.allclose(passed.reward, cached.reward, atol=1e-6)
    original = scorer.batch_size
    try:
        scorer.batch_size = 1
        one = scorer.score(images, "a sks dog")
    finally:
        scorer.batch_size = original
    assert torch.allclose(one.reward, cached.reward, atol=1e-5)


def test_identifier_is_stripped_before_the_text_tower(scorer, sample_images):
    scorer.set_reference_images(sample_images[:2])
    with_id = scorer.score(sample_images, "a sks dog on the beach")
    without = scorer.score(sample_images, "a dog on the beach")
    other = scorer.score(sample_images, "a sks backpack in the snow with a city")
    assert torch.allclose(with_id.text_alignment, without.text_alignment, atol=1e-6)
    assert not torch.allclose(with_id.text_alignment, other.text_alignment, atol=1e-6)


def test_lambda_endpoints_and_override(scorer, sample_images):
    scorer.set_reference_images(sample_images[:2])
    r1 = scorer.score(sample_images, "a sks dog", lambda_=1.0)
    r0 = scorer.score(sample_images, "a sks dog", lambda_=0.0)
    assert torch.allclose(r1.reward, r1.image_alignment) and torch.allclose(r0.reward, r0.text_alignment)
    mid = scorer.score(sample_images, "a sks dog", lambda_=0.7)
    assert torch.allclose(
        mid.reward, lambda_harmonic(mid.image_alignment, mid.text_alignment, 0.7), atol=1e-6
    )
    assert mid.lambda_ == 0.7 and scorer.score(sample_images, "a sks dog").lambda_ == 0.5


def test_input_types_give_the_same_scores(scorer, sample_images):
    scorer.set_reference_images(sample_images[:2])
    pils = [im.resize((32, 32)) for im in sample_images[2:5]]
    arrays = [np.asarray(im) for im in pils]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    rgba = [im.convert("RGBA") for im in pils]
    base = scorer.score(pils, "a sks dog").reward
    for variant in (arrays, np.stack(arrays), tensor, rgba):
        assert torch.allclose(scorer.score(variant, "a sks dog").reward, base, atol=1e-5)
    gray = scorer.score([im.convert("L") for im in pils], "a sks dog").reward
    assert gray.shape == base.shape and torch.isfinite(gray).all()


def test_trl_style_call(scorer, sample_images):
    rewards, info = scorer(sample_images[:3], ["a sks dog"] * 3, {"reference_images": sample_images[3:]})
    direct = scorer.score(sample_images[:3], "a sks dog", reference_images=sample_images[3:])
    assert rewards == pytest.approx(direct.reward.tolist())
    assert info["align_i"] == pytest.approx(direct.image_alignment.tolist()) and info["lambda"] == 0.5


def test_text_cache_is_reused(scorer):
    scorer._text_cache.clear()
    scorer.embed_texts(["a sks dog", "a dog", "a sks cat"])
    assert set(scorer._text_cache) == {"a dog", "a cat"}


def test_errors(tiny_scorer_dirs, tmp_path, sample_images):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LambdaHarmonicScorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"], lambda_=1.5)
    s = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"])
    with pytest.raises(ValueError, match="set_reference_images"):
        s.score(sample_images, "a sks dog")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.score(sample_images, "a sks dog", reference_images=sample_images, lambda_=-0.2)
    with pytest.raises(ValueError, match="prompts"):
        s.score(sample_images[:3], ["a", "b"], reference_images=sample_images)
    # A text-only model: no image tower.
    from transformers import CLIPTextConfig, CLIPTextModel

    text_only = tmp_path / "text_only"
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(text_only)
    with pytest.raises(ValueError, match="no image and text towers"):
        LambdaHarmonicScorer.from_pretrained(text_only)


def test_dreambench_references_score_end_to_end(dreambench_dir, tiny_scorer_dirs):
    scorer = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["align"], batch_size=8)
    classes = load_dreambench_classes(str(dreambench_dir / "prompts_and_classes.txt"))
    for name, cls in classes.items():
        refs = load_image_folder(dreambench_dir / name)
        scorer.set_reference_images(refs)
        res = scorer.score(refs, f"a photo of sks {cls}")
        assert len(res) == len(refs)
        assert torch.isfinite(res.reward).all() and (res.reward > 0).all() and (res.reward <= 1).all()


def test_exif_rotated_photo_scores_like_upright(tiny_scorer_dirs, tmp_path, sample_images):
    s = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"])
    upright = sample_images[0]
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = rotated.getexif()
    exif[0x0112] = 6  # ...with the tag that rotates it back upright (90° clockwise)
    rotated.save(tmp_path / "r.png", exif=exif)
    loaded = Image.open(tmp_path / "r.png")
    a = s.score([upright], "a sks dog", reference_images=sample_images[1:3]).reward
    b = s.score([loaded], "a sks dog", reference_images=sample_images[1:3]).reward
    assert torch.allclose(a, b, atol=1e-5)
