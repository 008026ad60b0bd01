"""Stand-in for ComfyUI's ``comfy_api.latest`` (V3 node API): just enough structure to build schemas."""

from . import io, ui


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self):
        raise NotImplementedError


__all__ = ["ComfyExtension", "io", "ui"]
