"""Export: kohya LoRA format, atomic saves, model card, and the Hub up to the HTTP boundary."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rpo_diffusers.export import (
    ExportError,
    atomic_output_dir,
    atomic_save_file,
    kohya_lora_delta,
    load_safetensors_only,
    peft_to_kohya_state_dict,
    push_to_hub,
    save_lora_model,
    write_model_card,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def lora_pipe(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian")
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero so the LoRA changes outputs
    return pipe


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_kohya_file_has_every_module_with_the_real_alpha(lora_pipe, tmp_path):
    files = save_lora_model(lora_pipe, lora_pipe.unet, tmp_path / "out", lora_alpha=16)
    kohya = load_file(files["kohya"])
    peft_sd = get_peft_model_state_dict(lora_pipe.unet)
    modules = {k.removesuffix(".lora_A.weight") for k in peft_sd if k.endswith(".lora_A.weight")}
    assert modules and len(kohya) == 3 * len(modules)
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert float(kohya[f"{name}.alpha"]) == 16.0  # not the rank (4)
        assert down.shape[0] == 4 and up.shape[1] == 4
        a, b = peft_sd[f"{module}.lora_A.weight"].float(), peft_sd[f"{module}.lora_B.weight"].float()
        # peft applies (alpha / r) * B @ A; a kohya loader applies (alpha / r) * up @ down: they must agree.
        assert torch.allclose(kohya_lora_delta(kohya, name), (16 / 4) * (b @ a), atol=1e-3)
    assert any(k.endswith("attn2_to_out_0.lora_up.weight") for k in kohya)
    with safe_open(files["kohya"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 16.0
    assert json.loads(meta["rpo"])["target_modules"] == sorted(TARGETS)


def test_diffusers_lora_round_trip_keeps_alpha(lora_pipe, tiny_sd_dir, tmp_path):
    save_lora_model(lora_pipe, lora_pipe.unet, tmp_path / "out")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = lora_pipe.unet(x, 500, encoder_hidden_states=cond).sample
        fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        base = fresh.unet(x, 500, encoder_hidden_states=cond).sample
        fresh.load_lora_weights(tmp_path / "out")
        got = fresh.unet(x, 500, encoder_hidden_states=cond).sample
    assert not torch.allclose(base, expected, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5)


def test_peft_to_kohya_rejects_unknown_keys():
    with pytest.raises(ValueError, match="Unexpected key"):
        peft_to_kohya_state_dict({"foo.weight": torch.zeros(1)}, alpha=1)


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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_save_file_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    atomic_save_file({"a": torch.ones(2)}, path)
    good = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rpo_diffusers.export.save_file", full_disk)
    with pytest.raises(ExportError, match="disk is full"):
        atomic_save_file({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_load_safetensors_only_refuses_pickles(tmp_path):
    for name in ("model.bin", "model.pt", "model.ckpt"):
        torch.save({"a": torch.ones(1)}, tmp_path / name)
        with pytest.raises(ValueError, match="only .safetensors"):
            load_safetensors_only(tmp_path / name)
    save_file({"a": torch.ones(1)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(load_safetensors_only(tmp_path / "ok.safetensors")["a"], torch.ones(1))
    with pytest.raises(FileNotFoundError):
        load_safetensors_only(tmp_path / "missing.safetensors")


def test_model_card_front_matter_and_history(tmp_path):
    from huggingface_hub import ModelCard

    history = [
        {"step": 0, "reward": 0.4, "align_i": 0.8, "align_t": 0.27},
        {"step": 40, "reward": 0.5, "align_i": 0.82, "align_t": 0.35},
    ]
    path = write_model_card(
        tmp_path,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        instance_prompt="a photo of sks dog",
        lora=True,
        config={"rank": 4, "lambda_val": 0.5},
        history=history,
        best_step=40,
        best_reward=0.5,
        sample_images=["before_after.png"],
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.instance_prompt == "a photo of sks dog" and card.data.library_name == "diffusers"
    assert {"lora", "rpo", "text-to-image"} <= set(card.data.tags)
    assert (
        "| 40 | 0.5000 |" in card.text
        and "load_lora_weights" in card.text
        and "before_after.png" in card.text
    )


class _Refuse(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def _deny(self):
        _Refuse.requests.append(f"{self.command} {self.path}")
        body = json.dumps({"error": "Invalid credentials"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _deny

    def log_message(self, *args):
        pass


def test_push_to_hub_offline_and_refused_leave_the_folder_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    before = _tree_digest(out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE.*intact"):
        push_to_hub(out, "someone/rpo-dog")
    # A refusing Hub on loopback: the request reaches the HTTP boundary and the error is clear.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
        with pytest.raises(ExportError, match="(?s)someone/rpo-dog.*401.*intact"):
            push_to_hub(out, "someone/rpo-dog", token="hf_invalid")
    finally:
        server.shutdown()
    assert _Refuse.requests, "no request reached the local Hub"
    assert _tree_digest(out) == before
