"""The ComfyUI node pack against small stand-ins for the ComfyUI modules it imports (tests/comfy_standins.py).

What runs for real here: the conversions, input validation, the scorer (a tiny CLIP) and top-k selection.
Training inside a real ComfyUI server is tested by tests/test_comfyui_server.py when COMFYUI_PATH is set.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import comfy_standins
import numpy as np
import pytest
import torch

comfy_standins.install()

import folder_paths  # noqa: E402

from comfyui_nodes import comfy_entrypoint  # noqa: E402
from comfyui_nodes.conversions import (  # noqa: E402
    comfy_image_to_pil,
    image_batches_to_pil,
    parse_prompt_lines,
    pil_to_comfy_image,
    safe_output_name,
)
from comfyui_nodes.nodes import (  # noqa: E402
    NODES,
    RPOScore,
    RPOScorerLoader,
    RPOSelectBest,
    RPOTrain,
    check_train_inputs,
    preview_grid,
    top_k,
)


def test_entrypoint_lists_every_node_with_valid_schemas():
    ext = asyncio.run(comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    assert nodes == NODES
    ids = set()
    for node in nodes:
        schema = node.define_schema()
        schema.validate()
        assert schema.node_id.startswith("RPO") and schema.category == "RPO" and schema.description
        ids.add(schema.node_id)
    assert ids == {"RPOScorerLoader", "RPOScore", "RPOSelectBest", "RPOTrain"}
    train = {i.id: i for i in RPOTrain.define_schema().inputs}
    for name in ("model", "clip", "vae", "reference_images", "identifier", "class_noun", "training_prompts", "steps",
                 "validation_interval", "lambda_val", "learning_rate", "lora_rank", "seed", "scorer", "output_name"):  # fmt: skip
        assert name in train, name
    assert (
        train["training_prompts"].options["multiline"]
        and "a sks dog on the Moon" in train["training_prompts"].options["default"]
    )
    assert [o.io_type for o in RPOTrain.define_schema().outputs] == ["MODEL", "STRING", "IMAGE", "IMAGE"]
    # the method is a choice on the same node; optional, so workflows saved before it still run as RPO
    assert train["method"].optional and train["method"].options["options"] == ["rpo", "dreambooth", "dpg"]
    assert train["method"].options["default"] == "rpo" and train["dpg_reward"].optional
    # validation settings: optional; 1 image per prompt, as the node always did, sampled as the trainer's default
    # validation samples (20 DPM-Solver++ steps)
    from comfyui_nodes.nodes import VALIDATION_SAMPLERS
    from rpo_diffusers.components import scheduler_class
    from rpo_diffusers.config import FAST_VALIDATION

    assert train["validation_images"].optional and train["validation_images"].options["default"] == 1
    steps, sampler = train["validation_sampling_steps"].options["default"], train["validation_sampler"].options["default"]
    assert steps == FAST_VALIDATION["validation_num_inference_steps"]
    assert VALIDATION_SAMPLERS[sampler] == FAST_VALIDATION["validation_sampling_scheduler"]
    # an API prompt without the optional inputs gets the same defaults from execute()'s signature
    import inspect

    params = inspect.signature(RPOTrain.execute).parameters
    assert (params["validation_sampling_steps"].default, params["validation_sampler"].default) == (steps, sampler)

    assert VALIDATION_SAMPLERS["ddim"] is None  # the trainer's own default
    for name in train["validation_sampler"].options["options"]:  # every choice names a real diffusers scheduler
        assert VALIDATION_SAMPLERS[name] is None or scheduler_class(VALIDATION_SAMPLERS[name]).__name__ == VALIDATION_SAMPLERS[name]


def test_image_conversions_round_trip_and_batches_of_different_sizes():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (3, 20, 30, 3)).astype(np.float32) / 255.0)
    pils = comfy_image_to_pil(batch)
    assert len(pils) == 3 and pils[0].size == (30, 20) and pils[0].mode == "RGB"
    assert torch.allclose(pil_to_comfy_image(pils), batch, atol=1 / 255 + 1e-6)
    rgba = torch.rand(2, 8, 8, 4)
    assert comfy_image_to_pil(rgba)[0].mode == "RGB"
    gray = torch.rand(1, 8, 8, 1)
    assert (
        np.asarray(comfy_image_to_pil(gray)[0])[..., 0].tolist()
        == np.asarray(comfy_image_to_pil(gray)[0])[..., 2].tolist()
    )
    mixed = image_batches_to_pil(torch.rand(2, 16, 16, 3), torch.rand(1, 24, 32, 3))
    assert [im.size for im in mixed] == [(16, 16), (16, 16), (32, 24)]
    with pytest.raises(ValueError, match="share a size"):
        pil_to_comfy_image(mixed)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        comfy_image_to_pil(torch.rand(2, 3, 8, 8, 2))
    with pytest.raises(ValueError, match="empty"):
        comfy_image_to_pil(torch.rand(0, 8, 8, 3))


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "   ", "x..y"])
def test_output_names_cannot_escape_the_models_folder(bad):
    with pytest.raises(ValueError):
        safe_output_name(bad)


def test_output_name_gets_the_extension():
    assert safe_output_name("rpo dog_v1") == "rpo dog_v1.safetensors"
    assert safe_output_name("x.safetensors") == "x.safetensors"


def test_train_validation_messages():
    ok = dict(
        identifier="sks",
        class_noun="dog",
        training_prompts="a sks dog on the beach\n\na sks dog",
        output_name="rpo_dog",
    )
    assert RPOTrain.validate_inputs(**ok) is True
    assert "identifier 'sks'" in RPOTrain.validate_inputs(**{**ok, "training_prompts": "a dog on the beach"})
    assert "class_noun is empty" in RPOTrain.validate_inputs(**{**ok, "class_noun": " "})
    assert "identifier must be one token" in RPOTrain.validate_inputs(**{**ok, "identifier": ""})
    assert "plain file name" in RPOTrain.validate_inputs(**{**ok, "output_name": "../../etc/x"})
    assert RPOTrain.validate_inputs(**{**ok, "training_prompts": ""}) is True  # empty = the RPO defaults
    default = {i.id: i for i in RPOTrain.define_schema().inputs}["training_prompts"].options["default"]
    # The untouched default follows the class and identifier: no dog prompts for a backpack, no 'sks' for 'zwx'.
    assert check_train_inputs("zwx", "backpack", default, "rpo_bag") is None
    assert check_train_inputs("sks", "dog", "a sks dog\n", "rpo_dog") == ["a sks dog"]
    assert parse_prompt_lines(" a \n\n b ") == ["a", "b"]
    assert RPOScore.validate_inputs(prompt="", lambda_=0.5).startswith("prompt is empty")
    assert "[0, 1]" in RPOScore.validate_inputs(prompt="a sks dog", lambda_=1.5)


def _train_inputs(**changes) -> dict:
    """RPO Train's inputs with its schema defaults (the MODEL/CLIP/VAE/scorer are filled in by each test)."""
    values = {i.id: i.options.get("default") for i in RPOTrain.define_schema().inputs if not i.optional}
    values.update(reference_images=torch.rand(3, 16, 16, 3), **changes)
    return values


def _written_files() -> list[Path]:
    roots = [Path(folder_paths.models_dir), Path(folder_paths.get_output_directory())]
    return [
        f
        for root in roots
        if root.exists()
        for f in root.rglob("*")
        if f.is_file() and "rpo_scorers" not in f.parts
    ]


def test_train_rejects_a_non_sd_model_before_writing_anything():
    class FluxLikeConfig:
        pass

    class FakeBase:
        model_config = FluxLikeConfig()
        diffusion_model = torch.nn.Linear(2, 2)

    class FakeModel:
        model = FakeBase()

    before = _written_files()
    with pytest.raises(ValueError, match=r"Stable Diffusion 1.x / 2.x and SDXL.*FluxLikeConfig.*Load Checkpoint"):
        RPOTrain.execute(**_train_inputs(model=FakeModel(), clip=None, vae=None, scorer=None))
    assert _written_files() == before


def _comfy_model(config_name: str, prediction: str = "EPS", in_channels: int = 4):
    """What check_supported_model reads of a Load Checkpoint MODEL: its ComfyUI model config's class name (the
    names of comfy/supported_models.py), the UNet config and the prediction type; no weights."""
    config = type(config_name, (), {"unet_config": {"channel_mult": [1, 2, 4], "in_channels": in_channels}})()
    model_type = type("ModelType", (), {"name": prediction})()
    base = type("BaseModel", (), {"model_config": config, "diffusion_model": None, "model_type": model_type})()
    return type("ModelPatcher", (), {"model": base})()


@pytest.mark.parametrize(
    ("config_name", "family"),
    [("SD15", "sd"), ("SD20", "sd"), ("SDXL", "sdxl"), ("SSD1B", "sdxl"), ("Segmind_Vega", "sdxl")],
)
def test_sd_and_sdxl_checkpoints_are_accepted_as_their_family(config_name, family):
    from comfyui_nodes.adapter import check_supported_model

    assert check_supported_model(_comfy_model(config_name), 1024) == family


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_comfy_model("SDXLRefiner"), r"1.x / 2.x and SDXL \(base\).*'SDXLRefiner'"),
        (_comfy_model("SD3"), r"1.x / 2.x and SDXL \(base\).*'SD3'"),
        (_comfy_model("Flux"), r"1.x / 2.x and SDXL \(base\).*'Flux'"),
        (_comfy_model("Stable_Cascade_C"), r"1.x / 2.x and SDXL \(base\).*'Stable_Cascade_C'"),
        (_comfy_model("SDXL", prediction="EDM"), r"SDXL MODEL uses EDM.*Playground"),
        (_comfy_model("SDXL", in_channels=9), r"SDXL MODEL's UNet takes 9 input channels \(an inpainting"),
    ],
)
def test_other_families_are_refused_naming_what_is_supported(model, message):
    from comfyui_nodes.adapter import check_supported_model

    with pytest.raises(ValueError, match=message):
        check_supported_model(model)


def test_sdxl_resolution_its_size_ids_cannot_describe_is_refused_before_anything_is_written():
    before = _written_files()
    with pytest.raises(ValueError, match=r"resolution 1000 .*multiple of 32.*992 or 1024"):
        RPOTrain.execute(**_train_inputs(model=_comfy_model("SDXL"), clip=None, vae=None, scorer=None, resolution=1000))
    assert _written_files() == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_name": "../loras/evil"}, "plain file name"),
        ({"output_name": "sub/dir"}, "plain file name"),
        ({"identifier": " "}, "identifier must be one token"),
        ({"class_noun": ""}, "class_noun is empty"),
        ({"training_prompts": "a dog on the beach"}, "identifier 'sks'"),
    ],
)
def test_train_bad_inputs_fail_in_execute_too_with_nothing_written(change, message):
    """API users can skip the UI's validation; execute repeats it before touching the model or the disk."""
    before = _written_files()
    with pytest.raises(ValueError, match=message):
        RPOTrain.execute(**_train_inputs(model=object(), clip=None, vae=None, scorer=None, **change))
    assert _written_files() == before


def test_scorer_loader_score_and_select_best(tiny_scorer_dirs, sample_images):
    root = Path(folder_paths.models_dir) / "rpo_scorers"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "tiny-clip"
    if not link.exists():
        link.symlink_to(tiny_scorer_dirs["clip"], target_is_directory=True)
    (root / "not-a-model").mkdir(exist_ok=True)
    options = {i.id: i for i in RPOScorerLoader.define_schema().inputs}["scorer_name"].options["options"]
    assert "tiny-clip" in options and "not-a-model" not in options
    (scorer,) = RPOScorerLoader.execute("tiny-clip", "sks").result
    images = pil_to_comfy_image([im.resize((32, 32)) for im in sample_images[:4]])
    refs = pil_to_comfy_image([im.resize((40, 40)) for im in sample_images[4:]])
    out = RPOScore.execute(scorer, images, refs, "a sks dog on the beach", 0.5)
    scores, rewards, align_i, align_t = out.result
    direct = scorer.score(
        comfy_image_to_pil(images), "a dog on the beach", reference_images=comfy_image_to_pil(refs)
    )
    assert rewards == pytest.approx(direct.reward.tolist(), abs=1e-6) and len(align_i) == len(align_t) == 4
    assert "#3: reward" in out.ui.value
    best, order = RPOSelectBest.execute(images, scores, 2).result
    assert order == sorted(range(4), key=lambda i: -scores[i])[:2]
    assert torch.equal(best[0], images[order[0]]) and best.shape[0] == 2
    with pytest.raises(ValueError, match="4 images but 3 scores"):
        top_k(images, scores[:3], 1)
    with pytest.raises(ValueError, match="not found"):
        RPOScorerLoader.execute("missing", "sks")


def test_references_of_different_sizes_and_a_single_reference_are_scored(tiny_scorer_dirs, sample_images):
    from rpo_diffusers.rewards import LambdaHarmonicScorer

    scorer = LambdaHarmonicScorer.from_pretrained(tiny_scorer_dirs["clip"], identifier="sks")
    images = pil_to_comfy_image([im.resize((32, 32)) for im in sample_images[:2]])
    sizes = [(40, 40), (24, 48), (64, 32)]
    refs = [pil_to_comfy_image([im.resize(size)]) for im, size in zip(sample_images[2:5], sizes, strict=True)]
    _, _, align_i, _ = RPOScore.execute(scorer, images, refs[0], "a sks dog", 0.5, refs[1], refs[2]).result
    direct = scorer.score(
        comfy_image_to_pil(images), "a dog", reference_images=[comfy_image_to_pil(r)[0] for r in refs]
    )
    assert align_i == pytest.approx(direct.image_alignment.tolist(), abs=1e-6)
    _, _, single_i, _ = RPOScore.execute(scorer, images, refs[0], "a sks dog", 0.5).result
    only_first = scorer.score(
        comfy_image_to_pil(images), "a dog", reference_images=comfy_image_to_pil(refs[0])
    )
    assert single_i == pytest.approx(only_first.image_alignment.tolist(), abs=1e-6)
    assert single_i != pytest.approx(align_i, abs=1e-6), "the extra references were ignored"


def test_example_workflows_match_the_node_schemas():
    import json

    folder = Path(__file__).resolve().parents[1] / "comfyui_nodes" / "example_workflows"
    schemas = {n.define_schema().node_id: n.define_schema() for n in NODES}
    for api_file in sorted(folder.glob("*_api.json")):
        api = json.loads(api_file.read_text())
        ui = json.loads(api_file.with_name(api_file.name.replace("_api.json", ".json")).read_text())
        assert sorted(n["class_type"] for n in api.values()) == sorted(n["type"] for n in ui["nodes"])
        api_links = sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
        assert len(ui["links"]) == api_links
        for node in api.values():
            if node["class_type"] in schemas:
                inputs = schemas[node["class_type"]].inputs
                required = {i.id for i in inputs if not i.optional}
                assert required <= set(node["inputs"]) <= {i.id for i in inputs}, (
                    api_file.name,
                    node["class_type"],
                )


def test_trained_files_go_to_the_named_models_folder_not_a_legacy_alias(monkeypatch):
    from comfyui_nodes.nodes import model_folder

    legacy, named = (str(Path(folder_paths.models_dir) / d) for d in ("unet", "diffusion_models"))
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "diffusion_models", ([legacy, named], {".safetensors"})
    )
    assert model_folder("diffusion_models") == Path(named)
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "loras", (["/elsewhere/my_loras"], {".safetensors"})
    )
    assert model_folder("loras") == Path("/elsewhere/my_loras")  # an extra_model_paths folder: used as it is


def test_repository_root_init_exposes_the_entrypoint_only_when_loaded_as_a_package():
    import importlib.util
    import runpy

    root_init = Path(__file__).resolve().parents[1] / "__init__.py"
    assert "comfy_entrypoint" not in runpy.run_path(str(root_init))  # a plain module: nothing imported
    spec = importlib.util.spec_from_file_location(
        "rpo_pack_as_comfyui_loads_it", root_init
    )  # as nodes.py does
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        ext = asyncio.run(module.comfy_entrypoint())
        ids = [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())]
        assert ids == [n.define_schema().node_id for n in NODES]
    finally:
        sys.modules.pop(spec.name, None)


def test_train_preview_prefers_the_labelled_before_after_grid(tmp_path):
    """The node shows before_after.png when the run wrote it; with no validation images, the references under
    a header that says so (never an unlabelled strip)."""
    from PIL import Image

    refs = [Image.new("RGB", (32, 32), (0, 90, 200)) for _ in range(3)]
    fallback = preview_grid(tmp_path, 0, refs)
    assert fallback.width >= 3 * 192 and fallback.height > 192  # upscaled cells plus a title and headers
    header = np.asarray(fallback.convert("L"))[:40]
    assert (header < 200).sum() > 100  # the title is drawn
    Image.new("RGB", (100, 60), "red").save(tmp_path / "before_after.png")
    assert preview_grid(tmp_path, 0, refs).size == (100, 60)


@pytest.mark.parametrize(("config_name", "asked", "used"), [("SD15", 0, 512), ("SDXL", 0, 1024), ("SDXL", 768, 768),
                                                            ("SD20", 768, 768)])  # fmt: skip
def test_resolution_0_trains_at_the_models_own_size(config_name, asked, used):
    from comfyui_nodes.adapter import training_resolution

    assert training_resolution(_comfy_model(config_name), asked) == used
    assert {i.id: i for i in RPOTrain.define_schema().inputs}["resolution"].options["default"] == 0
