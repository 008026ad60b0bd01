"""Model names: bundled short names resolve, and a Hub id that cannot be downloaded fails fast in one line.

Offline is tested with ``HF_HUB_OFFLINE=1`` (the suite's default, see conftest) and, in fresh processes,
with an unreachable endpoint (a local port nothing listens on), where huggingface_hub alone would retry
for about 25 s per file before a long traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from rpo_diffusers import hub
from rpo_diffusers.cli import main
from rpo_diffusers.hub import ModelNotAvailableError, load_pretrained, resolve_model
from rpo_diffusers.rewards import check_model_path
from rpo_diffusers.testing.ports import free_local_port
from rpo_diffusers.toy import asset_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def score_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("score")
    refs, imgs = root / "refs", root / "imgs"
    for folder, colour in ((refs, (200, 30, 30)), (imgs, (30, 200, 30))):
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (colour[0], colour[1], 40 * i)).save(folder / f"{i}.png")
    return refs, imgs


@pytest.fixture(scope="module")
def evaluate_folders(tmp_path_factory, score_folders) -> tuple[Path, Path]:
    """IMAGES/<subject>/<prompt>/*.png and REFS/<subject>/*.png for one toy subject."""
    refs, imgs = score_folders
    root = tmp_path_factory.mktemp("evaluate")
    prompt_dir = root / "images" / "ring" / "a_sks_ring_on_the_beach"
    prompt_dir.mkdir(parents=True)
    for f in imgs.iterdir():
        (prompt_dir / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "ring").symlink_to(refs, target_is_directory=True)
    return root / "images", root / "refs"


def _run(args: list[str], env_extra: dict[str, str], script: str | None = None) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    command = [sys.executable, script] if script else [sys.executable, "-m", "rpo_diffusers.cli"]
    t0 = time.perf_counter()
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    return proc.returncode, proc.stderr, time.perf_counter() - t0


def _unreachable_env(tmp_path: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_local_port()}",
        "HF_HOME": str(tmp_path / "hf_home"),  # an empty cache
        "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"),
    }


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder"),
    [("toy-sd", "sd"), ("toy-scorer", "scorer"), ("toy-dino", "dino_eval"), ("toy-clip", "clip_eval")],
)
def test_bundled_short_names_resolve_everywhere(name, folder):
    assert resolve_model(name) == str(asset_path(folder))
    assert check_model_path(name.upper()) == str(asset_path(folder))  # the RPOConfig / trainer route


def test_offline_hub_id_fails_in_one_line_naming_the_way_out():
    with pytest.raises(ModelNotAvailableError) as info:
        check_model_path("kakaobrain/align-base", "scorer")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    assert "'kakaobrain/align-base'" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message and "'toy-scorer-domain'" in message
    with pytest.raises(ModelNotAvailableError, match="'toy-sd', 'toy-scorer-domain', 'toy-dino-domain', 'toy-clip-domain'"):
        check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5")  # no kind: every bundled name


def test_missing_local_path_names_the_bundled_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*toy-sd") as info:
        resolve_model(tmp_path / "nope")
    assert not isinstance(info.value, ModelNotAvailableError)


def test_a_download_failing_after_the_check_is_the_same_one_line_error(monkeypatch):
    """A repo that passed the quick check (here: looks cached) but whose files cannot be fetched."""
    from transformers import AutoConfig

    monkeypatch.setattr(hub, "is_cached", lambda repo_id: True)
    with pytest.raises(ModelNotAvailableError) as info:
        load_pretrained(AutoConfig.from_pretrained, "rpo-test/not-a-model", kind="CLIP model")
    message = str(info.value)
    assert "\n" not in message and "'rpo-test/not-a-model'" in message and "'toy-clip-domain'" in message


# --- the command line ---------------------------------------------------------------------------------


def test_score_and_evaluate_run_on_the_bundled_names(score_folders, evaluate_folders, tmp_path, capsys):
    refs, imgs = score_folders
    base = ["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks ring"]
    assert main([*base, "--scorer", "toy-scorer"]) == 0
    assert "mean" in capsys.readouterr().out
    images, references = evaluate_folders
    argv = [
        "evaluate",
        "--images",
        str(images),
        "--references",
        str(references),
        "--output_dir",
        str(tmp_path),
    ]
    assert main([*argv, "--dino", "toy-dino", "--clip", "toy-clip"]) == 0
    assert (tmp_path / "dreambench_metrics.json").exists()


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no line breaks inside names
    for command, expected in (
        ("score", ["(default: kakaobrain/align-base)", "(default: 0.5)", "toy-scorer"]),
        ("evaluate", ["(default: facebook/dino-vits16)", "(default: openai/clip-vit-base-patch16)"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(e in text for e in expected), (command, text)
        assert "(default: None)" not in text


def test_score_offline_subprocess(score_folders):
    refs, imgs = score_folders
    args = ["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks ring"]
    rc, stderr, _ = _run(args, {"HF_HUB_OFFLINE": "1"})
    line = _one_line_error(stderr)
    assert (
        rc == 2 and "Could not download the scorer 'kakaobrain/align-base'" in line and "'toy-scorer-domain'" in line
    )


def test_score_unreachable_endpoint_is_fast(score_folders, tmp_path):
    refs, imgs = score_folders
    args = ["score", "--references", str(refs), "--images", str(imgs), "--prompt", "a sks ring"]
    rc, stderr, seconds = _run(args, _unreachable_env(tmp_path))
    line = _one_line_error(stderr)
    assert rc == 2 and "cannot be reached" in line and "'toy-scorer-domain'" in line
    assert seconds < 30  # huggingface_hub's own retries alone take >= 23 s per file


def test_evaluate_names_the_model_it_could_not_download(evaluate_folders, tmp_path):
    images, refs = evaluate_folders
    args = ["evaluate", "--images", str(images), "--references", str(refs), "--output_dir", str(tmp_path)]
    rc, stderr, _ = _run([*args, "--clip", "toy-clip"], {"HF_HUB_OFFLINE": "1"})
    line = _one_line_error(stderr)
    assert rc == 2 and "the DINO model 'facebook/dino-vits16'" in line and "'toy-dino-domain'" in line
    rc, stderr, seconds = _run([*args, "--dino", "toy-dino"], _unreachable_env(tmp_path))
    line = _one_line_error(stderr)
    assert rc == 2 and "the CLIP model 'openai/clip-vit-base-patch16'" in line and "'toy-clip-domain'" in line
    assert seconds < 30


def test_train_script_base_model_offline(tmp_path, score_folders):
    refs, _ = score_folders
    args = ["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "--scorer_model_name_or_path", "toy-scorer", "--instance_data_dir", str(refs),
            "--class_noun", "ring", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    rc, stderr, _ = _run(
        args, {"HF_HUB_OFFLINE": "1"}, script=str(REPO / "training_examples" / "train_rpo.py")
    )
    assert rc != 0 and "Traceback" not in stderr
    # refused while parsing the arguments, before anything loads: the id, why, and the bundled alternative
    last = stderr.strip().splitlines()[-1]
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in last and "toy-sd" in last, stderr[-600:]
    assert "--pretrained_model_name_or_path" in last
