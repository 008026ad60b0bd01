"""Only .safetensors weights are read from user paths: a folder with pickled weights only is refused, in one line,
before anything of it is unpickled (base model, scorer, DINO reward, evaluation models, the training script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpo_diffusers.components import DiffusersComponents
from rpo_diffusers.rewards import DinoReward, LambdaHarmonicScorer

REPO = Path(__file__).resolve().parents[1]


def _pickled_copy(src: Path, dst: Path, subfolder: str | None, weights: str) -> Path:
    """A copy of a model folder whose (sub)folder holds its weights as a pickle only."""
    shutil.copytree(src, dst)
    folder = dst / subfolder if subfolder else dst
    from safetensors.torch import load_file

    (st,) = folder.glob("*.safetensors")
    torch.save(load_file(str(st)), folder / weights)
    st.unlink()
    return dst


def test_pipeline_with_a_pickled_unet_is_refused(tiny_sd_dir, tmp_path):
    bad = _pickled_copy(tiny_sd_dir, tmp_path / "sd", "unet", "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unet' holds only pickled weights \(diffusion_pytorch_model\.bin\)"):
        DiffusersComponents.from_pretrained(bad)


def test_scorer_and_dino_reward_with_pickled_weights_are_refused(tiny_scorer_dirs, tiny_vit_dir, tmp_path):
    bad_scorer = _pickled_copy(tiny_scorer_dirs["clip"], tmp_path / "clip", None, "pytorch_model.bin")
    with pytest.raises(ValueError, match="only .safetensors weights are loaded"):
        LambdaHarmonicScorer.from_pretrained(bad_scorer)
    bad_vit = _pickled_copy(tiny_vit_dir, tmp_path / "vit", None, "pytorch_model.bin")
    with pytest.raises(ValueError, match="save_pretrained\\(folder, safe_serialization=True\\)"):
        DinoReward.from_pretrained(bad_vit)


def test_training_script_refuses_pickled_weights_without_a_traceback(tiny_sd_dir, tiny_scorer_dirs, tmp_path):
    bad = _pickled_copy(tiny_sd_dir, tmp_path / "sd", "unet", "diffusion_pytorch_model.bin")
    refs = tmp_path / "refs"
    refs.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(refs / f"{i}.png")
    proc = subprocess.run(
        [sys.executable, str(REPO / "training_examples" / "train_rpo.py"), "--pretrained_model_name_or_path",
         str(bad), "--scorer_model_name_or_path", str(tiny_scorer_dirs["clip"]), "--instance_data_dir", str(refs),
         "--class_noun", "dog", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
         "--max_train_steps", "1", "--num_inference_steps", "1", "--validation_num_inference_steps", "1", "--images_per_prompt", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "holds only pickled weights" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
