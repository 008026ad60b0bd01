"""Entry point when this repository is cloned into ``ComfyUI/custom_nodes/`` (ComfyUI imports it as a package).

Imported any other way (a plain module, no parent package) it exposes nothing and imports nothing, so
``import rpo_diffusers`` and test collection never depend on ComfyUI.
"""

if __package__:  # loaded by ComfyUI as a package: expose the nodes, and let real import errors show
    try:
        from .comfyui_nodes import comfy_entrypoint  # noqa: F401
    except ModuleNotFoundError as err:
        raise ImportError(
            f"RPO nodes: {err}. Install the library into ComfyUI's Python from this folder: "
            "`python -m pip install -r requirements.txt`."
        ) from err
