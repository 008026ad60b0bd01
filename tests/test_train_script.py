"""training_examples/train_rpo.py through `accelerate launch`, on one and two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_examples" / "train_rpo.py"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd_dir),
        "--scorer_model_name_or_path", str(tiny_scorer_dirs["clip"]),
        "--instance_data_dir", str(instance_dir),
        "--class_noun", "dog", "--output_dir", str(out),
        "--resolution", "32", "--num_inference_steps", "2", "--images_per_prompt", "1",
        "--num_validation_images", "1", "--max_train_steps", "4", "--validation_steps", "2",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _launch(num_processes: int, args: list[str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), "--cpu",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--num_cpu_threads_per_process", "1", str(SCRIPT), *args])  # fmt: skip


@pytest.mark.slow
def test_accelerate_launch_lora_end_to_end(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    out = tmp_path / "lora"
    proc = _launch(
        1, _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, out, "--use_lora", "--checkpointing_steps", "2")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best step" in proc.stdout
    for name in (
        "pytorch_lora_weights.safetensors",
        "rpo_lora_kohya.safetensors",
        "README.md",
        "rpo_history.json",
        "reward_plot.png",
        "checkpoint-2",
        "checkpoint-4",
    ):
        assert (out / name).exists(), name
    history = json.loads((out / "rpo_history.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 2, 4]


@pytest.mark.slow
def test_two_process_cpu_run(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    out = tmp_path / "ddp"
    # torchrun gives accelerate a real 2-process gloo (MULTI_CPU) group on this CPU-only machine.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT)]
    proc = _run(cmd + _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, out, "--checkpointing_steps", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best step") == 1  # only the main process reports and writes
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet is not None and (out / "rpo_unet.safetensors").exists()
    ckpt = out / "checkpoint-4"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert not list(out.glob(".checkpoint-*"))


def test_help_documents_every_option():
    proc = _run([sys.executable, str(SCRIPT), "--help"])
    assert proc.returncode == 0
    from rpo_diffusers.config import RPOConfig

    for name in RPOConfig.__dataclass_fields__:
        assert f"--{name}" in proc.stdout, name
    for name in ("--push_to_hub", "--hub_model_id", "--skip_unreadable_images", "--resume_from_checkpoint"):
        assert name in proc.stdout


def test_bad_inputs(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    proc = _run(
        [
            sys.executable,
            str(SCRIPT),
            *_args(tmp_path / "missing-model", tiny_scorer_dirs, instance_dir, tmp_path / "o"),
        ]
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in instance_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    proc = _run([sys.executable, str(SCRIPT), *_args(tiny_sd_dir, tiny_scorer_dirs, bad, tmp_path / "o")])
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr and "corrupt" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = _run([sys.executable, str(SCRIPT), *_args(tiny_sd_dir, tiny_scorer_dirs, bad, tmp_path / "o2"),
                 "--skip_unreadable_images", "--max_train_steps", "1", "--validation_steps", "1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Skipping unreadable image" in proc.stderr
    proc = _run([sys.executable, str(SCRIPT), *_args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path / "o3"),
                 "--train_prompts", "a dog on the beach"])  # fmt: skip
    assert proc.returncode == 2 and "identifier 'sks'" in proc.stderr
