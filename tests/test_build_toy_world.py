"""The toy-world build script: two build processes share one report, and a rebuild is bit-for-bit the same.

Runs the script's `--quick` mode (tiny data and step counts) as real subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from example_scripts import load_example

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training_examples" / "build_toy_world.py"


def _build(out: Path, *stages: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output", str(out), "--quick", "--stages", *stages],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def test_two_processes_share_the_report_and_rebuilds_are_identical(tmp_path):
    shared = tmp_path / "shared"
    first, second = _build(shared, "vae", "sd"), _build(shared, "scorer", "clip_eval")
    _finish(first)
    _finish(second)
    # these learn from the generator's own images: after vae and sd
    _finish(_build(shared, "scorer_domain", "clip_eval_domain", "dino_eval_domain"))
    report = json.loads((shared / "build_report.json").read_text())
    domain = ("scorer_domain", "clip_eval_domain", "dino_eval_domain")
    for stage in ("vae", "sd", "scorer", "clip_eval", *domain):  # no process erased another's entries
        assert report[stage]["seconds"] > 0, stage
    for stage in ("scorer_domain", "clip_eval_domain"):
        assert report[stage]["generator_samples"] > 0 and report[stage]["final_image_loss"] > 0
    # the scorer also learns from the generator's redraws of its renders: one more view of each render
    assert report["scorer_domain"]["generator_redraws"] > 0
    assert report["clip_eval_domain"]["generator_redraws"] == 0
    assert report["scorer_domain"]["images"] == report["clip_eval_domain"]["images"] + report["scorer_domain"]["generator_redraws"]
    # the evaluation stand-ins are models of their own: never the scorer's weights, nor each other's renders-only twin
    weights = {stage: (shared / stage / "model.safetensors").read_bytes() for stage in ("clip_eval", *domain)}
    assert len(set(weights.values())) == len(weights)
    configs = {stage: json.loads((shared / stage / "config.json").read_text()) for stage in ("scorer_domain", "clip_eval_domain")}
    assert configs["scorer_domain"]["vision_config"]["hidden_size"] != configs["clip_eval_domain"]["vision_config"]["hidden_size"]
    assert not list(shared.glob("_tok*")) and not list(shared.glob("*.tmp*"))
    # the judge twin: the judge's recipe (the same labels and shape) with its own sample and seeds, a model of its
    # own, built only when named
    _finish(_build(shared, "classifier", "judge_twin"))
    judges = {stage: json.loads((shared / stage / "config.json").read_text()) for stage in ("classifier", "judge_twin")}
    assert judges["classifier"]["id2label"] == judges["judge_twin"]["id2label"]
    assert judges["classifier"]["hidden_sizes"] == judges["judge_twin"]["hidden_sizes"]
    assert (shared / "classifier" / "model.safetensors").read_bytes() != (shared / "judge_twin" / "model.safetensors").read_bytes()
    assert "judge_twin" not in load_example("build_toy_world").DEFAULT_STAGES

    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(shared / "sd", again / "sd")
    _finish(_build(again, "scorer", "scorer_domain"))
    for stage in ("scorer", "scorer_domain"):
        for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
            assert (again / stage / name).read_bytes() == (shared / stage / name).read_bytes(), (stage, name)
    # a finished stage is not built again (the build resumes where it stopped)
    before = (again / "scorer" / "model.safetensors").stat().st_mtime_ns
    _finish(_build(again, "scorer"))
    assert (again / "scorer" / "model.safetensors").stat().st_mtime_ns == before
