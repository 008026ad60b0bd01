"""The node pack inside a real ComfyUI server (skipped unless COMFYUI_PATH points at a ComfyUI checkout).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest tests/test_comfyui_server.py

Everything lives in a temporary ``--base-directory`` (models, input, output, custom_nodes with this
repository linked in), so nothing is written into the checkout. A randomly initialised SD 1.5-shaped
pipeline is turned into a single-file checkpoint by ComfyUI's own DiffusersLoader + CheckpointSave, then the
example workflows run through ``POST /prompt`` with tiny resolution and steps, and ``/history`` is checked.

ComfyUI recognises SD 1.5 by its widths (320 UNet channels, 768-wide text conditioning), not its depth, so the
checkpoint's UNet is then swapped for a one-level UNet of the same widths built by ComfyUI's own classes: the
CLIP and VAE stay SD 1.5-sized, training takes seconds instead of minutes on CPU, and full fine-tuning fits
in memory. ``RPO_COMFY_FULL_UNET=1`` keeps the 860M-parameter UNet instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rpo_diffusers.testing.ports import free_local_port

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server test"
)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "comfyui_nodes" / "example_workflows"


class Server:
    def __init__(self, base: Path) -> None:
        self.port = free_local_port()
        self.log_path = base / "comfyui.log"
        python = os.environ.get("COMFYUI_PYTHON", "python")
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
               "--disable-auto-launch"]  # fmt: skip
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                self.get("/object_info/RPOTrain")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("ComfyUI exited:\n" + self.log_path.read_text()[-3000:]) from None
                time.sleep(1)
        raise TimeoutError("ComfyUI did not start in 180 s")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def submit(self, workflow: dict) -> str:
        """Queue a workflow; a workflow ComfyUI rejects (node validation) raises AssertionError with its reason."""
        try:
            return json.loads(self.post("/prompt", {"prompt": workflow, "client_id": "rpo-test"}))[
                "prompt_id"
            ]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"ComfyUI rejected the workflow: {err.read().decode()[:3000]}") from err

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """The /history entry of a finished workflow (successful or not)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"workflow {prompt_id} did not finish in {timeout} s")

    def run(self, workflow: dict, timeout: float = 900) -> dict:
        """Submit, wait, and require success (the log tail is in the failure message)."""
        entry = self.wait(self.submit(workflow), timeout)
        assert entry["status"]["status_str"] == "success", (
            json.dumps(entry["status"])[:3000] + self.log_path.read_text()[-3000:]
        )
        return entry

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _base_directory(base: Path) -> Path:
    """A ComfyUI --base-directory with this repository as a custom node, a tiny scorer and three references."""
    from rpo_diffusers.testing.tiny_scorers import build_tiny_scorer

    for d in ("custom_nodes", "models/checkpoints", "models/loras", "models/diffusers", "input", "output"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "rpo-diffusers").symlink_to(REPO, target_is_directory=True)
    build_tiny_scorer(base / "models/rpo_scorers/align-base", "align", image_size=32)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (48, 80), (80, 56)]):  # references of different sizes
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            base / "input" / f"subject_{i:02d}.png"
        )
    return base


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from rpo_diffusers.testing.tiny_pipeline import build_sd15_shaped_pipeline

    base = _base_directory(tmp_path_factory.mktemp("comfy"))
    build_sd15_shaped_pipeline(base / "models/diffusers/sd15")
    server = Server(base)
    try:
        # ComfyUI's own nodes turn the diffusers folder into the single-file checkpoint artists have.
        server.run({"1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "sd15"}},
                    "2": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                                    "filename_prefix": "checkpoints/sd15"}}})  # fmt: skip
        saved = next((base / "output" / "checkpoints").glob("sd15*.safetensors"))
        shutil.rmtree(base / "models/diffusers/sd15")
        if os.environ.get("RPO_COMFY_FULL_UNET") == "1":
            shutil.move(saved, base / "models/checkpoints/sd15.safetensors")
        else:
            _shrink_unet(saved, base / "models/checkpoints/sd15.safetensors")
            saved.unlink()
        yield server, base
    finally:
        server.close()


SHRINK_UNET = """
import sys
src, dst = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_detection, comfy.utils, torch
from safetensors.torch import save_file

sd = comfy.utils.load_torch_file(src, safe_load=True)
prefix = "model.diffusion_model."
config = comfy.model_detection.detect_unet_config(sd, prefix)
config.update(channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
              transformer_depth_middle=1)
model_config = comfy.model_detection.model_config_from_unet_config(config)
assert type(model_config).__name__ == "SD15", model_config
torch.manual_seed(0)
unet = model_config.get_model({}).diffusion_model  # ComfyUI skips weight init: initialise here
with torch.no_grad():
    for name, p in unet.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith(".weight") else 0.0)  # norms' scale 1, every bias 0
        else:
            p.normal_(0.0, 0.02)
small = {k: v for k, v in sd.items() if not k.startswith(prefix)}
small.update({prefix + k: v.detach().float().contiguous() for k, v in unet.state_dict().items()})
save_file(small, dst)
"""


def _shrink_unet(src: Path, dst: Path) -> None:
    """Replace the checkpoint's UNet by a one-level UNet that ComfyUI still detects as SD 1.5."""
    python = os.environ.get("COMFYUI_PYTHON", "python")
    done = subprocess.run([python, "-c", SHRINK_UNET, str(src), str(dst)], cwd=COMFYUI_PATH, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": COMFYUI_PATH})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _tiny(workflow: dict) -> dict:
    """The example workflow with CPU-sized settings."""
    for node in workflow.values():
        inputs = node["inputs"]
        if node["class_type"] == "RPOTrain":
            inputs.update(steps=2, validation_interval=1, images_per_prompt=1, sampling_steps=2, resolution=64,
                          training_prompts="a sks dog on the beach\na sks dog on the Moon", learning_rate=1e-3)  # fmt: skip
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=min(inputs["batch_size"], 3))
        if node["class_type"] == "KSampler":
            inputs.update(steps=2)
    return workflow


def test_train_then_sample_then_load_with_lora_loader(comfy):
    server, base = comfy
    entry = server.run(_tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text())))
    lora = base / "models/loras/rpo_dog.safetensors"
    assert lora.exists()
    from safetensors.torch import load_file

    keys = load_file(str(lora))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    outputs = entry["outputs"]
    assert outputs["14"]["images"], "KSampler + SaveImage produced no image from the trained MODEL"
    assert outputs["15"]["images"] and outputs["16"]["images"], "validation images / reward plot not returned"
    assert (base / "output/rpo/rpo_dog/rpo_history.json").exists()
    # ComfyUI's own LoraLoader applies every key of the file (no "lora key not loaded").
    log_before = server.log_path.read_text()
    entry = server.run(_tiny(json.loads((WORKFLOWS / "rpo_generate_score_select_api.json").read_text())))
    new_log = server.log_path.read_text()[len(log_before) :]
    assert "lora key not loaded" not in new_log and "lora key not loaded" not in log_before
    assert len(entry["outputs"]["14"]["images"]) == 2
    assert "reward" in json.dumps(entry["outputs"]["12"])


def test_validation_settings_reach_the_trainer(comfy):
    """validation_images / validation_sampler / validation_sampling_steps: the validation grid gains a column per
    extra image, and DPM-Solver++ validation runs through ComfyUI's MODEL and VAE."""
    server, base = comfy
    widths = {}
    for name, extra in (("val_default", {}),
                        ("val_fast", {"validation_images": 2, "validation_sampler": "dpmpp_2m",
                                      "validation_sampling_steps": 3})):  # fmt: skip
        workflow = _tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text()))
        train = next(n for n in workflow.values() if n["class_type"] == "RPOTrain")
        train["inputs"].update(output_name=name, **extra)
        server.run(workflow)
        history = json.loads((base / f"output/rpo/{name}/rpo_history.json").read_text())
        assert [h["step"] for h in history["history"]] == [0, 1, 2]
        widths[name] = Image.open(base / f"output/rpo/{name}/validation/step_00000.png").width
    assert widths["val_fast"] > widths["val_default"]  # 2 images per prompt: one more column


@pytest.mark.parametrize(
    ("node", "field", "value", "message"),
    [
        ("8", "output_name", "../../escape", "plain file name"),
        ("8", "output_name", "sub/escape", "plain file name"),
        ("8", "identifier", "", "identifier must be one token"),
        ("8", "training_prompts", "a dog on the beach", "identifier 'sks'"),
    ],
)
def test_bad_train_inputs_are_rejected_before_anything_runs(comfy, node, field, value, message):
    server, base = comfy
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text()))
    workflow[node]["inputs"][field] = value
    before = sorted(p for p in base.rglob("*") if p.is_file() and p.name != "comfyui.log")
    with pytest.raises(AssertionError, match=message):
        server.submit(workflow)
    assert sorted(p for p in base.rglob("*") if p.is_file() and p.name != "comfyui.log") == before


def test_empty_score_prompt_is_rejected(comfy):
    server, _ = comfy
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_generate_score_select_api.json").read_text()))
    workflow["12"]["inputs"]["prompt"] = "  "
    with pytest.raises(AssertionError, match="prompt is empty"):
        server.submit(workflow)


def test_interrupt_stops_training_promptly_and_keeps_the_best(comfy):
    server, base = comfy
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text()))
    workflow = {k: v for k, v in workflow.items() if int(k) <= 8}  # load, references, scorer, RPO Train
    workflow["8"]["inputs"].update(steps=500, validation_interval=1, output_name="rpo_interrupted")
    prompt_id = server.submit(workflow)
    validation = base / "output/rpo/rpo_interrupted/validation"
    deadline = time.time() + 600
    while not (validation / "step_00001.png").exists():  # the base model's validation, then step 1's
        assert time.time() < deadline, "training never reached its second validation"
        time.sleep(0.5)
    t0 = time.time()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=300)
    stopped_in = time.time() - t0
    assert entry["status"]["status_str"] != "success"
    assert "execution_interrupted" in json.dumps(entry["status"]["messages"])
    history = json.loads((base / "output/rpo/rpo_interrupted/rpo_history.json").read_text())
    # Promptly: within the step that was running (no further validation), whatever this machine's speed.
    assert history["global_step"] <= 2 and [h["step"] for h in history["history"]] == [0, 1], history
    assert stopped_in < 300, f"Interrupt took {stopped_in:.0f} s"
    print(f"Interrupt stopped training {stopped_in:.1f} s after it was pressed")
    assert (base / "models/loras/rpo_interrupted.safetensors").exists(), "the best model so far was not saved"


def test_pip_installed_pack_loads_from_a_one_line_file(tmp_path):
    """The README's second install route: the package in ComfyUI's Python and one line in custom_nodes."""
    python = os.environ.get("COMFYUI_PYTHON", "python")
    if subprocess.run([python, "-c", "import comfyui_nodes"], capture_output=True).returncode != 0:
        pytest.skip("rpo-diffusers is not installed in ComfyUI's Python")
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "rpo_diffusers_nodes.py").write_text(
        "from comfyui_nodes import comfy_entrypoint\n"
    )
    server = Server(tmp_path)
    try:
        info = server.get("/object_info")
        assert {"RPOScorerLoader", "RPOScore", "RPOSelectBest", "RPOTrain"} <= set(info)
        optional = {"reference_images_2", "reference_images_3", "method", "dpg_reward", "validation_images",
                    "validation_sampler", "validation_sampling_steps"}
        assert info["RPOTrain"]["input"]["optional"].keys() == optional
    finally:
        server.close()


def test_full_unet_training_saves_a_unet_that_unet_loader_reads(comfy):
    """LoRA rank 0: the whole UNet is trained and saved to models/diffusion_models for UNETLoader."""
    server, base = comfy
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text()))
    workflow["8"]["inputs"].update(lora_rank=0, output_name="rpo_full", learning_rate=1e-5)
    for extra in ("reference_images_2", "reference_images_3"):  # and a single reference photo
        del workflow["8"]["inputs"][extra]
    entry = server.run(workflow)
    unet = base / "models/diffusion_models/rpo_full.safetensors"
    assert unet.exists() and entry["outputs"]["14"]["images"]
    sample = {k: v for k, v in workflow.items() if k in ("1", "9", "10", "11", "12", "13", "14")}
    sample["20"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "rpo_full.safetensors", "weight_dtype": "default"},
    }
    sample["12"]["inputs"]["model"] = ["20", 0]
    sample["14"]["inputs"]["filename_prefix"] = "rpo_full_reloaded"
    entry = server.run(sample)
    assert entry["outputs"]["14"]["images"], "UNETLoader + KSampler produced no image from the saved UNet"


UI_CHECK = """
import json, sys
from pathlib import Path
from playwright.sync_api import sync_playwright

port, chromium, ui_file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page()
    local = f"http://127.0.0.1:{port}/"
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local) else route.abort())
    page.goto(local, wait_until="networkidle", timeout=120000)
    page.wait_for_function("window.app && window.app.graph", timeout=120000)
    prompt = page.evaluate(
        "async (wf) => { await window.app.loadGraphData(wf); return (await window.app.graphToPrompt()).output; }",
        json.loads(ui_file.read_text()),
    )
    print(json.dumps(prompt))
    browser.close()
"""


@pytest.mark.parametrize("name", ["rpo_train_then_sample", "rpo_generate_score_select"])
def test_ui_workflow_loads_in_the_frontend_as_the_api_workflow(comfy, name):
    """The UI-format file, loaded by ComfyUI's own frontend (headless Chromium), gives the API-format prompt."""
    python, chromium = (
        os.environ.get("PLAYWRIGHT_PYTHON"),
        os.environ.get("CHROMIUM") or shutil.which("chromium"),
    )
    if not python or not chromium:
        pytest.skip("set PLAYWRIGHT_PYTHON (a Python with playwright) and have chromium (or CHROMIUM=path)")
    server, _ = comfy
    done = subprocess.run([python, "-c", UI_CHECK, str(server.port), chromium, str(WORKFLOWS / f"{name}.json")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    prompt = json.loads(done.stdout.strip().splitlines()[-1])
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    ui_id = {key: str(i + 1) for i, key in enumerate(api)}  # api_to_ui numbers nodes in the API file's order
    expected = {
        ui_id[key]: {
            "class_type": node["class_type"],
            "inputs": {
                k: [ui_id[v[0]], v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()
            },
        }
        for key, node in api.items()
    }
    got = {k: {"class_type": v["class_type"], "inputs": {n: [str(x[0]), x[1]] if isinstance(x, list) else x
                                                        for n, x in v["inputs"].items()}} for k, v in prompt.items()}  # fmt: skip
    assert got == expected


SIGNATURES = """
import inspect, json, sys
sys.argv = [sys.argv[0], "--cpu"]
try:
    import comfy.options
    comfy.options.enable_args_parsing()
except ImportError:  # the stand-ins have no comfy.options
    pass
import comfy.model_management, comfy.utils, folder_paths
from comfy_api.latest import io, ui
used = [folder_paths.get_folder_paths, folder_paths.get_output_directory, comfy.utils.ProgressBar.__init__,
        comfy.utils.ProgressBar.update_absolute, comfy.model_management.throw_exception_if_processing_interrupted,
        comfy.model_management.get_torch_device, io.NodeOutput.__init__, ui.PreviewText.__init__, io.Schema.__init__]
print(json.dumps({f.__qualname__: list(inspect.signature(f).parameters) for f in used}))
"""


def test_stand_ins_have_the_real_signatures():
    """tests/comfy_standins.py must stay faithful: every ComfyUI callable the pack uses has the real parameter names."""

    def signatures(python: str, path: str, setup: str = "") -> dict:
        done = subprocess.run([python, "-c", setup + SIGNATURES], cwd=path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path})  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    real = signatures(os.environ.get("COMFYUI_PYTHON", "python"), COMFYUI_PATH)
    stub = signatures(sys.executable, str(REPO / "tests"), "import comfy_standins; comfy_standins.install()\n")
    assert stub == real


@pytest.mark.parametrize("dpg_reward", ["latent", "lambda_harmonic"])
def test_dpg_training_in_the_node_then_sample_with_the_trained_model(comfy, dpg_reward):
    """method=dpg on the same node: the critic trains through ComfyUI's MODEL/VAE, the LoRA loads, KSampler runs."""
    server, base = comfy
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_train_then_sample_api.json").read_text()))
    train = next(n for n in workflow.values() if n["class_type"] == "RPOTrain")
    train["inputs"].update(method="dpg", dpg_reward=dpg_reward, output_name=f"dpg_{dpg_reward}")
    entry = server.run(workflow)
    assert (base / f"models/loras/dpg_{dpg_reward}.safetensors").exists()
    history = json.loads((base / f"output/rpo/dpg_{dpg_reward}/rpo_history.json").read_text())
    assert history["method"] == "dpg" and history["critic"] == "residual"
    assert entry["outputs"]["14"]["images"], "KSampler produced no image from the DPG-trained MODEL"


def test_text_encoder_lora_keys_all_load_in_lora_loader(comfy):
    """A text-encoder LoRA on SD 1.5's CLIP-L (12 layers, 768 wide; random weights), converted as the export does:
    ComfyUI's LoraLoader maps every lora_te_* key onto CLIP (no "lora key not loaded")."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from rpo_diffusers.components import add_text_encoder_lora
    from rpo_diffusers.config import DEFAULT_TEXT_ENCODER_LORA_TARGETS
    from rpo_diffusers.export import peft_to_kohya_state_dict, text_encoder_lora_state_dict

    server, base = comfy
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768))  # fmt: skip
    add_text_encoder_lora(clip_l, 4, 8.0, DEFAULT_TEXT_ENCODER_LORA_TARGETS)
    kohya = peft_to_kohya_state_dict(text_encoder_lora_state_dict(clip_l), 8.0, prefix="lora_te")
    assert len(kohya) == 12 * 4 * 3  # 12 layers x q/k/v/out x (down, up, alpha)
    save_file(kohya, str(base / "models/loras/te_only.safetensors"))
    workflow = _tiny(json.loads((WORKFLOWS / "rpo_generate_score_select_api.json").read_text()))
    workflow["2"]["inputs"].update(lora_name="te_only.safetensors", strength_model=0.0)
    log_before = server.log_path.read_text()
    server.run(workflow)
    new_log = server.log_path.read_text()[len(log_before) :]
    assert "lora key not loaded" not in new_log, new_log[-2000:]


# --- SDXL ----------------------------------------------------------------------------------------------------
SDXL_PARTS = """
import sys
models = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_detection, torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from rpo_diffusers.testing.tiny_pipeline import SDXL_TEXT_CONFIGS

# SDXL base's layout where ComfyUI reads it (320 channels, 2048-wide text, 2816-wide y, encoder depths
# [0, 0, 2, 2, 10, 10]) at one width throughout and a shallow decoder and middle: 160M parameters, not 2.6B
config = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
              num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
              transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], context_dim=2048,
              adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
              use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
model_config = comfy.model_detection.model_config_from_unet_config(config)
assert type(model_config).__name__ == "SDXL", model_config
torch.manual_seed(0)
unet = model_config.get_model({}).diffusion_model  # ComfyUI skips weight init: initialise here
with torch.no_grad():
    for name, p in unet.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith(".weight") else 0.0)
        else:
            p.normal_(0.0, 0.02)
state = {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
detected = comfy.model_detection.model_config_from_unet(state, "")
assert type(detected).__name__ == "SDXL", detected  # what UNETLoader will see
save_file(state, f"{models}/diffusion_models/sdxl_unet.safetensors")
del unet, state

# CLIP-L and CLIP-G of the real shapes (ComfyUI builds SDXL's text encoders at fixed sizes), random in fp16 straight
# from meta-device shapes: CLIP-G's 695M parameters never exist in fp32
for name, cls, text_config in zip(("clip_l", "clip_g"), (CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_CONFIGS):
    with torch.device("meta"):
        shapes = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text_config)).state_dict()
    state = {}
    for key, t in shapes.items():
        if not t.is_floating_point():
            continue
        if not key.startswith(("text_model.", "text_projection.")):  # transformers 5's CLIPTextModel drops it
            key = "text_model." + key
        if t.ndim == 1:
            state[key] = (torch.ones if key.endswith(".weight") else torch.zeros)(t.shape, dtype=torch.float16)
        else:
            state[key] = (torch.randn(t.shape) * 0.02).half()
    save_file(state, f"{models}/text_encoders/{name}.safetensors")
    del state
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, f"{models}/vae/sdxl_vae.safetensors")
"""


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    """A base directory with an SDXL checkpoint that ComfyUI's own nodes assembled: UNETLoader (an SDXL-layout
    UNet that ComfyUI's classes built), DualCLIPLoader type sdxl (CLIP-L + CLIP-G of the real sizes), VAELoader
    (SD's VAE shape, as SDXL's), then CheckpointSave; Load Checkpoint then detects it as SDXL from its tensors.
    The server that assembled it is closed again, so its copies of the parts never share memory with a test's."""
    base = _base_directory(tmp_path_factory.mktemp("comfy_sdxl"))
    parts = ("diffusion_models", "text_encoders", "vae")
    for d in parts:
        (base / "models" / d).mkdir(parents=True, exist_ok=True)
    python = os.environ.get("COMFYUI_PYTHON", "python")  # built in its own process: this one stays small
    done = subprocess.run([python, "-c", SDXL_PARTS, str(base / "models")], cwd=COMFYUI_PATH, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": f"{COMFYUI_PATH}:{REPO}"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    server = Server(base)
    try:
        server.run({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sdxl_unet.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "clip_g.safetensors", "type": "sdxl"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
            "4": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0],
                                                             "filename_prefix": "checkpoints/sdxl"}},
        })  # fmt: skip
    finally:
        server.close()
    saved = next((base / "output" / "checkpoints").glob("sdxl*.safetensors"))
    shutil.move(saved, base / "models/checkpoints/sdxl.safetensors")
    for d in parts:
        shutil.rmtree(base / "models" / d)
    return base


@pytest.fixture
def sdxl(sdxl_base):
    """A fresh server on the SDXL checkpoint for each test: what one test loaded (CLIP-G alone is 1.4 GB, a full
    UNet run's optimiser state more) is gone before the next starts, which keeps a test under 6 GB of RAM."""
    server = Server(sdxl_base)
    try:
        yield server, sdxl_base
    finally:
        server.close()


SDXL_CONDITIONING = """
import sys
ckpt = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, torch
from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
from nodes import CLIPTextEncode
from comfyui_nodes.adapter import ComfySDXLComponents
from rpo_diffusers.sdxl import sdxl_time_ids

model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
prompt, (w, h), res = "a sks dog on the Moon", (112, 80), 64  # a landscape photo: cropped left and right
with torch.inference_mode(False):
    comp = ComfySDXLComponents(model, clip, vae, "unused.safetensors", resolution=res)
    ours = comp.condition_on_sizes(comp.encode_prompts([prompt]), [(w, h)], res)
    top, left = sdxl_time_ids(w, h, res)[2:4]
    assert top == 0 and left > 0, (top, left)
    cond = CLIPTextEncodeSDXL.execute(clip, width=w, height=h, crop_w=left, crop_h=top, target_width=res,
                                      target_height=res, text_g=prompt, text_l=prompt).result[0]
    cross, extra = cond[0]
    noise = torch.zeros(1, 4, res // 8, res // 8)
    theirs = model.model.extra_conds(**extra, cross_attn=cross, noise=noise, device="cpu")  # what KSampler builds
    y, context = theirs["y"].cond, theirs["c_crossattn"].cond
    x, t = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        mine = comp.denoiser(x, t, ours)
        ref = comp.train_unet(x, timesteps=t, context=context.float(), y=y.float())
        swapped = comp.train_unet(x, timesteps=t, context=context.float(),
                                  y=model.model.encode_adm(**{**extra, "crop_w": top, "crop_h": left}).float())
    print("context", (ours.prompt_embeds - context).abs().max().item(), "y", (comp.denoiser.conditioning_kwargs(ours)["y"] - y).abs().max().item())
    assert torch.allclose(ours.prompt_embeds, context.float(), atol=1e-5) and torch.allclose(comp.denoiser.conditioning_kwargs(ours)["y"], y.float(), atol=1e-5)
    assert torch.allclose(mine, ref, atol=1e-5), (mine - ref).abs().max()
    assert not torch.allclose(mine, swapped, atol=1e-5)  # the check sees a crop given the wrong way round
    # images drawn for validation: what KSampler gives SDXL for a plain CLIPTextEncode at that latent size
    plain = CLIPTextEncode().encode(clip, prompt)[0][0]
    size = 96
    kwargs = model.model.extra_conds(**plain[1], cross_attn=plain[0], width=size, height=size, device="cpu",
                                     noise=torch.zeros(1, 4, size // 8, size // 8))
    uncond, cond = comp.sampling_conditioning([prompt], size)
    assert torch.allclose(comp.denoiser.conditioning_kwargs(cond)["y"], kwargs["y"].cond.float(), atol=1e-5)
print("ok")
"""


def test_sdxl_conditioning_is_what_comfyui_own_sdxl_encoding_gives_ksampler(sdxl_base):
    """The node's SDXL conditioning of a prompt for a cropped photo equals CLIPTextEncodeSDXL's (same sizes and
    crop) after the checkpoint's extra_conds, the path KSampler takes: text states, y (pooled output + size
    embedding) and the UNet's output; for validation images, a plain CLIPTextEncode at that latent size. First of
    the SDXL tests, before their server starts: it loads the checkpoint in its own process."""
    base = sdxl_base
    python = os.environ.get("COMFYUI_PYTHON", "python")
    done = subprocess.run([python, "-c", SDXL_CONDITIONING, str(base / "models/checkpoints/sdxl.safetensors")],
                          cwd=COMFYUI_PATH, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{COMFYUI_PATH}:{REPO}"})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-3000:]


def _sdxl_workflow(name: str, **train: object) -> dict:
    """An example workflow on the SDXL checkpoint, CPU-sized (64 px: a multiple of SDXL's 32-pixel step)."""
    workflow = _tiny(json.loads((WORKFLOWS / f"{name}_api.json").read_text()))
    for node in workflow.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "sdxl.safetensors"
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["batch_size"] = 1
        if node["class_type"] == "RPOTrain":
            node["inputs"].update(train)
    return workflow


def _saved_image(base: Path, entry: dict, node: str) -> np.ndarray:
    image = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(base / "output" / image["subfolder"] / image["filename"]), dtype=np.int16)


def test_sdxl_lora_trains_loads_in_lora_loader_and_changes_ksampler_output(sdxl):
    """The SDXL checkpoint from Load Checkpoint trains (LoRA); KSampler runs on the returned MODEL; LoraLoader
    applies every key of the saved file, and gives KSampler the same image as the node's MODEL and another one
    than the base model's."""
    from safetensors.torch import load_file

    server, base = sdxl
    log_before = server.log_path.read_text()
    entry = server.run(_sdxl_workflow("rpo_train_then_sample", output_name="rpo_sdxl", learning_rate=1e-2))
    trained = _saved_image(base, entry, "14")
    history = json.loads((base / "output/rpo/rpo_sdxl/rpo_history.json").read_text())
    assert history["best_step"] > 0, "the base model was selected: this check needs a trained step (change seed)"
    lora = load_file(str(base / "models/loras/rpo_sdxl.safetensors"))
    ups = [v for k, v in lora.items() if k.endswith(".lora_up.weight")]
    # every attention of SDXL's layout: 2 x 2 + 2 x 10 encoder blocks, 1 middle, 6 decoder, self + cross each
    assert len(ups) == (24 + 1 + 6) * 2 * 4 and any(v.abs().max() > 0 for v in ups)
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.alpha" in lora
    sample = {k: v for k, v in _sdxl_workflow("rpo_generate_score_select").items() if int(k) <= 7}
    sample["7"]["inputs"]["samples"] = ["6", 0]
    sample["14"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sdxl_lora"}}
    sample["2"]["inputs"]["lora_name"] = "rpo_sdxl.safetensors"
    sample["20"] = {**sample["6"], "inputs": {**sample["6"]["inputs"], "model": ["1", 0]}}  # the base model
    sample["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    sample["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "sdxl_base"}}
    for node in ("3", "4"):  # the prompts of the training workflow's KSampler
        sample[node]["inputs"]["text"] = _sdxl_workflow("rpo_train_then_sample")[str(int(node) + 6)]["inputs"]["text"]
    entry = server.run(sample)
    new_log = server.log_path.read_text()[len(log_before) :]
    assert "lora key not loaded" not in new_log, new_log[-2000:]
    reloaded, base_image = _saved_image(base, entry, "14"), _saved_image(base, entry, "22")
    assert np.abs(reloaded - trained).max() <= 1, "LoraLoader's MODEL samples differently from RPOTrain's MODEL"
    assert np.abs(reloaded - base_image).max() > 1, "the trained LoRA does not change KSampler's output"


def test_sdxl_full_unet_training_saves_a_unet_that_unet_loader_reads_as_sdxl(sdxl):
    """LoRA rank 0 on SDXL: the whole UNet is trained, saved for UNETLoader, which detects SDXL (KSampler feeds
    it the 2816-wide y of SDXL's conditioning; any other detected family fails on it)."""
    server, base = sdxl
    workflow = _sdxl_workflow("rpo_train_then_sample", lora_rank=0, output_name="rpo_sdxl_full", learning_rate=1e-5)
    server.run(workflow)
    assert (base / "models/diffusion_models/rpo_sdxl_full.safetensors").exists()
    sample = {k: v for k, v in workflow.items() if k in ("1", "9", "10", "11", "12", "13", "14")}
    sample["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "rpo_sdxl_full.safetensors", "weight_dtype": "default"}}
    sample["12"]["inputs"]["model"] = ["20", 0]
    sample["14"]["inputs"]["filename_prefix"] = "rpo_sdxl_full_reloaded"
    entry = server.run(sample)
    assert entry["outputs"]["14"]["images"]


def test_sdxl_dpg_with_the_lambda_harmonic_reward_trains_in_the_node(sdxl):
    """method=dpg on SDXL: the critic learns the scorer's reward on images ComfyUI's SDXL VAE decodes; the LoRA loads."""
    server, base = sdxl
    entry = server.run(_sdxl_workflow("rpo_train_then_sample", method="dpg", dpg_reward="lambda_harmonic",
                                      output_name="dpg_sdxl"))  # fmt: skip
    history = json.loads((base / "output/rpo/dpg_sdxl/rpo_history.json").read_text())
    assert history["method"] == "dpg" and (base / "models/loras/dpg_sdxl.safetensors").exists()
    assert entry["outputs"]["14"]["images"], "KSampler produced no image from the DPG-trained SDXL MODEL"
