"""The toy world: deterministic renders whose captions and subjects follow the ground truth."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rpo_diffusers.data import load_image_folder
from rpo_diffusers.prompts import has_identifier
from rpo_diffusers.toy import SUBJECTS, Scene, get_subject, random_scene, render
from rpo_diffusers.toy.models import (
    ASSETS_DIR,
    ATTRIBUTE_GROUPS,
    SAMPLING,
    AttributeClassifier,
    asset_path,
    assets_available,
    context_accuracy,
    context_hits,
    identity_accuracy,
    identity_hits,
    load_evaluator,
    load_pipeline,
    load_scorer,
    object_accuracy,
    parse_prompt,
)
from rpo_diffusers.toy.subjects import EVALUATION_CONTEXTS, TRAINING_CONTEXTS
from rpo_diffusers.toy.world import BACKGROUNDS, COLORS, SPLIT


def test_render_is_deterministic_and_depends_on_the_scene():
    scene = Scene(shape="ball", color="red", pattern="striped", background="beach")
    a, b = np.asarray(render(scene, seed=1)), np.asarray(render(scene, seed=1))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    other = np.asarray(render(Scene(shape="box", color="red", pattern="striped", background="beach"), seed=1))
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 2


def test_object_colour_is_where_the_object_is():
    im = np.asarray(render(Scene(shape="box", color="blue", background="studio", scale=0.6), size=32)).astype(
        int
    )
    center = im[14:20, 14:20].reshape(-1, 3).mean(0)
    assert np.abs(center - np.array(COLORS["blue"])).max() < 30
    corner = im[:4, :4].reshape(-1, 3).mean(0)
    assert np.abs(corner - np.array([150, 150, 150])).max() < 10


def test_backgrounds_are_distinct():
    means = [
        np.asarray(render(Scene(shape="ball", color="red", background=b, scale=0.3))).reshape(-1, 3).mean(0)
        for b in BACKGROUNDS
    ]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 8, (BACKGROUNDS[i], BACKGROUNDS[j])


def test_captions_follow_the_ground_truth():
    assert (
        Scene(shape="ball", color="red", pattern="striped", background="beach").caption()
        == "a red striped ball on the beach"
    )
    assert Scene(shape="cone", color="green", accessory="hat", style="painting").caption() == (
        "a green cone wearing a hat in van gogh style"
    )
    assert Scene(shape="ring", color="white", background="moon").caption("sks") == "a sks ring on the moon"


def test_base_distribution_never_shows_the_subjects_pattern():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    assert all(s.pattern != SPLIT for s in scenes)
    assert {s.background for s in scenes} == set(BACKGROUNDS) and {s.shape for s in scenes} == {
        "ball",
        "box",
        "cone",
        "ring",
    }


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_subjects_have_references_on_one_background_and_prompts(name, tmp_path):
    subject = get_subject(name)
    scenes = subject.reference_scenes()
    assert 4 <= len(scenes) <= 6
    assert {s.background for s in scenes} == {"studio"} and len({(s.x, s.y, s.angle) for s in scenes}) == len(
        scenes
    )
    assert all(s.pattern == SPLIT for s in scenes)
    train, evals = subject.training_prompts(), subject.evaluation_prompts()
    assert len(train) == len(TRAINING_CONTEXTS) == 8 and len(evals) == len(EVALUATION_CONTEXTS)
    assert not set(train) & set(evals)
    assert all(has_identifier(p, "sks") and subject.class_noun in p for p in train + evals)
    folder = subject.write_references(tmp_path / name)
    assert len(load_image_folder(folder)) == len(scenes)


def test_unknown_subject():
    with pytest.raises(ValueError, match="Unknown toy subject"):
        get_subject("nope")


# ------------------------------------------------------------------------------------------------
# prompts read back into ground truth, and the judge's logic on a real (controlled) classifier
# ------------------------------------------------------------------------------------------------


def test_parse_prompt_recovers_every_caption_of_the_base_distribution():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = random_scene(rng)
        parsed = parse_prompt(scene.caption())
        for key in ("shape", "color", "pattern", "background", "accessory", "style"):
            assert parsed[key] == getattr(scene, key), (scene.caption(), key)
        assert "identity" not in parsed and parse_prompt("a photo of " + scene.caption()) == parsed


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_parse_prompt_reads_subject_prompts(name):
    subject = get_subject(name)
    for context, prompt in zip(EVALUATION_CONTEXTS, subject.evaluation_prompts(), strict=True):
        parsed = parse_prompt(prompt)
        expected = subject.scene(**context)
        assert parsed["identity"] == "yes" and parsed["shape"] == subject.shape
        assert [parsed[k] for k in ("background", "accessory", "style")] == [
            expected.background,
            expected.accessory,
            expected.style,
        ]
        assert parsed.get("color") == context.get("color")
    described = parse_prompt(f"a {subject.color} and {subject.color2} {subject.shape}")
    assert (described["pattern"], described["color2"]) == (SPLIT, subject.color2)


def test_parse_prompt_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="shape"):
        parse_prompt("a sks dog on the beach")
    with pytest.raises(ValueError, match="Unknown word"):
        parse_prompt("a shiny ball")


def _biased_classifier(tmp_path, **chosen: str):
    """A real ViTForImageClassification whose output ignores the image and picks ``chosen`` labels."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = [f"{g}:{v}" for g, values in ATTRIBUTE_GROUPS.items() for v in values]
    model = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={v: i for i, v in enumerate(labels)})
    )  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        for group, value in chosen.items():
            model.classifier.bias[labels.index(f"{group}:{value}")] = 5.0
    model.save_pretrained(tmp_path / "clf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clf")
    return AttributeClassifier.from_pretrained(tmp_path / "clf")


def _redblue_ball_on_the_moon(tmp_path):
    """A classifier that sees redblue_ball's look on the moon in every image."""
    return _biased_classifier(
        tmp_path, shape="ball", color="red", color2="blue", pattern=SPLIT, background="moon", accessory="none",
        style="photo",
    )  # fmt: skip


def test_identity_and_context_hits_follow_the_classifier(tmp_path):
    subject = get_subject("redblue_ball")
    clf = _redblue_ball_on_the_moon(tmp_path)
    images = subject.reference_images()[:2]
    assert clf.predict(images)[0] == {
        "shape": "ball", "color": "red", "color2": "blue", "pattern": SPLIT, "background": "moon",
        "accessory": "none", "style": "photo",
    }  # fmt: skip
    assert identity_accuracy(images, subject, classifier=clf) == 1.0
    assert identity_accuracy(images, get_subject("yellowpurple_box"), classifier=clf) == 0.0
    # the shape is the class noun, not the identity: the same appearance on a box is still the subject
    assert identity_accuracy(images, replace(subject, shape="box"), classifier=clf) == 1.0
    # a red/purple split is this subject by its look; the strict check also wants the second colour
    other_second = replace(subject, color2="purple")
    assert identity_accuracy(images, other_second, classifier=clf) == 1.0
    assert identity_accuracy(images, other_second, classifier=clf, check_second_colour=True) == 0.0
    assert identity_accuracy(images, subject, classifier=clf, check_second_colour=True) == 1.0
    # a colour-change prompt expects the new colour, so the red object is not "a green sks ball"
    assert identity_hits(images, subject, ["a sks ball on the moon", "a green sks ball"], clf) == [
        True,
        False,
    ]
    assert context_hits(images, ["a sks ball on the moon", "a sks ball on the beach"], clf) == [True, False]
    assert context_accuracy(images, ["a sks ball on the moon wearing a hat"] * 2, clf) == 0.0
    assert object_accuracy(images, ["a red and blue ball on the moon", "a red ball"], clf) == 0.5
    with pytest.raises(ValueError, match="one prompt per image"):
        context_accuracy(images, ["a sks ball"], clf)


def test_identity_and_context_probabilities_rank_as_the_verdicts(tmp_path):
    """The continuous scores behind ``toy_fidelity.py --judge_twins``: the classifier's probability of exactly
    what the verdict checks, so a probability above one half for every expected attribute means a hit."""
    from rpo_diffusers.toy.models import context_probabilities, identity_probabilities

    subject = get_subject("redblue_ball")
    clf = _redblue_ball_on_the_moon(tmp_path)
    images = subject.reference_images()[:2]
    prompts = ["a sks ball on the moon", "a green sks ball"]
    probs = clf.probabilities(images)
    assert set(probs[0]) == set(clf.groups) and sum(probs[0]["color"].values()) == pytest.approx(1.0)
    identity = identity_probabilities(images, subject, prompts, clf)
    assert identity[0] == pytest.approx(probs[0]["pattern"][SPLIT] * probs[0]["color"]["red"]) and identity[0] > 0.5
    assert identity[1] == pytest.approx(probs[1]["pattern"][SPLIT] * probs[1]["color"]["green"]) and identity[1] < 0.5
    assert identity_hits(images, subject, prompts, clf) == [p > 0.5 for p in identity]
    context = context_probabilities(images, ["a sks ball on the moon", "a sks ball on the beach"], clf)
    assert context[0] > 0.5 > context[1]
    # a colour-change prompt's context includes the new colour
    assert context_probabilities(images[:1], ["a green sks ball on the moon"], clf)[0] < context[0]
    with pytest.raises(ValueError, match="one prompt per image"):
        identity_probabilities(images, subject, prompts[:1], clf)


def test_missing_assets_name_the_build_command(tmp_path):
    assert not assets_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="build_toy_world.py"):
        asset_path("sd", tmp_path)
    with pytest.raises(ValueError, match="Unknown toy model"):
        asset_path("vae")


# ------------------------------------------------------------------------------------------------
# the bundled models (skipped until they are built and committed)
# ------------------------------------------------------------------------------------------------

needs_assets = pytest.mark.skipif(not assets_available(), reason="toy world models not built/committed yet")


@needs_assets
def test_bundled_models_load_through_from_pretrained():
    from diffusers import StableDiffusionPipeline

    from rpo_diffusers.metrics import DreamBenchEvaluator
    from rpo_diffusers.rewards import LambdaHarmonicScorer

    pipe = load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and "sks</w>" in pipe.tokenizer.get_vocab()
    assert isinstance(load_scorer(), LambdaHarmonicScorer)
    assert isinstance(load_evaluator(), DreamBenchEvaluator)
    assert asset_path("scorer") != asset_path("clip_eval")
    report = json.loads((ASSETS_DIR / "build_report.json").read_text())
    assert "faithfulness" in report and report["total_mb"] <= 25
    # text encoder and tokenizer files as in real SD checkpoints, which transformers 4 reads too
    text_keys = load_file(str(asset_path("sd") / "text_encoder" / "model.safetensors")).keys()
    assert text_keys and all(k.startswith("text_model.") for k in text_keys)
    assert (asset_path("sd") / "tokenizer" / "vocab.json").exists()
    assert (asset_path("sd") / "tokenizer" / "merges.txt").exists()


@needs_assets
def test_bundled_classifier_is_right_on_fresh_renders():
    rng = np.random.default_rng(2024)
    scenes = [random_scene(rng) for _ in range(48)]
    images = [render(s, seed=900 + i) for i, s in enumerate(scenes)]
    assert context_accuracy(images, [s.caption() for s in scenes]) >= 0.7
    for subject in SUBJECTS.values():
        prompts = subject.evaluation_prompts()
        renders = [render(subject.scene(**c), seed=i) for i, c in enumerate(EVALUATION_CONTEXTS)]
        assert identity_accuracy(renders, subject, prompts) >= 0.6, subject.name
        assert identity_accuracy(subject.reference_images(), subject) >= 0.6, subject.name


@needs_assets
def test_bundled_pipeline_draws_a_prompts_context():
    pipe = load_pipeline()
    prompts = [
        "a red ball at night",
        "a yellow box on the beach",
        "a blue cone in the snow",
        "a green ring on the moon",
    ]
    images = pipe(
        prompts, height=SAMPLING["resolution"], width=SAMPLING["resolution"],
        num_inference_steps=SAMPLING["num_inference_steps"], guidance_scale=SAMPLING["guidance_scale"],
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    ).images  # fmt: skip
    assert context_accuracy(images, prompts) >= 0.5


def test_ground_truth_quality_is_the_harmonic_mean_of_identity_and_context():
    from rpo_diffusers.toy import ground_truth_quality

    assert ground_truth_quality(0.5, 0.5) == pytest.approx(0.5)
    assert ground_truth_quality(0.25, 0.5) == pytest.approx(1 / 3)
    assert ground_truth_quality(0.0, 1.0) == ground_truth_quality(1.0, 0.0) == ground_truth_quality(0.0, 0.0) == 0.0
