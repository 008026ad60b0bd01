"""ComfyUI node pack for rpo-diffusers (V3 API).

Install: clone this repository into ``ComfyUI/custom_nodes/`` and ``pip install -r requirements.txt``
(or ``pip install rpo-diffusers`` and link ``comfyui_nodes`` into ``custom_nodes``). ComfyUI then finds
``comfy_entrypoint`` through the repository's root ``__init__.py``.
"""

from __future__ import annotations


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the extension that lists the RPO nodes."""
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES, register_folders

    class RPOExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    register_folders()
    return RPOExtension()


WEB_DIRECTORY = None
__all__ = ["comfy_entrypoint"]
