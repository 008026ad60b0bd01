"""Stand-in for ComfyUI's ``folder_paths``: a models/output tree under RPO_TEST_COMFY_ROOT (or a temp dir)."""

import os
import tempfile

base_path = os.environ.get("RPO_TEST_COMFY_ROOT") or tempfile.mkdtemp(prefix="comfy-stub-")
models_dir = os.path.join(base_path, "models")
folder_names_and_paths = {
    "loras": ([os.path.join(models_dir, "loras")], {".safetensors"}),
    "diffusion_models": ([os.path.join(models_dir, "diffusion_models")], {".safetensors"}),
}


def get_folder_paths(folder_name: str) -> list[str]:
    paths, _extensions = folder_names_and_paths[folder_name]
    return list(paths)  # a copy: callers may not change the registry


def get_output_directory() -> str:
    return os.path.join(base_path, "output")
