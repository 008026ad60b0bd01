"""training_examples/toy_fidelity.py --quick: a real short run whose report is consistent with its own rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from example_scripts import load_example

from rpo_diffusers.stats import roc_auc, spearman
from rpo_diffusers.toy import DEFAULT_SCORER, EVALUATORS, assets_available, get_subject, ground_truth_quality

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_quick_fidelity_report_follows_from_the_judged_images(tmp_path):
    from rpo_diffusers.toy import asset_path

    module = load_example("toy_fidelity")
    # the judge as its own twin: the ceiling measurement must find full agreement
    assert module.main(["--quick", "--output_dir", str(tmp_path), "--judge_twins", str(asset_path("classifier"))]) == 0

    summary = json.loads((tmp_path / "fidelity_report.json").read_text())
    report = summary["scorers"][DEFAULT_SCORER]
    with (tmp_path / "images.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["scorer"] == DEFAULT_SCORER]
    prompts = get_subject("redblue_ball").evaluation_prompts()
    validations = [0, 20, 40]  # --quick: 40 steps, validation every 20
    assert len(rows) == report["images"] == len(prompts) * 2 * len(validations)
    assert sorted({int(r["step"]) for r in rows}) == validations
    # the same seeds at every step: each step draws the same (prompt, seed) pairs
    pairs = {s: {(r["prompt"], r["seed"]) for r in rows if int(r["step"]) == s} for s in validations}
    assert pairs[0] == pairs[20] == pairs[40] and len(pairs[0]) == len(prompts) * 2
    identity = [r["identity"] == "True" for r in rows]
    assert 0 < sum(identity) < len(identity)  # the seeded quick run has both classes, so the AUC is defined
    assert report["align_i_identity_auc"] == pytest.approx(roc_auc([float(r["align_i"]) for r in rows], identity))
    # the same AUC apart on the colour-change prompts ("a purple sks ball") and on the others
    kinds = report["by_prompt_kind"]
    change = [module.changes_colour(r["prompt"]) for r in rows]
    assert 0 < sum(change) < len(rows) and kinds["colour_change"]["images"] == sum(change)
    assert kinds["kept_colour"]["images"] + kinds["colour_change"]["images"] == len(rows)
    kept = [r for r, c in zip(rows, change) if not c]
    assert kinds["kept_colour"]["context_rate"] == pytest.approx(sum(r["context"] == "True" for r in kept) / len(kept))
    assert module.changes_colour("a purple sks ball") and not module.changes_colour("a sks ball on the moon")
    (run,) = report["runs"]
    steps = {s: [r for r in rows if int(r["step"]) == s] for s in validations}
    truth = []
    for s in validations:
        i = sum(r["identity"] == "True" for r in steps[s]) / len(steps[s])
        c = sum(r["context"] == "True" for r in steps[s]) / len(steps[s])
        truth.append(ground_truth_quality(i, c))
    assert run["truth_best"] == pytest.approx(max(truth))
    assert run["chosen_step"] in validations and 0 <= run["fraction_of_best"] <= 1
    assert run["spearman"] == pytest.approx(spearman(run["val_rewards"], truth))
    assert run["chosen_step"] == validations[run["val_rewards"].index(max(run["val_rewards"]))]

    # every set of evaluation encoders scored the same images, with the same verdicts, and their AUCs follow from
    # the rows; the sets are different models
    with (tmp_path / "evaluation_images.csv").open() as fh:
        all_eval_rows = list(csv.DictReader(fh))
    assert sorted(summary["evaluation_encoders"]) == sorted(EVALUATORS) == sorted({r["evaluator"] for r in all_eval_rows})
    key = ("step", "prompt", "seed", "identity", "context")
    by_set = {}
    for name, evaluation in summary["evaluation_encoders"].items():
        eval_rows = [r for r in all_eval_rows if r["evaluator"] == name]
        assert sorted(tuple(r[k] for k in key) for r in eval_rows) == sorted(tuple(r[k] for k in key) for r in rows)
        for score, target in (("dino", "identity"), ("clip_i", "identity"), ("clip_t", "context")):
            values = [float(r[score]) for r in eval_rows]
            assert all(-1.0 <= v <= 1.0 for v in values) and len(set(values)) > 1  # cosines, not a constant
            labels = [r[target] == "True" for r in eval_rows]
            if 0 < sum(labels) < len(labels):
                assert evaluation[f"{score}_{target}_auc"] == pytest.approx(roc_auc(values, labels))
        by_set[name] = sorted((r["step"], r["prompt"], r["seed"], r["dino"]) for r in eval_rows)
    assert by_set["renders"] != by_set["domain"]

    # the twin scored the same images; the judge as its own twin agrees on every verdict, and its probabilities
    # rank its own verdicts (the AUCs follow from the rows)
    twin = summary["judge_twins"]["classifier"]
    with (tmp_path / "twin_images.csv").open() as fh:
        twin_rows = list(csv.DictReader(fh))
    assert sorted(tuple(r[k] for k in key) for r in twin_rows) == sorted(tuple(r[k] for k in key) for r in rows)
    assert all(r["twin_identity"] == r["identity"] and r["twin_context"] == r["context"] for r in twin_rows)
    assert twin["identity_agreement"] == twin["context_agreement"] == 1.0
    assert twin["identity_auc"] == pytest.approx(roc_auc([float(r["identity_p"]) for r in twin_rows], identity))
    assert twin["identity_auc"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_a_second_scorer_sees_the_trainers_own_validation_images(tmp_path):
    """The same scorer under another name, measured as a second scorer: its validation rewards (on images
    redrawn with the run's seeds) must equal the ones the trainer computed, so any scorer compares fairly."""
    import shutil

    from rpo_diffusers.toy import asset_path

    module = load_example("toy_fidelity")
    copy = shutil.copytree(asset_path("scorer"), tmp_path / "same_scorer")
    argv = ["--quick", "--output_dir", str(tmp_path / "out"), "--scorers", str(asset_path("scorer")), str(copy)]
    assert module.main(argv) == 0
    reports = json.loads((tmp_path / "out" / "fidelity_report.json").read_text())["scorers"]
    first, second = reports["scorer"], reports["same_scorer"]
    assert second["runs"][0]["val_rewards"] == pytest.approx(first["runs"][0]["val_rewards"], abs=1e-6)
    assert second["align_i_identity_auc"] == pytest.approx(first["align_i_identity_auc"])


def test_two_scorers_with_one_folder_name_are_refused_before_anything_loads(tmp_path, capsys):
    """The report keys each scorer by its folder name, so two ``scorer_domain`` folders would silently
    merge into one row: refused with the fix, before a model loads."""
    module = load_example("toy_fidelity")
    a, b = tmp_path / "a" / "scorer_domain", tmp_path / "b" / "scorer_domain"
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--output_dir", str(tmp_path / "out"), "--scorers", str(a), str(b)])
    assert exc.value.code == 2
    assert "two folders named 'scorer_domain'" in capsys.readouterr().err
    args = module.parse_args(["--output_dir", str(tmp_path / "out"), "--scorers", str(a), str(tmp_path / "c")])
    assert args.scorers == [str(a), str(tmp_path / "c")]
