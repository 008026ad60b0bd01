"""Entry point when this repository is cloned into ``ComfyUI/custom_nodes/`` (ComfyUI imports it as a package)."""

import contextlib

with contextlib.suppress(ImportError):  # imported outside ComfyUI as a plain module: nothing to expose
    from .comfyui_nodes import comfy_entrypoint  # noqa: F401
