"""Stand-ins for the few ComfyUI modules the node pack imports, so node schemas, validation and conversions are
tested where ComfyUI is not installed.

They share only module names, class and function names and parameter names with ComfyUI: the public API the pack
calls (``test_stand_ins_have_the_real_signatures`` checks them against a real checkout). Every body is ours and as
small as the tests need: nothing is ever interrupted here and folders live under a temp dir. They live in this one
file and are registered as modules by :func:`install`, so the repository holds no files at ComfyUI's module paths
and no ComfyUI code. Behaviour that matters (Interrupt, loaders, progress) is tested against a real ComfyUI by
``tests/test_comfyui_server.py`` when ``COMFYUI_PATH`` is set.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any

import torch

# ---- comfy.model_management: only the two names the pack calls


def throw_exception_if_processing_interrupted() -> None:
    return None


def get_torch_device() -> torch.device:
    return torch.device("cpu")


# ---- comfy.utils


class ProgressBar:
    def __init__(self, total: int, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.current = value
        if total is not None:
            self.total = total


# ---- folder_paths: a models/output tree under RPO_TEST_COMFY_ROOT (or a temp dir)

BASE_PATH = os.environ.get("RPO_TEST_COMFY_ROOT") or tempfile.mkdtemp(prefix="comfy-standin-")
MODELS_DIR = os.path.join(BASE_PATH, "models")
# the registry the pack reads and extends: folder name -> (folders, extensions)
FOLDERS = {name: ([os.path.join(MODELS_DIR, name)], {".safetensors"}) for name in ("loras", "diffusion_models")}


def get_folder_paths(folder_name: str) -> list[str]:
    return list(FOLDERS[folder_name][0])  # a copy: callers may not change the registry


def get_output_directory() -> str:
    return os.path.join(BASE_PATH, "output")


# ---- comfy_api.latest.io: typed ports that record their options, the node schema and its output


class _Port:
    def __init__(self, id: str | None = None, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, **options: Any) -> None:  # fmt: skip
        self.id, self.display_name, self.optional, self.tooltip, self.options = id, display_name, optional, tooltip, options


def _port_type(io_type: str) -> type:
    """A type with ``Input`` and ``Output`` ports that carry ``io_type``."""
    return type(io_type, (), {"io_type": io_type, "Input": type("Input", (_Port,), {"io_type": io_type}),
                              "Output": type("Output", (_Port,), {"io_type": io_type})})  # fmt: skip


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list | None = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        ids = [port.id for port in self.inputs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.node_id}: an input id appears twice in {ids}")


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args or None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        return True


# ---- comfy_api.latest.ui


class PreviewText:
    def __init__(self, value: str, **kwargs) -> None:
        self.value = value  # the real class also hands it to the frontend; nothing renders here


# ---- comfy_api.latest


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self):
        raise NotImplementedError


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def install() -> None:
    """Register the stand-ins as ``comfy``, ``comfy_api`` and ``folder_paths`` (unless ComfyUI's own are there)."""
    if "comfy_api" in sys.modules:
        return
    io = _module("comfy_api.latest.io", Schema=Schema, NodeOutput=NodeOutput, ComfyNode=ComfyNode, Custom=_port_type,
                 **{name: _port_type(t) for name, t in (("Boolean", "BOOLEAN"), ("Int", "INT"), ("Float", "FLOAT"),
                    ("String", "STRING"), ("Combo", "COMBO"), ("Image", "IMAGE"), ("Model", "MODEL"), ("Clip", "CLIP"),
                    ("Vae", "VAE"), ("Latent", "LATENT"))})  # fmt: skip
    ui = _module("comfy_api.latest.ui", PreviewText=PreviewText)
    latest = _module("comfy_api.latest", io=io, ui=ui, ComfyExtension=ComfyExtension)
    management = _module("comfy.model_management", get_torch_device=get_torch_device,
                         throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted)
    utils = _module("comfy.utils", ProgressBar=ProgressBar)
    folder_paths = _module("folder_paths", base_path=BASE_PATH, models_dir=MODELS_DIR, folder_names_and_paths=FOLDERS,
                           get_folder_paths=get_folder_paths,
                           get_output_directory=get_output_directory)
    modules = {"comfy_api": _module("comfy_api", latest=latest), "comfy_api.latest": latest, "comfy_api.latest.io": io,
               "comfy_api.latest.ui": ui, "comfy": _module("comfy", model_management=management, utils=utils),
               "comfy.model_management": management, "comfy.utils": utils, "folder_paths": folder_paths}  # fmt: skip
    for module in modules.values():
        module.__path__ = []  # importable as packages: "from comfy_api.latest import io" resolves the submodule
    sys.modules.update(modules)
