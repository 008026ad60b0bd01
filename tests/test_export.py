"""Export: full and LoRA round trips, kohya LoRA format, atomic saves, model card, the Hub up to HTTP."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rpo_diffusers.export import (
    FULL_UNET_FILENAME,
    LORA_DIFFUSERS_FILENAME,
    LORA_KOHYA_FILENAME,
    ExportError,
    atomic_output_dir,
    atomic_save_file,
    kohya_lora_delta,
    load_safetensors_only,
    peft_to_kohya_state_dict,
    push_to_hub,
    save_full_model,
    save_lora_model,
    write_model_card,
)
from rpo_diffusers.testing.compare import assert_same_weights
from rpo_diffusers.testing.ports import free_local_port

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 16.0  # alpha != rank: a loader that reads the rank as alpha scales the LoRA by 1/4


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _add_random_lora(unet, targets=TARGETS, rank=RANK, alpha=ALPHA, seed=0) -> None:
    """Adapters as components.add_lora adds them, with lora_B non-zero so the LoRA changes outputs."""
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Simulate training: move every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _images(pipe) -> torch.Tensor:
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return torch.from_numpy(out.images)


def _unet_out(unet) -> torch.Tensor:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=cond).sample


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _hidden(path: Path) -> list[str]:
    """Temp / moved-aside entries the atomic writers leave behind (they all start with a dot)."""
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


@contextmanager
def _file_size_limit(nbytes: int):
    """A real I/O failure (EFBIG) for any write past ``nbytes``: RLIMIT_FSIZE with SIGXFSZ ignored."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def lora_pipe(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    _add_random_lora(pipe.unet)
    return pipe


@pytest.fixture
def full_output(tiny_sd_dir, tmp_path):
    """A trained-looking pipeline already saved once to ``tmp_path / 'out'`` (the previous good output)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    _perturb(pipe.unet)
    out = tmp_path / "out"
    save_full_model(pipe, out)
    _perturb(pipe.unet, seed=1)  # the next save would differ
    return pipe, out


# --------------------------------------------------------------------------------------------------
# full fine-tuning
# --------------------------------------------------------------------------------------------------


def test_full_model_round_trip(tiny_sd_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base_images = _images(pipe)
    _perturb(pipe.unet)
    files = save_full_model(pipe, tmp_path / "out", unet=pipe.unet)
    expected = _images(pipe)
    assert not torch.allclose(base_images, expected, atol=1e-3), "the perturbation should change the images"

    reloaded = StableDiffusionPipeline.from_pretrained(files["pipeline"])
    assert torch.allclose(_images(reloaded), expected, atol=1e-6)

    single = load_file(files["unet"])
    state = pipe.unet.state_dict()
    assert single.keys() == state.keys()
    assert all(torch.equal(single[k], state[k]) for k in state)
    fresh = UNet2DConditionModel.from_config(pipe.unet.config)
    fresh.load_state_dict(single, strict=True)  # the diffusers-format single file ComfyUI's UNETLoader reads
    assert_same_weights(fresh.state_dict(), state)
    # Two instances with equal weights may differ in the last bits (CPU kernels pick paths by memory layout).
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe.unet), atol=1e-5, rtol=1e-5)


def test_full_model_text_files_load_like_real_sd_checkpoints(tiny_sd_dir, tmp_path):
    """transformers 5 saves a CLIP text encoder built in code without the ``text_model.`` prefix (transformers 4
    loads that as random weights) and a tokenizer as tokenizer.json only (transformers 4's CLIPTokenizer needs
    vocab.json + merges.txt): the export writes real SD checkpoints' layout for both."""
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    built = CLIPTextModel(pipe.text_encoder.config)
    built.load_state_dict(pipe.text_encoder.state_dict())
    pipe.text_encoder = built
    files = save_full_model(pipe, tmp_path / "out")
    text_keys = load_file(str(Path(files["pipeline"]) / "text_encoder" / "model.safetensors")).keys()
    assert text_keys and all(k.startswith("text_model.") for k in text_keys)
    reloaded = CLIPTextModel.from_pretrained(Path(files["pipeline"]) / "text_encoder")
    ids = pipe.tokenizer(["a sks dog"], return_tensors="pt").input_ids
    assert_same_weights(reloaded.state_dict(), built.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).last_hidden_state, built(ids).last_hidden_state, atol=1e-5, rtol=1e-5
        )

    vocab_only = tmp_path / "vocab_only"  # what a slow (transformers 4) CLIPTokenizer reads
    vocab_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(Path(files["pipeline"]) / "tokenizer" / name, vocab_only / name)
    text = ["a sks dog on the beach", "a photo of sks dog wearing a hat"]
    assert CLIPTokenizer.from_pretrained(vocab_only)(text).input_ids == pipe.tokenizer(text).input_ids


@pytest.mark.parametrize("wrapper", ["compile", "ddp"])
def test_full_model_unwraps_wrapped_unets(tiny_sd_dir, tmp_path, wrapper):
    import torch.distributed as dist

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    plain = pipe.unet
    _perturb(plain)
    group = False
    try:
        if wrapper == "compile":
            wrapped = torch.compile(plain)  # lazy: nothing is compiled before a forward
        else:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
            group = True
            wrapped = torch.nn.parallel.DistributedDataParallel(plain)
        files = save_full_model(pipe, tmp_path / "out", unet=wrapped)
    finally:
        if group:
            dist.destroy_process_group()
    assert load_file(files["unet"]).keys() == plain.state_dict().keys()
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert_same_weights(reloaded.state_dict(), plain.state_dict())
    torch.testing.assert_close(_unet_out(reloaded), _unet_out(plain), atol=1e-5, rtol=1e-5)


def test_full_model_never_silently_saves_adapter_keys(lora_pipe, tmp_path):
    expected = _unet_out(lora_pipe.unet)
    try:
        files = save_full_model(lora_pipe, tmp_path / "out")
    except (ValueError, ExportError) as err:  # refusing clearly is fine too
        assert "adapter" in str(err).lower()
        return
    keys = load_file(files["unet"]).keys()
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert torch.allclose(_unet_out(reloaded), expected, atol=1e-5)


def test_full_model_save_into_existing_run_keeps_checkpoints(full_output):
    pipe, out = full_output
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "state.json").write_text("{}")
    save_full_model(pipe, out)
    assert (out / "checkpoint-10" / "state.json").read_text() == "{}"
    assert torch.equal(load_file(out / FULL_UNET_FILENAME)["conv_in.weight"], pipe.unet.conv_in.weight)
    assert _hidden(out) == [] and _hidden(out.parent) == []


# --------------------------------------------------------------------------------------------------
# LoRA: diffusers file and kohya file
# --------------------------------------------------------------------------------------------------


def test_kohya_file_has_every_module_with_the_real_alpha(lora_pipe, tmp_path):
    files = save_lora_model(lora_pipe, lora_pipe.unet, tmp_path / "out", lora_alpha=ALPHA)
    kohya = load_file(files["kohya"])
    peft_sd = get_peft_model_state_dict(lora_pipe.unet)
    modules = {k.removesuffix(".lora_A.weight") for k in peft_sd if k.endswith(".lora_A.weight")}
    assert modules and len(kohya) == 3 * len(modules)
    assert not [k for k in kohya if "lora_A" in k or "lora_B" in k or not k.startswith("lora_unet_")]
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert float(kohya[f"{name}.alpha"]) == ALPHA  # not the rank
        a, b = peft_sd[f"{module}.lora_A.weight"], peft_sd[f"{module}.lora_B.weight"]
        assert down.shape == (RANK, a.shape[1]) and up.shape == (b.shape[0], RANK)
        assert down.dtype == up.dtype == torch.float16  # the default kohya dtype
    assert any(k.endswith("attn2_to_out_0.lora_up.weight") for k in kohya)
    with safe_open(files["kohya"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert json.loads(meta["rpo"]) == {"rank": RANK, "alpha": ALPHA, "target_modules": sorted(TARGETS)}


@pytest.mark.parametrize("targets", [TARGETS, ["to_q", "conv1"]], ids=["attention", "with-conv"])
def test_kohya_delta_equals_what_peft_applies(tiny_sd_dir, tmp_path, targets):
    """Independent of peft's scaling formula: W + (alpha/r) up@down must give each adapted module's output."""
    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_dir).unet
    _add_random_lora(unet, targets)
    kohya = peft_to_kohya_state_dict(get_peft_model_state_dict(unet), ALPHA, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    checked = 0
    with torch.no_grad():
        for path, module in unet.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            weight = base.weight + kohya_lora_delta(kohya, "lora_unet_" + path.replace(".", "_")).view_as(
                base.weight
            )
            if isinstance(base, torch.nn.Conv2d):
                x = torch.randn(1, base.in_channels, 8, 8, generator=gen)
                merged = F.conv2d(x, weight, base.bias, base.stride, base.padding)
            else:
                x = torch.randn(3, base.in_features, generator=gen)
                merged = F.linear(x, weight, base.bias)
            assert torch.allclose(module(x), merged, atol=1e-5), path
            checked += 1
    assert checked == len(kohya) // 3


@pytest.fixture(scope="module")
def lora_export(tiny_sd_dir, tmp_path_factory):
    """One adapted pipeline saved with fp16 and with fp32 kohya files, and its in-memory outputs."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    _add_random_lora(pipe.unet)
    root = tmp_path_factory.mktemp("lora")
    for dtype in (torch.float16, torch.float32):
        save_lora_model(pipe, pipe.unet, root / str(dtype).removeprefix("torch."), kohya_dtype=dtype)
    return {"root": root, "images": _images(pipe), "unet_out": _unet_out(pipe.unet)}


@pytest.mark.parametrize(
    ("folder", "weight_name", "atol"),
    [
        ("float16", LORA_DIFFUSERS_FILENAME, 1e-6),
        ("float32", LORA_KOHYA_FILENAME, 1e-6),
        ("float16", LORA_KOHYA_FILENAME, 1e-2),
    ],
    ids=["diffusers", "kohya-fp32", "kohya-fp16"],
)
def test_lora_files_reproduce_the_adapted_pipeline(lora_export, tiny_sd_dir, folder, weight_name, atol):
    """A fresh pipeline + load_lora_weights (diffusers' own kohya reader for the kohya file) = in-memory images."""
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert not torch.allclose(_unet_out(fresh.unet), lora_export["unet_out"], atol=1e-2), "LoRA has no effect"
    fresh.load_lora_weights(lora_export["root"] / folder, weight_name=weight_name)
    assert torch.allclose(_unet_out(fresh.unet), lora_export["unet_out"], atol=max(atol, 1e-5))
    assert torch.allclose(_images(fresh), lora_export["images"], atol=atol)


def test_lora_alpha_argument_cannot_rescale_the_exported_lora(lora_pipe, tiny_sd_dir, tmp_path):
    expected = _unet_out(lora_pipe.unet)
    try:
        save_lora_model(lora_pipe, lora_pipe.unet, tmp_path / "out", lora_alpha=RANK)
    except ValueError:
        return
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    fresh.load_lora_weights(tmp_path / "out", weight_name=LORA_DIFFUSERS_FILENAME)  # diffusers < 0.40 offline
    assert torch.allclose(_unet_out(fresh.unet), expected, atol=1e-5)


def test_save_lora_model_without_adapters_is_refused(tiny_sd_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    with pytest.raises((ValueError, AttributeError)):
        save_lora_model(pipe, pipe.unet, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_peft_to_kohya_rejects_unknown_keys():
    with pytest.raises(ValueError, match="Unexpected key"):
        peft_to_kohya_state_dict({"foo.weight": torch.zeros(1)}, alpha=1)


# --------------------------------------------------------------------------------------------------
# atomic saves
# --------------------------------------------------------------------------------------------------


def test_atomic_output_dir_failure_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "model"
    with atomic_output_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"good")
        (tmp / "sub").mkdir()
        (tmp / "sub/a.txt").write_text("a")
    before = _tree_digest(out)
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert _tree_digest(out) == before
    with pytest.raises(ExportError, match="disk is full.*intact"), atomic_output_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left behind
    with atomic_output_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert _tree_digest(out).keys() == {"weights.bin"} and (out / "weights.bin").read_bytes() == b"new"


def test_atomic_merge_keeps_unrelated_entries(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10/state.json").write_text("{}")
    (out / "unet").mkdir()
    (out / "unet/old.safetensors").write_text("old")
    with atomic_output_dir(out, merge=True) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet/new.safetensors").write_text("new")
        (tmp / "model_index.json").write_text("{}")
    assert (out / "checkpoint-10/state.json").exists()
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["new.safetensors"]
    assert (out / "model_index.json").exists()
    assert _hidden(tmp_path) == [] and _hidden(out) == []
    before = _tree_digest(out)
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, merge=True) as tmp:
        (tmp / "unet").mkdir()
        raise RuntimeError("boom")
    assert _tree_digest(out) == before and _hidden(tmp_path) == []


@pytest.mark.parametrize("merge", [False, True], ids=["replace", "merge"])
def test_failed_commit_rename_keeps_previous_output(tmp_path, monkeypatch, merge):
    out = tmp_path / "model"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.json").write_text("old a")
        (tmp / "b.json").write_text("old b")
    before = _tree_digest(out)
    real_replace = os.replace

    def failing_replace(src, dst):
        # The rename that brings new content in fails (an I/O error); moving old content aside works.
        if ".tmp-" in str(src) and (not merge or Path(src).name == "b.json"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ExportError, match="intact"), atomic_output_dir(out, merge=merge) as tmp:
        (tmp / "a.json").write_text("new a")
        (tmp / "b.json").write_text("new b")
    monkeypatch.undo()
    assert _tree_digest(out) == before
    assert _hidden(tmp_path) == [] and _hidden(out) == []


def test_full_disk_during_diffusers_save_keeps_previous_output(full_output, monkeypatch):
    """The writer diffusers uses fails half-way through a file with ENOSPC."""
    import safetensors.torch

    pipe, out = full_output
    before = _tree_digest(out)
    real_save = safetensors.torch.save_file
    written = []

    def fills_the_disk(tensors, filename, metadata=None):
        if written:  # the first file fits, the second fills the disk half-way
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    with pytest.raises(ExportError, match=f"{out}.*disk is full.*intact"):
        save_full_model(pipe, out)
    assert written and _tree_digest(out) == before
    assert _hidden(out.parent) == [] and _hidden(out) == []


def test_real_write_failure_in_full_save_gives_the_clear_error(full_output):
    pipe, out = full_output
    before = _tree_digest(out)
    unet_bytes = (out / FULL_UNET_FILENAME).stat().st_size
    with pytest.raises(ExportError, match="intact"), _file_size_limit(unet_bytes // 2):
        save_full_model(pipe, out)
    assert _tree_digest(out) == before
    assert _hidden(out.parent) == [] and _hidden(out) == []


def test_real_write_failure_in_atomic_save_file_gives_the_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    atomic_save_file({"a": torch.ones(2)}, path)
    good = path.read_bytes()
    with pytest.raises(ExportError, match="intact"), _file_size_limit(100_000):
        atomic_save_file({"a": torch.zeros(100_000)}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_save_file_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    atomic_save_file({"a": torch.ones(2)}, path)
    good = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rpo_diffusers.export.save_file", full_disk)
    with pytest.raises(ExportError, match="disk is full"):
        atomic_save_file({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_full_disk_on_the_single_unet_file_names_the_output_folder(full_output, monkeypatch):
    pipe, out = full_output
    before = _tree_digest(out)

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rpo_diffusers.export.save_file", full_disk)
    with pytest.raises(ExportError) as info:
        save_full_model(pipe, out)
    assert f"{str(out)!r}" in str(info.value) and ".tmp-" not in str(info.value)
    assert _tree_digest(out) == before


# --------------------------------------------------------------------------------------------------
# loading only safetensors
# --------------------------------------------------------------------------------------------------


class _Plant:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_safetensors_only_refuses_pickles(tmp_path):
    marker = tmp_path / "pickle_was_executed"
    for name in ("model.bin", "model.pt", "model.ckpt", "MODEL.BIN", "model.safetensors.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(_Plant(str(marker))))
        with pytest.raises(ValueError, match=r"only \.safetensors"):
            load_safetensors_only(tmp_path / name)
    (tmp_path / "disguised.safetensors").write_bytes(pickle.dumps(_Plant(str(marker))))
    with pytest.raises(Exception):  # noqa: B017 - any parse error; what matters is that nothing ran
        load_safetensors_only(tmp_path / "disguised.safetensors")
    assert not marker.exists()
    save_file({"a": torch.ones(1)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(load_safetensors_only(tmp_path / "ok.safetensors")["a"], torch.ones(1))
    with pytest.raises(FileNotFoundError):
        load_safetensors_only(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------

HISTORY = [
    {"step": 0, "reward": 0.4, "align_i": 0.8, "align_t": 0.27},
    {"step": 40, "reward": 0.5, "align_i": 0.82, "align_t": 0.35},
    {"step": 80, "reward": 0.45, "align_i": 0.85, "align_t": 0.3},
]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_history(tmp_path):
    from huggingface_hub import ModelCard

    path = write_model_card(
        tmp_path,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        instance_prompt="a photo of sks dog",
        lora=True,
        config={"rank": 4, "lambda_val": 0.5, "lora_target_modules": TARGETS},
        history=HISTORY,
        best_step=40,
        best_reward=0.5,
        sample_images=["before_after.png"],
        repo_id="someone/rpo-dog",
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.instance_prompt == "a photo of sks dog" and card.data.library_name == "diffusers"
    assert card.data.license == "creativeml-openrail-m"
    assert {"lora", "rpo", "text-to-image", "diffusers"} <= set(card.data.tags)
    text = card.text
    for h in HISTORY:
        assert f"| {h['step']} | {h['reward']:.4f} | {h['align_i']:.4f} | {h['align_t']:.4f} |" in text
    assert 'load_lora_weights("someone/rpo-dog")' in text and LORA_KOHYA_FILENAME in text
    assert "![sample](before_after.png)" in text and "step **40**" in text
    assert "| rank | 4 |" in text and "| lambda_val | 0.5 |" in text


def test_full_model_card_and_awkward_prompt(tmp_path):
    prompt = 'a photo of "sks" dog: café # 1'  # quotes, a colon, a hash and non-ASCII must survive YAML
    path = write_model_card(
        tmp_path, base_model="my/base", instance_prompt=prompt, lora=False, config={}, history=HISTORY[:1]
    )
    meta = _front_matter(path.read_text(encoding="utf-8"))
    assert meta["instance_prompt"] == prompt and meta["base_model"] == "my/base"
    assert meta["library_name"] == "diffusers" and "lora" not in meta["tags"]
    assert {"rpo", "dreambooth", "text-to-image"} <= set(meta["tags"])
    text = path.read_text(encoding="utf-8")
    assert "StableDiffusionPipeline.from_pretrained" in text and FULL_UNET_FILENAME in text
    assert "load_lora_weights" not in text and "step **" not in text


# --------------------------------------------------------------------------------------------------
# the Hub, up to the HTTP boundary
# --------------------------------------------------------------------------------------------------


@contextmanager
def _refusing_hub(status: int, accept: tuple[str, ...] = ()):
    """A local HTTP server that refuses requests with ``status``; yields (url, requests seen).

    Paths in ``accept`` get a 200 instead (``/api/repos/create`` answers with the repo URL), so a test can
    let ``push_to_hub`` get as far as the upload request and read what it would upload.
    """
    seen: list[dict] = []
    endpoint: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "body": self.rfile.read(length) if length else b"",
                }
            )
            code, body = status, json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            if self.path in accept:
                repo = json.loads(seen[-1]["body"] or b"{}")
                reply = {"url": f"{endpoint[0]}/{repo.get('organization')}/{repo.get('name')}"}
                code, body = 200, json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.append(f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint[0], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def upload_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LORA_DIFFUSERS_FILENAME).write_bytes(b"weights")
    (out / "README.md").write_text("card")
    return out


def _use_endpoint(monkeypatch, url: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)


def test_push_to_hub_offline_is_a_clear_error(upload_dir, monkeypatch):
    before = _tree_digest(upload_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match=f"HF_HUB_OFFLINE.*{upload_dir}.*intact"):
        push_to_hub(upload_dir, "someone/rpo-dog")
    assert _tree_digest(upload_dir) == before
    with pytest.raises(FileNotFoundError):
        push_to_hub(upload_dir / "missing", "someone/rpo-dog")


@pytest.mark.parametrize("status", [401, 403])
def test_push_to_hub_refused_leaves_the_folder_intact(upload_dir, monkeypatch, status):
    before = _tree_digest(upload_dir)
    with _refusing_hub(status) as (url, seen):
        _use_endpoint(monkeypatch, url)
        with pytest.raises(ExportError, match=f"(?s)someone/rpo-dog.*{status}.*intact.*hf upload"):
            push_to_hub(upload_dir, "someone/rpo-dog", private=True, token="hf_invalid")
    create = [r for r in seen if r["method"] == "POST" and r["path"] == "/api/repos/create"]
    assert create, f"create_repo never reached the local Hub: {seen}"
    assert create[0]["auth"] == "Bearer hf_invalid"
    body = json.loads(create[0]["body"])
    assert body["name"] == "rpo-dog" and body["organization"] == "someone"
    assert body.get("visibility") == "private" or body.get("private") is True
    assert _tree_digest(upload_dir) == before


def test_push_to_hub_uploads_the_model_not_checkpoints_logs_or_temp_folders(upload_dir, monkeypatch):
    """The Hub accepts the repo but refuses the upload: the upload request says which files would go up."""
    write_model_card(
        upload_dir,
        base_model="my/base",
        instance_prompt="a photo of sks dog",
        lora=True,
        config={},
        history=[],
    )
    for name in (
        "checkpoint-10/state.json",
        "logs/rpo/events.out",
        ".out.tmp-1234/x",
        "validation/step_00000.png",
    ):
        (upload_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (upload_dir / name).write_text("x")
    before = _tree_digest(upload_dir)
    with _refusing_hub(401, accept=("/api/repos/create", "/api/validate-yaml")) as (url, seen):
        _use_endpoint(monkeypatch, url)
        with pytest.raises(ExportError, match=f"(?s){upload_dir}.*401.*intact"):
            push_to_hub(upload_dir, "someone/rpo-dog", token="hf_invalid")
    yaml_check = [json.loads(r["body"]) for r in seen if r["path"] == "/api/validate-yaml"]
    assert yaml_check and "instance_prompt" in yaml_check[0]["content"]
    preupload = [json.loads(r["body"]) for r in seen if r["path"].endswith("/preupload/main")]
    assert preupload, f"the upload never reached the local Hub: {[r['path'] for r in seen]}"
    assert sorted(f["path"] for f in preupload[0]["files"]) == [
        "README.md",
        LORA_DIFFUSERS_FILENAME,
        "validation/step_00000.png",
    ]
    assert _tree_digest(upload_dir) == before


def test_push_to_hub_connection_refused(upload_dir, monkeypatch):
    _use_endpoint(monkeypatch, f"http://127.0.0.1:{free_local_port()}")  # a port nobody listens on
    with pytest.raises(ExportError, match=f"(?s){upload_dir}.*intact"):
        push_to_hub(upload_dir, "someone/rpo-dog", token="hf_x")


def test_push_to_hub_through_hf_endpoint_env(upload_dir):
    """The user's route: HF_ENDPOINT in the environment of a fresh process (read at huggingface_hub import)."""
    code = (
        "import sys\nfrom rpo_diffusers.export import ExportError, push_to_hub\n"
        "try:\n    push_to_hub(sys.argv[1], 'someone/rpo-dog', token='hf_invalid')\n"
        "except ExportError as err:\n    print('EXPORT-ERROR', err)\n"
    )
    before = _tree_digest(upload_dir)
    with _refusing_hub(401) as (url, seen):
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(upload_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "EXPORT-ERROR" in proc.stdout, proc.stderr[-2000:]
    assert "401" in proc.stdout and "intact" in proc.stdout and str(upload_dir) in proc.stdout
    assert any(r["path"] == "/api/repos/create" for r in seen)
    assert _tree_digest(upload_dir) == before
