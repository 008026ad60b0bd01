"""The toy world: deterministic renders whose captions and subjects follow the ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from rpo_diffusers.data import load_image_folder
from rpo_diffusers.prompts import has_identifier
from rpo_diffusers.toy import SUBJECTS, Scene, get_subject, random_scene, render
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
