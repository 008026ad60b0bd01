"""`rpo-diffusers demo` as a newcomer runs it: a fresh process, no network, nothing but what concerns them.

One short run (4 steps, validation every 2) in a subprocess with the Hub unreachable (and offline mode
off, as on a user's machine): every file the README promises is written, every phase is timed, the
pictures are labelled, and stderr holds no line beyond the justified ones below.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rpo_diffusers.testing.ports import free_local_port

REPO = Path(__file__).resolve().parents[1]

# Lines a demo run may write to stderr, and why each is there:
JUSTIFIED_STDERR = [
    # tqdm's progress of the two long phases (what a user watches; not a warning)
    re.compile(r"^(generating training images|RPO|DreamBooth|DPG): +\d+%\|"),
    # matplotlib, once per machine, the first time it is imported
    re.compile(r"^Matplotlib is building the font cache; this may take a moment\.$"),
]
# At pyproject's floors (diffusers 0.34, transformers 4.57; scripts/test_floors.sh) the libraries print three
# notices of their own that today's versions do not: the bundled schedulers' configs, saved by a newer
# diffusers, carry two fields 0.34 does not know (it ignores them); transformers 4.57 announces its fast image
# processors; and diffusers 0.34 hands torch_dtype on to transformers 4.57, which has renamed it.
OLD_LIBRARY_NOTICES = [
    re.compile(r"The config attributes \{'time_shift_type': 'exponential', 'use_dynamic_shifting': False\} were "
               r"passed to \w+, but are not expected and will be ignored"),
    re.compile(r"^Using a slow image processor as `use_fast` is unset"),
    re.compile(r"^`torch_dtype` is deprecated! Use `dtype` instead!$"),
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}  # a user's environment
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_local_port()}"  # no network at all
    env.pop("OMP_NUM_THREADS", None)  # the demo's own default (1 thread) must be what keeps it fast
    proc = subprocess.run(
        [sys.executable, "-m", "rpo_diffusers.cli", "demo", "--output_dir", str(out),
         "--max_train_steps", "4", "--validation_steps", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


def test_demo_stderr_has_only_justified_lines(demo_run):
    _, _, stderr = demo_run
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    import transformers

    allowed = JUSTIFIED_STDERR + (OLD_LIBRARY_NOTICES if int(transformers.__version__.split(".")[0]) < 5 else [])
    unexplained = [line for line in lines if not any(p.search(line) for p in allowed)]
    assert not unexplained, "\n".join(unexplained)
    assert not any("torchvision" in line for line in lines)  # transformers' processor fallback is silenced


def test_demo_writes_what_the_readme_promises(demo_run):
    out, stdout, _ = demo_run
    assert "chosen step" in stdout and "step    4" in stdout and "1 torch thread" in stdout
    model = out / "model"
    for name in ("model_index.json", "rpo_unet.safetensors", "reward_plot.png", "before_after.png",
                 "rpo_history.json", "README.md"):  # fmt: skip
        assert (model / name).exists(), name
    assert len(list((out / "references").glob("*.png"))) == 5
    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert metrics["best_step"] in (0, 2, 4) and metrics["torch_threads"] == 1
    for name in ("base", "rpo"):
        row = metrics["heldout_metrics"][name]
        assert 0.0 <= row["identity_acc"] <= 1.0 and 0.0 <= row["context_acc"] <= 1.0
        assert -1.0 <= row["dino"] <= 1.0 and 0.0 < row["lambda_harmonic"] <= 1.0
    front_matter = (model / "README.md").read_text().split("---")[1]
    assert (
        "base_model" not in front_matter and str(REPO) not in front_matter
    )  # a local path is no Hub metadata


def test_demo_times_every_phase(demo_run):
    out, stdout, _ = demo_run
    metrics = json.loads((out / "demo_metrics.json").read_text())
    evaluation = metrics["evaluation_timings_s"]
    for phase in ("load the judges", "generate (base)", "generate (rpo)", "score (base)", "score (rpo)"):
        assert phase in evaluation and f"evaluation: {phase}" in stdout
    for phase in ("generation", "training", "validation", "export"):
        assert f"training: {phase}" in stdout
    total = float(re.search(r"^\s+total\s+([\d.]+)$", stdout, re.M).group(1))
    assert sum(evaluation.values()) + sum(metrics["timings_s"].values()) <= total + 0.5


def test_demo_heldout_picture_is_labelled(demo_run):
    out, stdout, _ = demo_run
    grid = Image.open(out / "heldout_before_after.png")
    # 8 held-out prompts, one row each, two 192 px columns beside a label column
    assert grid.width >= 150 + 2 * 192 and grid.height >= 8 * 192
    arr = np.asarray(grid.convert("L"))
    assert (arr[:60] < 200).sum() > 500  # title and column headers are drawn
    assert (arr[:, :140] < 200).sum() > 2000  # the prompt labels
    assert "a row per held-out prompt" in stdout
    plot = Image.open(out / "model" / "reward_plot.png")
    assert plot.size == (800, 450)


def test_readme_score_and_evaluate_run_on_the_demo_output(demo_run, tmp_path, capsys):
    """The README's `score` and `evaluate` lines, on the bundled models' short names, as written there."""
    from rpo_diffusers.cli import main

    out, _, _ = demo_run
    heldout = out / "heldout"
    forest = heldout / "rpo" / "whiteblack_ring" / "a_sks_ring_in_the_forest"
    assert main(["score", "--references", str(out / "references"), "--images", str(forest),
                 "--prompt", "a sks ring in the forest", "--model", "toy-scorer-domain"]) == 0  # fmt: skip
    assert "mean" in capsys.readouterr().out
    assert main(["evaluate", "--images", str(heldout / "rpo"), "--references", str(heldout / "references"),
                 "--dino", "toy-dino-domain", "--clip", "toy-clip-domain", "--output_dir", str(tmp_path)]) == 0  # fmt: skip
    table = json.loads((tmp_path / "dreambench_metrics.json").read_text())
    assert [s["subject"] for s in table["subjects"]] == ["whiteblack_ring"]
    assert len(table["subjects"][0]["prompts"]) == 8
    readme = (REPO / "README.md").read_text()
    assert "--model toy-scorer-domain" in readme and "--dino toy-dino-domain --clip toy-clip-domain" in readme
