"""The `rpo-diffusers` command on real PNG files."""

from __future__ import annotations

import csv
import json

import pytest

from rpo_diffusers.cli import main
from rpo_diffusers.data import load_image_folder
from rpo_diffusers.rewards import LambdaHarmonicScorer


@pytest.fixture
def folders(tmp_path, sample_images):
    refs, imgs = tmp_path / "refs", tmp_path / "imgs"
    refs.mkdir()
    imgs.mkdir()
    for i, im in enumerate(sample_images[:3]):
        im.save(refs / f"r{i}.png")
    for i, im in enumerate(sample_images[3:]):
        im.convert("RGBA").save(imgs / f"g{i}.png")
    (imgs / "notes.txt").write_text("ignored")
    return refs, imgs


def test_score_prints_a_table_that_matches_the_library(folders, tiny_scorer_dirs, tmp_path, capsys):
    refs, imgs = folders
    out = tmp_path / "scores.json"
    code = main(["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks dog on the Moon",
                 "--model", str(tiny_scorer_dirs["align"]), "--lambda", "0.3", "--output", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "'a dog on the Moon'" in printed and "g0.png" in printed and "mean" in printed
    rows = json.loads(out.read_text())
    scorer = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["align"], lambda_=0.3)
    expected = scorer.score(
        load_image_folder(imgs), "a sks dog on the Moon", reference_images=load_image_folder(refs)
    )
    assert [r["reward"] for r in rows[:-1]] == pytest.approx(expected.reward.tolist(), abs=1e-6)
    assert rows[-1]["image"] == "mean"


def test_score_bad_input_exits_2_with_a_clear_message(folders, tiny_scorer_dirs, tmp_path, capsys):
    refs, imgs = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", "--references", str(empty), "--images", str(imgs), "--prompt", "a sks dog",
                 "--model", str(tiny_scorer_dirs["clip"])]) == 2  # fmt: skip
    assert "No images found" in capsys.readouterr().err
    assert main(["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks dog",
                 "--model", str(tiny_scorer_dirs["clip"]), "--lambda", "3"]) == 2  # fmt: skip
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks dog",
                 "--model", str(tmp_path / "no-model")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_writes_json_and_csv(tmp_path, sample_images, tiny_vit_dir, tiny_scorer_dirs, capsys):
    refs_root, gen_root = tmp_path / "refs", tmp_path / "gen"
    for subject in ("dog", "backpack"):
        (refs_root / subject).mkdir(parents=True)
        for i, im in enumerate(sample_images[:2]):
            im.save(refs_root / subject / f"{i}.jpg")
        for prompt in ("a sks dog on the beach", "a red sks dog"):
            d = gen_root / subject / prompt.replace(" ", "_")
            d.mkdir(parents=True)
            for i, im in enumerate(sample_images[2:5]):
                im.save(d / f"{i}.png")
    (gen_root / "dog" / "a_red_sks_dog" / "prompt.txt").write_text("a red sks dog")
    code = main(["evaluate", "--images", str(gen_root), "--references", str(refs_root),
                 "--dino_model", str(tiny_vit_dir), "--clip_model", str(tiny_scorer_dirs["clip"])])  # fmt: skip
    assert code == 0
    data = json.loads((gen_root / "dreambench_metrics.json").read_text())
    assert [s["subject"] for s in data["subjects"]] == ["backpack", "dog"]
    assert {p["prompt"] for p in data["subjects"][1]["prompts"]} == {
        "a sks dog on the beach",
        "a red sks dog",
    }
    for metric in ("dino", "clip_i", "clip_t"):
        assert data["overall"][metric] == pytest.approx(sum(s[metric] for s in data["subjects"]) / 2)
    with open(gen_root / "dreambench_metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert "reference images" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert (
        main(["demo", "--output_dir", str(tmp_path), "--max_train_steps", "2", "--validation_steps", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "chosen step" in out and "step    2" in out
    model = tmp_path / "model"
    for name in (
        "model_index.json",
        "rpo_unet.safetensors",
        "reward_plot.png",
        "before_after.png",
        "rpo_history.json",
    ):
        assert (model / name).exists(), name
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert metrics["best_step"] in (0, 1, 2)
