"""Stand-in for ``comfy_api.latest.io``: typed inputs/outputs that record their options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class _Port:
    def __init__(self, id: str | None = None, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, **options: Any) -> None:  # fmt: skip
        self.id, self.display_name, self.optional, self.tooltip, self.options = (
            id,
            display_name,
            optional,
            tooltip,
            options,
        )


def _comfytype(io_type: str):
    class _Type:
        class Input(_Port):
            pass

        class Output(_Port):
            pass

    _Type.io_type = io_type
    _Type.Input.io_type = io_type
    _Type.Output.io_type = io_type
    _Type.__name__ = io_type
    return _Type


def Custom(io_type: str):
    return _comfytype(io_type)


Boolean, Int, Float, String, Combo = (_comfytype(t) for t in ("BOOLEAN", "INT", "FLOAT", "STRING", "COMBO"))
Image, Model, Clip, Vae, Latent = (_comfytype(t) for t in ("IMAGE", "MODEL", "CLIP", "VAE", "LATENT"))


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
        ids_in = [i.id for i in self.inputs]
        if len(set(ids_in)) != len(ids_in):
            raise ValueError(f"Input ids must be unique: {ids_in}")


class NodeOutput:
    def __init__(
        self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None
    ):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        return True
