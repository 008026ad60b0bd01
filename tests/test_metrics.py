"""DreamBench metrics against their definitions, on tiny ViT (DINO stand-in) and CLIP models.

Every expected value is computed here from the bare models (processor + forward + cosines by hand), so a
wrong feature, pairing, clamp or average in ``rpo_diffusers.metrics`` shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rpo_diffusers.data import load_image_folder
from rpo_diffusers.metrics import DreamBenchEvaluator, mean_pairwise_cosine, mean_scores
from rpo_diffusers.prompts import load_dreambench_classes
from rpo_diffusers.rewards import model_output_features


@pytest.fixture(scope="module")
def evaluator(tiny_vit_dir, tiny_scorer_dirs):
    # batch_size=2 splits every call into several batches; the direct computations below use one batch.
    return DreamBenchEvaluator.from_pretrained(dino=tiny_vit_dir, clip=tiny_scorer_dirs["clip"], batch_size=2)


@torch.no_grad()
def direct_features(ev: DreamBenchEvaluator, images) -> dict[str, torch.Tensor]:
    """L2-normalised DINO CLS and CLIP image features straight from the bare models, in one batch."""
    dino_px = ev.dino_processor(images=images, return_tensors="pt")["pixel_values"]
    clip_px = ev.clip_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    dino = ev.dino_model(pixel_values=dino_px).last_hidden_state[:, 0]
    clip = model_output_features(ev.clip_model.get_image_features(pixel_values=clip_px))
    return {"dino": F.normalize(dino, dim=-1), "clip": F.normalize(clip, dim=-1)}


@torch.no_grad()
def direct_text_feature(ev: DreamBenchEvaluator, text: str) -> torch.Tensor:
    """L2-normalised CLIP text feature of ``text`` exactly as given (no identifier handling)."""
    tok = ev.clip_processor.tokenizer([text], padding=True, return_tensors="pt")
    return F.normalize(model_output_features(ev.clip_model.get_text_features(**tok)), dim=-1)[0]


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
    g, r = direct_features(evaluator, gen), direct_features(evaluator, refs)
    # the tiny CLIP's random weights differ between transformers versions (same seed): take the first prompt
    # with some positive image-text cosines, so that the clamp cannot hide a wrong CLIP-T
    candidates = [
        ("a wet sks toy", "a wet toy"),
        ("a sks dog", "a dog"),
        ("a photo of a sks toy", "a photo of a toy"),
    ]
    # the stripped text is written out: the identifier must not reach the text tower
    clip_ts = {p: (g["clip"] @ direct_text_feature(evaluator, s)).clamp_min(0).mean() for p, s in candidates}
    prompt = next((p for p, v in clip_ts.items() if float(v) > 0), None)
    assert prompt is not None, f"precondition: a prompt with some positive image-text cosines, got {clip_ts}"
    clip_t = clip_ts[prompt]
    row = evaluator.evaluate_prompt(gen, refs, prompt)
    assert row.dino == pytest.approx(float((g["dino"] @ r["dino"].T).mean()), abs=1e-5)
    assert row.clip_i == pytest.approx(float((g["clip"] @ r["clip"].T).mean()), abs=1e-5)
    assert row.clip_t == pytest.approx(float(clip_t), abs=1e-5)
    assert (row.prompt, row.num_images) == (prompt, 3)


def test_clip_t_clamps_negative_cosines_at_zero(evaluator, sample_images):
    prompt = "a sks dog"
    cos = direct_features(evaluator, sample_images)["clip"] @ direct_text_feature(evaluator, "a dog")
    negative, positive = torch.nonzero(cos < 0).flatten(), torch.nonzero(cos > 0).flatten()
    assert len(negative) and len(positive), f"precondition: mixed-sign cosines, got {cos.tolist()}"
    refs = sample_images[:2]
    alone = evaluator.evaluate_prompt([sample_images[int(negative[0])]], refs, prompt)
    assert alone.clip_t == 0.0
    mixed = evaluator.evaluate_prompt(sample_images, refs, prompt)
    assert mixed.clip_t == pytest.approx(float(cos.clamp_min(0).mean()), abs=1e-5)
    assert mixed.clip_t > float(cos.mean()) + 1e-4  # the clamp is per image, before averaging


def test_subject_scores_average_their_prompts(evaluator, sample_images):
    refs = sample_images[:3]
    by_prompt = {"a sks dog": sample_images[3:5], "a red sks dog": sample_images[5:]}
    result = evaluator.evaluate_subject(by_prompt, refs, "dog")
    assert result.subject == "dog"
    assert [p.prompt for p in result.prompts] == list(by_prompt)
    for metric in ("dino", "clip_i", "clip_t"):
        assert getattr(result, metric) == pytest.approx(sum(getattr(p, metric) for p in result.prompts) / 2)
    # The shared reference features give what each prompt gives on its own.
    for row, (prompt, imgs) in zip(result.prompts, by_prompt.items()):
        alone = evaluator.evaluate_prompt(imgs, refs, prompt)
        assert (row.dino, row.clip_i, row.clip_t) == pytest.approx((alone.dino, alone.clip_i, alone.clip_t))
    overall = mean_scores([result, evaluator.evaluate_subject(by_prompt, sample_images[4:], "cat")])
    assert set(overall) == {"dino", "clip_i", "clip_t"}
    with pytest.raises(ValueError, match="no rows"):
        mean_scores([])


def test_reference_baseline_excludes_self_pairs(evaluator, sample_images):
    refs = sample_images[:4]
    base = evaluator.reference_baseline(refs)
    feats = direct_features(evaluator, refs)
    for metric, key in (("dino", "dino"), ("clip_i", "clip")):
        sims = feats[key] @ feats[key].T
        off_diagonal = (sims.sum() - sims.diagonal().sum()) / (4 * 3)
        assert base[metric] == pytest.approx(float(off_diagonal), abs=1e-5)
        assert base[metric] < float(sims.mean()) - 1e-4  # including the cos = 1 self-pairs would raise it
    with pytest.raises(ValueError, match="at least two reference images"):
        evaluator.reference_baseline(refs[:1])


def test_numpy_and_tensor_inputs_give_the_same_metrics(evaluator, sample_images):
    same_size = [im.resize((40, 36)) for im in sample_images[:4]]
    arrays = [np.asarray(im) for im in same_size]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    rows = [
        evaluator.evaluate_prompt(gen, refs, "a sks dog")
        for gen, refs in ((same_size[2:], same_size[:2]), (arrays[2:], arrays[:2]), (batch[2:], batch[:2]))
    ]
    for row in rows[1:]:
        assert (row.dino, row.clip_i, row.clip_t) == pytest.approx(
            (rows[0].dino, rows[0].clip_i, rows[0].clip_t), abs=1e-6
        )


def test_dreambench_photos_end_to_end(evaluator, dreambench_dir):
    """Real photos (an object, a live subject and its look-alike): baselines, and one subject vs another."""
    classes = load_dreambench_classes(str(dreambench_dir / "prompts_and_classes.txt"))
    names = ("backpack", "dog", "dog2")
    assert set(names) <= set(classes)
    photos = {name: load_image_folder(dreambench_dir / name) for name in names}
    for name, refs in photos.items():
        base = evaluator.reference_baseline(refs)
        assert all(math.isfinite(v) and -1.0 <= v < 1.0 for v in base.values()), (name, base)
    dog = evaluator.evaluate_subject({"a sks dog on the beach": photos["dog2"]}, photos["dog"], "dog")
    assert all(math.isfinite(v) for v in (dog.dino, dog.clip_i, dog.clip_t))
    assert -1.0 <= dog.dino <= 1.0 and -1.0 <= dog.clip_i <= 1.0 and 0.0 <= dog.clip_t <= 1.0


def test_errors_name_the_problem(evaluator, tmp_path, tiny_vit_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DreamBenchEvaluator.from_pretrained(dino=tmp_path / "nope", clip=tmp_path / "nope2")
    with pytest.raises(ValueError, match="not a CLIP-style"):
        DreamBenchEvaluator.from_pretrained(dino=tiny_vit_dir, clip=tiny_vit_dir)
    with pytest.raises(ValueError, match="No images"):
        evaluator.evaluate_prompt([], [np.zeros((8, 8, 3), np.uint8)] * 2, "a sks dog")
