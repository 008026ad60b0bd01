"""The `rpo-diffusers` command on real image files: tables, JSON/CSV that match the library, exit codes."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rpo_diffusers.cli import main
from rpo_diffusers.data import load_image_folder
from rpo_diffusers.metrics import DreamBenchEvaluator
from rpo_diffusers.rewards import LambdaHarmonicScorer


def score_args(refs, imgs, model, *extra: str) -> list[str]:
    return ["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks dog on the Moon",
            "--model", str(model), *extra]  # fmt: skip


@pytest.fixture
def folders(tmp_path, sample_images):
    """refs/ with three PNGs; imgs/ with three RGBA PNGs and a text file the command must skip."""
    refs, imgs = tmp_path / "refs", tmp_path / "imgs"
    refs.mkdir()
    imgs.mkdir()
    for i, im in enumerate(sample_images[:3]):
        im.save(refs / f"r{i}.png")
    for i, im in enumerate(sample_images[3:]):
        im.convert("RGBA").save(imgs / f"g{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    return refs, imgs


@pytest.fixture(scope="module")
def text_only_model(tmp_path_factory) -> Path:
    """A saved CLIPTextModel: loads through AutoModel but has no image tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("text_only") / "clip-text"
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(path)
    return path


def test_score_table_and_json_match_the_library(folders, tiny_scorer_dirs, tmp_path, capsys):
    refs, imgs = folders
    out = tmp_path / "scores.json"
    code = main(score_args(refs, imgs, tiny_scorer_dirs["align"], "--lambda", "0.3", "--batch_size", "2",
                           "--output", str(out)))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "'a dog on the Moon'" in printed and "λ = 0.3" in printed
    rows = json.loads(out.read_text())
    assert [r["image"] for r in rows] == ["g0.png", "g1.png", "g2.png", "mean"]
    for row in rows:
        assert row["image"] in printed
    scorer = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["align"], lambda_=0.3)
    expected = scorer.score(
        load_image_folder(imgs), "a sks dog on the Moon", reference_images=load_image_folder(refs)
    )
    for key, values in (
        ("align_i", expected.image_alignment),
        ("align_t", expected.text_alignment),
        ("reward", expected.reward),
    ):
        assert [r[key] for r in rows[:-1]] == pytest.approx(values.tolist(), abs=1e-6)
        assert rows[-1][key] == pytest.approx(float(values.mean()), abs=1e-6)


def test_score_bad_input_exits_2_with_a_clear_message(
    folders, tiny_scorer_dirs, text_only_model, tmp_path, capsys
):
    refs, imgs = folders
    model = tiny_scorer_dirs["clip"]
    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("no photos here")
    zero = tmp_path / "zero"
    shutil.copytree(refs, zero)
    (zero / "r1.png").write_bytes(b"")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(refs, corrupt)
    (corrupt / "r2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    cases = {
        "missing folder": (score_args(tmp_path / "absent", imgs, model), "does not exist"),
        "non-image files only": (score_args(only_text, imgs, model), "No images found"),
        "zero-size image": (score_args(zero, imgs, model), "empty (0 bytes)"),
        "corrupt image": (score_args(corrupt, imgs, model), "corrupt or not an image"),
        "lambda outside [0, 1]": (score_args(refs, imgs, model, "--lambda", "3"), "must be in [0, 1]"),
        "unknown model path": (score_args(refs, imgs, tmp_path / "no-model"), "does not exist"),
        "model without an image tower": (score_args(refs, imgs, text_only_model), "no image and text towers"),
    }
    for case, (argv, message) in cases.items():
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert "error: " in err and message in err, (case, err)


def test_score_empty_images_folder_exits_2(folders, tiny_scorer_dirs, tmp_path, capsys):
    refs, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(score_args(refs, empty, tiny_scorer_dirs["clip"])) == 2
    assert "No images found" in capsys.readouterr().err


def test_console_script_reports_bad_input_with_exit_code_2(folders, tiny_scorer_dirs):
    """The installed `rpo-diffusers` entry point (falls back to `python -m` when not on this interpreter)."""
    refs, imgs = folders
    script = Path(sys.executable).parent / "rpo-diffusers"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rpo_diffusers.cli"]
    proc = subprocess.run(
        [*command, *score_args(refs, imgs, tiny_scorer_dirs["clip"], "--lambda", "-0.5")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "must be in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def make_generated_tree(root: Path, refs_root: Path, sample_images, subjects=("dog", "backpack")) -> None:
    """REFS/<subject>/*.jpg and IMAGES/<subject>/<prompt folder>/*.png as `evaluate` expects them."""
    for subject in subjects:
        (refs_root / subject).mkdir(parents=True)
        for i, im in enumerate(sample_images[:2]):
            im.save(refs_root / subject / f"{i}.jpg")
        for prompt in ("a sks dog on the beach", "a red sks dog"):
            d = root / subject / prompt.replace(" ", "_")
            d.mkdir(parents=True)
            for i, im in enumerate(sample_images[2:5]):
                im.save(d / f"{i}.png")
    (root / subjects[0] / "a_red_sks_dog" / "prompt.txt").write_text("a red sks dog, wet\n")


def evaluate_args(images, refs, vit, clip, *extra: str) -> list[str]:
    return ["evaluate", "--images", str(images), "--references", str(refs), "--dino_model", str(vit),
            "--clip_model", str(clip), *extra]  # fmt: skip


def test_evaluate_writes_json_and_csv_that_match_the_library(
    tmp_path, sample_images, tiny_vit_dir, tiny_scorer_dirs, capsys
):
    gen_root, refs_root, out = tmp_path / "gen", tmp_path / "refs", tmp_path / "report"
    make_generated_tree(gen_root, refs_root, sample_images, ("dog", "backpack", "cat"))
    argv = evaluate_args(gen_root, refs_root, tiny_vit_dir, tiny_scorer_dirs["clip"])
    assert main([*argv, "--subjects", "dog", "backpack", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reference images" in printed and "cat" not in printed
    data = json.loads((out / "dreambench_metrics.json").read_text())
    assert [s["subject"] for s in data["subjects"]] == ["backpack", "dog"]

    evaluator = DreamBenchEvaluator.from_pretrained(dino=tiny_vit_dir, clip=tiny_scorer_dirs["clip"])
    images = load_image_folder(gen_root / "dog" / "a_red_sks_dog")
    baselines = []
    for got in data["subjects"]:
        subject = got["subject"]
        prompts = {"a red sks dog, wet" if subject == "dog" else "a red sks dog": images,
                   "a sks dog on the beach": images}  # fmt: skip
        refs = load_image_folder(refs_root / subject)
        want = evaluator.evaluate_subject(prompts, refs, subject).to_dict()
        baselines.append(evaluator.reference_baseline(refs))
        assert {p["prompt"] for p in got["prompts"]} == set(prompts)
        for metric in ("dino", "clip_i", "clip_t"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-5)
    table = {row["subject"]: row for row in data["table"]}
    for metric in ("dino", "clip_i", "clip_t"):
        assert data["overall"][metric] == pytest.approx(sum(s[metric] for s in data["subjects"]) / 2)
    for metric in ("dino", "clip_i"):
        want = sum(b[metric] for b in baselines) / 2
        assert table["reference images"][metric] == pytest.approx(want, abs=1e-5)

    with open(out / "dreambench_metrics.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    json_rows = {(s["subject"], p["prompt"]): p for s in data["subjects"] for p in s["prompts"]}
    assert len(csv_rows) == len(json_rows) == 4
    for row in csv_rows:
        p = json_rows[(row["subject"], row["prompt"])]
        assert int(row["num_images"]) == p["num_images"] == 3
        assert [float(row[m]) for m in ("dino", "clip_i", "clip_t")] == pytest.approx(
            [p["dino"], p["clip_i"], p["clip_t"]], abs=1e-9
        )


def test_evaluate_missing_references_exits_2(tmp_path, sample_images, tiny_vit_dir, tiny_scorer_dirs, capsys):
    gen_root, refs_root = tmp_path / "gen", tmp_path / "refs"
    make_generated_tree(gen_root, refs_root, sample_images)
    shutil.rmtree(refs_root / "backpack")
    assert main(evaluate_args(gen_root, refs_root, tiny_vit_dir, tiny_scorer_dirs["clip"])) == 2
    err = capsys.readouterr().err
    assert "backpack" in err and "does not exist" in err
    assert main(evaluate_args(gen_root, refs_root, tiny_vit_dir, tiny_vit_dir, "--subjects", "dog")) == 2
    assert "not a CLIP-style" in capsys.readouterr().err


def test_evaluate_without_subject_folders_exits_2(tmp_path, tiny_vit_dir, tiny_scorer_dirs, capsys):
    (tmp_path / "gen").mkdir()
    assert main(evaluate_args(tmp_path / "gen", tmp_path, tiny_vit_dir, tiny_scorer_dirs["clip"])) == 2
    assert "No subject folders" in capsys.readouterr().err


def test_evaluate_against_the_dreambench_folder(tmp_path, dreambench_dir, tiny_vit_dir, tiny_scorer_dirs):
    """--references pointed at the DreamBench dataset itself; dog2's photos stand in for generated dogs."""
    gen = tmp_path / "gen" / "dog" / "a_sks_dog_on_the_beach"
    gen.mkdir(parents=True)
    for photo in sorted((dreambench_dir / "dog2").glob("*.jpg"))[:3]:
        shutil.copy(photo, gen / photo.name)
    argv = evaluate_args(tmp_path / "gen", dreambench_dir, tiny_vit_dir, tiny_scorer_dirs["clip"])
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "dreambench_metrics.json").read_text())
    (dog,) = data["subjects"]
    assert dog["prompts"][0]["num_images"] == 3
    values = [dog[m] for m in ("dino", "clip_i", "clip_t")]
    values += [data["table"][-1][m] for m in ("dino", "clip_i")]  # the reference-images row
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values), values
