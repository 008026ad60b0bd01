"""training_examples/train_rpo.py as a user runs it: `accelerate launch`, one and two CPU processes, bad input.

Every run is a real subprocess on the tiny pipeline + tiny CLIP scorer (32 px, 2 sampling steps, a few steps).
Two-process note: on a GPU-less machine `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's
simple launcher only spawns more through mpirun); `accelerate launch --multi_gpu --num_processes 2` starts two
(torchrun under the hood) and the trainer's Accelerator(cpu=True) joins them in a gloo group. The test checks
that two ranks really ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from example_scripts import load_example
from PIL import Image

from rpo_diffusers.testing.ports import free_local_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_examples" / "train_rpo.py"
TWO_PROMPTS = ["a sks dog on the beach", "a sks dog in the snow"]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    """Three readable photos of the 'subject'."""
    d = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def instance_dir_with_broken(instance_dir, tmp_path_factory) -> Path:
    """The three good photos plus one file with a .jpg name that is not a JPEG."""
    d = tmp_path_factory.mktemp("instance_broken")
    for f in instance_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def _args(model, tiny_scorer_dirs, instance_dir, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--scorer_model_name_or_path", str(tiny_scorer_dirs["clip"]),
        "--instance_data_dir", str(instance_dir),
        "--class_noun", "dog", "--output_dir", str(out),
        "--resolution", "32", "--num_inference_steps", "2", "--validation_num_inference_steps", "2", "--images_per_prompt", "1",
        "--num_validation_images", "1", "--max_train_steps", "4", "--validation_steps", "2",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _script(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(SCRIPT), *args])


def _launch(launcher_args: list[str], script_args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(SCRIPT), *script_args]  # fmt: skip
    return _run(cmd)


def _script_module() -> ModuleType:
    return load_example("train_rpo")


def _history(out: Path) -> dict:
    return json.loads((out / "rpo_history.json").read_text())


def _assert_best_is_max(history: dict) -> None:
    rewards = {h["step"]: h["reward"] for h in history["history"]}
    assert history["best_reward"] == max(rewards.values())
    assert rewards[history["best_step"]] == history["best_reward"]


@pytest.mark.slow
def test_accelerate_launch_lora_end_to_end(tiny_sd_dir, tiny_scorer_dirs, instance_dir_with_broken, tmp_path):
    """One process, LoRA, custom prompts, tensorboard, checkpoints, and an unreadable photo skipped on request."""
    out = tmp_path / "lora"
    args = _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir_with_broken, out, "--use_lora",
                 "--checkpointing_steps", "2", "--report_to", "tensorboard", "--skip_unreadable_images",
                 "--train_prompts", *TWO_PROMPTS)  # fmt: skip
    proc = _launch(["--num_processes", "1", "--cpu"], args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipping unreadable image" in proc.stderr and "broken.jpg" in proc.stderr
    assert proc.stdout.count("best step") == 1
    for name in ("pytorch_lora_weights.safetensors", "rpo_lora_kohya.safetensors", "README.md",
                 "reward_plot.png", "checkpoint-2", "checkpoint-4"):  # fmt: skip
        assert (out / name).exists(), name
    history = _history(out)
    assert [h["step"] for h in history["history"]] == [0, 2, 4]
    assert set(history["history"][0]["per_prompt"]) == set(
        TWO_PROMPTS
    )  # validation defaults to train prompts
    _assert_best_is_max(history)
    manifest = json.loads((out / "training_images" / "manifest.json").read_text())
    assert [im["prompt"] for im in manifest["images"]] == TWO_PROMPTS
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"

    from diffusers import StableDiffusionPipeline

    from rpo_diffusers.export import LORA_DIFFUSERS_FILENAME

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(out, weight_name=LORA_DIFFUSERS_FILENAME)  # diffusers < 0.40 offline
    assert pipe.get_active_adapters(), "the exported LoRA did not load as an adapter"


@pytest.mark.slow
def test_two_process_cpu_run(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: a real 2-rank gloo run, full fine-tuning."""
    out = tmp_path / "ddp"
    # a free port picked here: accelerate <= 1.4 passes port 0 on to torchrun, and the ranks then hang
    launcher = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_local_port())]
    proc = _launch(launcher, _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, out, "--checkpointing_steps", "4",
                                   "--validation_steps", "4"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best step") == 1  # only the main process reports and writes
    ckpt = out / "checkpoint-4"
    # accelerate saves one RNG file per rank: two files prove two processes took part.
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not list(out.glob(".checkpoint-*")), "a temporary checkpoint folder was left behind"
    history = _history(out)
    assert [h["step"] for h in history["history"]] == [0, 4]
    _assert_best_is_max(history)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet is not None and (out / "rpo_unet.safetensors").exists()


def test_help_documents_every_option(capsys):
    module = _script_module()
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for f in [*fields(module.RPOConfig), *fields(module.ScriptArguments)]:
        assert f"--{f.name}" in help_text, f.name
        assert f.metadata.get("help", "").strip(), f"--{f.name} has no help text"
    diffusers_names = (
        "pretrained_model_name_or_path", "instance_data_dir", "output_dir", "resolution", "train_batch_size",
        "max_train_steps", "learning_rate", "gradient_accumulation_steps", "mixed_precision",
        "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "seed", "rank", "push_to_hub",
        "hub_model_id", "hub_token", "report_to", "gradient_checkpointing", "validation_steps",
    )  # fmt: skip
    for name in diffusers_names:
        assert f"--{name}" in help_text, name


def test_nonexistent_model_path_exits_2(tiny_scorer_dirs, instance_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    proc = _script(*_args(missing, tiny_scorer_dirs, instance_dir, tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unreadable_image_fails_by_default(tiny_sd_dir, tiny_scorer_dirs, instance_dir_with_broken, tmp_path):
    """Default: a corrupt photo stops the run before anything is loaded or written (in-process main())."""
    module = _script_module()
    config, script = module.parse_args(
        _args(tiny_sd_dir, tiny_scorer_dirs, instance_dir_with_broken, tmp_path / "o")
    )
    with pytest.raises(ValueError, match=r"broken\.jpg.*corrupt|corrupt.*broken\.jpg"):
        module.main(config, script)
    assert not (tmp_path / "o").exists()


def test_prompt_without_identifier_is_rejected(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    parse_args = _script_module().parse_args
    args = _args(
        tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path / "o", "--train_prompts", "a dog on the beach"
    )
    with pytest.raises(ValueError, match="identifier 'sks'"):
        parse_args(args)
    config, script = parse_args(_args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path / "o"))
    assert config.instance_prompt == "a photo of sks dog" and not script.skip_unreadable_images


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False])
def test_dpg_through_the_script(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path, use_lora):
    """`--method dpg`: no base-model training images, the critic checkpointed, the result loads."""
    out = tmp_path / "dpg"
    extra = ["--method", "dpg", "--checkpointing_steps", "2", "--with_prior_preservation",
             "--num_class_images", "2", *(["--use_lora"] if use_lora else [])]  # fmt: skip
    proc = _script(*_args(tiny_sd_dir, tiny_scorer_dirs, instance_dir, out, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _history(out)
    assert history["method"] == "dpg" and history["critic"] == "residual"
    assert (out / "checkpoint-4" / "model.safetensors").exists(), "the critic is not in the checkpoint"
    assert not (out / "training_images").exists()
    from diffusers import StableDiffusionPipeline

    from rpo_diffusers.export import LORA_DIFFUSERS_FILENAME

    if use_lora:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        pipe.load_lora_weights(out, weight_name=LORA_DIFFUSERS_FILENAME)
        assert pipe.get_active_adapters()
    else:
        assert StableDiffusionPipeline.from_pretrained(out).unet is not None


@pytest.mark.slow
def test_dpg_two_process_ranks_keep_one_critic(tiny_sd_dir, tiny_scorer_dirs, instance_dir, tmp_path):
    """Two gloo ranks: the critic is prepared by accelerate, so both end with the same critic weights."""
    from safetensors.torch import load_file

    from rpo_diffusers.critic import LookForwardCritic

    out = tmp_path / "dpg-ddp"
    launcher = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_local_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(REPO / "tests" / "scripts" / "dpg_ranks.py"), str(tiny_sd_dir), str(tiny_scorer_dirs["clip"]),
           str(instance_dir), str(out)]  # fmt: skip
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(out / f"critic_rank{r}.safetensors")) for r in (0, 1)]
    initial = LookForwardCritic((4, 16, 16), seed=0).state_dict()
    for name, value in ranks[0].items():
        assert (value - ranks[1][name]).abs().max() == 0, name  # one all-reduced critic, not two
    assert any((ranks[0][k] - initial[k]).abs().max() > 0 for k in initial), "the critic never trained"
