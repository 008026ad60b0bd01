"""training_examples/benchmark_methods.py end to end: the bundled toy world (--quick) and the DreamBench
code path with tiny models built here (the one a GPU user runs with real checkpoints)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from example_scripts import load_example

from rpo_diffusers.toy import assets_available

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    return load_example("benchmark_methods")


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_quick_benchmark_rpo_raises_identity_over_the_base_model(tmp_path, capsys):
    # generate, label, train, validate, select, export, evaluate: one toy subject, seeded
    bench = load_benchmark()
    assert bench.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "results.csv")
    assert set(rows) == {"base", "dreambooth", "rpo_lambda0.5"}
    base, dreambooth, rpo = rows["base"], rows["dreambooth"], rows["rpo_lambda0.5"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["args"]["max_train_steps"]
    assert int(dreambooth["best_step"]) == steps  # no early stopping: the last step is the export
    history = summary["runs"]["redblue_ball/rpo_lambda0.5"]["history"]
    rewards = {h["step"]: h["reward"] for h in history}
    assert rewards[int(rpo["best_step"])] == max(rewards.values())  # early stopping picks the best reward
    # the ground truth: the base model never draws the subject; RPO's chosen model does, with a margin
    assert float(base["identity_acc"]) <= 0.1
    assert float(rpo["identity_acc"]) >= float(base["identity_acc"]) + 0.15
    for row in rows.values():
        for key in ("dino", "clip_i", "clip_t", "lambda_harmonic", "identity_acc", "context_acc"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    table = (tmp_path / "table.md").read_text()
    assert "RPO λ_val 0.5" in table and "identity_acc" in table and table in capsys.readouterr().out
    assert (tmp_path / "tradeoff.png").exists() and (tmp_path / "grids/redblue_ball.png").exists()
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # weights are dropped unless --keep_models


@pytest.mark.slow
def test_benchmark_runs_on_dreambench_with_given_checkpoints(
    tmp_path, dreambench_dir, tiny_sd_dir, tiny_scorer_dirs, tiny_vit_dir
):
    bench = load_benchmark()
    argv = [
        "--output_dir", str(tmp_path), "--dreambench_dir", str(dreambench_dir), "--subjects", "dog",
        "--methods", "base", "rpo_lambda0.5", "--model", str(tiny_sd_dir), "--scorer", str(tiny_scorer_dirs["clip"]),
        "--dino", str(tiny_vit_dir), "--clip", str(tiny_scorer_dirs["clip"]), "--resolution", "32",
        "--num_inference_steps", "2", "--validation_num_inference_steps", "2", "--max_train_steps", "2", "--validation_steps", "1", "--images_per_prompt", "1",
        "--num_validation_images", "1", "--num_eval_images", "1", "--use_lora", "--keep_models",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    rows = read_rows(tmp_path / "results.csv")
    assert set(rows) == {"base", "rpo_lambda0.5"}
    assert rows["base"]["identity_acc"] == ""  # no ground truth outside the toy world
    assert (tmp_path / "runs/dog/rpo_lambda0.5/pytorch_lora_weights.safetensors").exists()
    with pytest.raises(SystemExit):
        bench.parse_args(["--dreambench_dir", str(dreambench_dir)])  # real checkpoints must be named
    with pytest.raises(ValueError, match="Not DreamBench subjects"):
        bench.main([*argv[:4], "--subjects", "no_such_subject", *argv[6:]])


def test_summary_gives_intervals_and_a_paired_comparison_with_dreambooth():
    bench = load_benchmark()
    methods = [m for m in bench.METHODS if m.name in ("dreambooth", "rpo_lambda0.5")]
    rows = []
    for i, subject in enumerate(["a", "b", "c", "d"]):
        for name, identity in (("dreambooth", 0.2 + 0.1 * i), ("rpo_lambda0.5", 0.3 + 0.1 * i - 0.15 * (i == 3))):
            row = {k: 0.5 for k in bench.METRICS}
            row.update(subject=subject, method=name, identity_acc=identity)
            rows.append(row)
    summary = {s["method"]: s for s in bench.summarize(rows, methods)}
    low, high = summary["dreambooth"]["identity_acc_ci"]
    assert low < summary["dreambooth"]["identity_acc"][0] < high
    paired = summary["rpo_lambda0.5"]["vs_dreambooth"]["identity_acc"]
    assert (paired["wins"], paired["losses"], paired["subjects"]) == (3, 1, 4)
    assert paired["mean_diff"] == pytest.approx((0.1 * 3 - 0.05) / 4)
    assert "vs_dreambooth" not in summary["dreambooth"]
    table = bench.format_comparison(list(summary.values()), ["identity_acc"])
    assert "| RPO λ_val 0.5 | +0.062 [" in table and "wins 3/4" in table


def test_selection_agreement_compares_the_chosen_steps_and_their_ground_truth():
    bench = load_benchmark()
    rows = []
    for subject, (paper_step, fast_step, fast_identity) in {"a": (40, 40, 0.5), "b": (80, 120, 0.25)}.items():
        rows.append({"subject": subject, "method": "rpo_paper_val", "best_step": paper_step,
                     "identity_acc": 0.5, "context_acc": 0.5, "lambda_harmonic": 0.6})  # fmt: skip
        rows.append({"subject": subject, "method": "rpo_lambda0.5", "best_step": fast_step,
                     "identity_acc": fast_identity, "context_acc": 0.5, "lambda_harmonic": 0.6})  # fmt: skip
    agreement = bench.selection_agreement(rows, *bench.SELECTION_PAIRS[0], toy=True)
    assert agreement["same_step"] == 1 and agreement["subjects"] == 2
    # b: harmonic(0.25, 0.5) = 1/3 against 0.5
    assert agreement["max_abs_diff"] == pytest.approx(0.5 - 1 / 3)
    assert agreement["mean_abs_diff"] == pytest.approx((0.5 - 1 / 3) / 2)
    assert (agreement["paired"]["ties"], agreement["paired"]["losses"]) == (1, 1)
    assert "the same step for 1/2 subjects" in bench.format_agreement(agreement)
    # outside the toy world the λ-harmonic reward is the quality: equal here
    assert bench.selection_agreement(rows, *bench.SELECTION_PAIRS[0], toy=False)["max_abs_diff"] == 0
    assert bench.selection_agreement(rows, "rpo_lambda0.5", "dreambooth", toy=True) is None


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_methods_that_read_a_shared_run_match_runs_of_their_own(tmp_path):
    # one training, several selections: another λ_val (the run's images rescored), the last step, and another
    # validation sampler (its own images) must give what a run of their own gives, weights included
    from dataclasses import replace

    from safetensors.torch import load_file

    bench = load_benchmark()
    args = bench.parse_args(["--quick", "--output_dir", str(tmp_path), "--max_train_steps", "40",
                             "--validation_steps", "20"])  # fmt: skip
    subject = bench.toy_subjects(["redblue_ball"])[0]
    by_name = {m.name: m for m in bench.METHODS}
    readers = [by_name[n] for n in ("rpo_lambda0.3", "pref_no_es", "rpo_paper_val")]
    shared = bench.train_and_load(args, subject, by_name["rpo_lambda0.5"], tmp_path / "shared" / "rpo_lambda0.5", readers)
    assert list(shared) == ["rpo_lambda0.5", "rpo_lambda0.3", "pref_no_es", "rpo_paper_val"]
    assert shared["pref_no_es"][1]["best_step"] == 40  # no early stopping: the last step
    for m in readers:
        alone = bench.train_and_load(args, subject, replace(m, trained_by=None), tmp_path / "alone" / m.name)[m.name][1]
        info = shared[m.name][1]
        assert info["best_step"] == alone["best_step"], m.name
        # a last-step run of its own validates at its ends only; at the steps it validates, the rewards are the same
        rewards = {h["step"]: h["reward"] for h in info["history"]}
        assert [h["reward"] for h in alone["history"]] == [rewards[h["step"]] for h in alone["history"]], m.name
        assert len(alone["history"]) == (2 if m.name == "pref_no_es" else len(info["history"])), m.name
        assert info["history"][-1]["per_prompt"] == alone["history"][-1]["per_prompt"], m.name
        assert "per_image" not in alone["history"][-1]  # the callbacks' per-image scores stay out of the history
        mine = load_file(tmp_path / "shared" / m.name / "unet" / "diffusion_pytorch_model.safetensors")
        theirs = load_file(tmp_path / "alone" / m.name / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), m.name
    # another sampler's rewards are its own images', not the run's rescored
    paper = [h["reward"] for h in shared["rpo_paper_val"][1]["history"]]
    assert paper != [h["reward"] for h in shared["rpo_lambda0.5"][1]["history"]]


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_results_with_the_same_weights_are_evaluated_once(tmp_path, monkeypatch):
    # validating only at steps 0 and 20, early stopping exports either the base weights (step 0) or the last
    # step's, DreamBooth's: two distinct models among three rows, so two evaluations, and the third row's scores
    # are its twin's
    bench = load_benchmark()
    drawn = []

    def counted(pipe, *args, **kwargs):
        drawn.append(bench.weights_digest(pipe))
        return generate_images(pipe, *args, **kwargs)

    generate_images = bench.generate_images
    monkeypatch.setattr(bench, "generate_images", counted)
    argv = ["--quick", "--output_dir", str(tmp_path), "--methods", "base", "dreambooth", "es_no_pref",
            "--max_train_steps", "20", "--validation_steps", "20"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = read_rows(tmp_path / "results.csv")
    assert len(drawn) == len(set(drawn)) == 2
    twin = "base" if int(rows["es_no_pref"]["best_step"]) == 0 else "dreambooth"
    metrics = ("dino", "clip_i", "clip_t", "lambda_harmonic", "identity_acc", "context_acc")
    assert all(rows["es_no_pref"][k] == rows[twin][k] for k in metrics)
    assert any(rows["base"][k] != rows["dreambooth"][k] for k in metrics)
    strips = {m: (tmp_path / "runs" / "redblue_ball" / f"{m}.png").read_bytes() for m in ("es_no_pref", twin)}
    assert strips["es_no_pref"] == strips[twin]


@pytest.mark.slow
def test_a_last_step_run_without_readers_validates_at_its_ends_only_and_trains_the_same_weights(tmp_path):
    # nothing selects from DPG's run: it validates at steps 0 and 40 instead of every 20, and the exported weights
    # (critic included in the loss) equal those of a run that validated every 20 steps
    from safetensors.torch import load_file

    from rpo_diffusers.trainer import RPOTrainer

    bench = load_benchmark()
    args = bench.parse_args(["--quick", "--output_dir", str(tmp_path), "--max_train_steps", "40",
                             "--validation_steps", "20"])  # fmt: skip
    subject = bench.toy_subjects(["redblue_ball"])[0]
    method = next(m for m in bench.METHODS if m.name == "dpg_latent")
    ((_, info),) = bench.train_and_load(args, subject, method, tmp_path / "ends" / method.name).values()
    assert [h["step"] for h in info["history"]] == [0, 40] and info["best_step"] == 40
    config = bench.run_config(args, subject, method, tmp_path / "every" / method.name)
    result = RPOTrainer(config, reference_images=subject.references).train()
    assert [h["step"] for h in result.history] == [0, 20, 40]
    assert result.history[-1]["reward"] == info["history"][-1]["reward"]
    mine = load_file(tmp_path / "ends" / method.name / "unet" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(tmp_path / "every" / method.name / "unet" / "diffusion_pytorch_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_readers_wall_time_is_what_a_run_of_its_own_would_take():
    bench = load_benchmark()
    # a shared run of 100 s that spent 22 s on 11 validations
    assert bench.own_run_seconds(100.0, 22.0, 11, early_stopping=True) == 100.0  # the run itself, or es_no_pref
    assert bench.own_run_seconds(100.0, 22.0, 11, early_stopping=False) == pytest.approx(100.0 - 18.0)  # 2 of 11
    assert bench.own_run_seconds(100.0, 22.0, 11, True, own_validation=50.0) == 128.0  # its own sampler's
    assert bench.own_run_seconds(40.0, 4.0, 2, early_stopping=False) == 40.0  # validated at its ends only already


def test_only_selection_settings_may_differ_in_a_shared_run():
    bench = load_benchmark()
    bench.check_shared_runs()  # the bundled METHODS
    bad = bench.Method("x", "x", {"pref_loss_weight": 0.0, "lambda_val": 0.3}, trained_by="rpo_lambda0.5")
    with pytest.raises(ValueError, match="differs from rpo_lambda0.5 in training settings"):
        bench.check_shared_runs([*bench.METHODS, bad])
    chained = bench.Method("y", "y", {"lambda_val": 0.3}, trained_by="rpo_lambda0.3")
    with pytest.raises(ValueError, match="must name a method that trains its own run"):
        bench.check_shared_runs([*bench.METHODS, chained])
    runs = bench.training_runs([m for m in bench.METHODS if m.name in ("es_no_pref", "rpo_lambda0.7", "base")])
    assert [(m.name, [r.name for r in readers]) for m, readers in runs] == [
        ("base", []), ("dreambooth", ["es_no_pref"]), ("rpo_lambda0.5", ["rpo_lambda0.7"])
    ]
