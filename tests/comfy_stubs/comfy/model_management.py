"""Stand-in for ``comfy.model_management``: only the two names the node pack calls.

Nothing interrupts a run here; Interrupt is tested against a real ComfyUI in tests/test_comfyui_server.py.
"""

import torch


def throw_exception_if_processing_interrupted() -> None:
    return None


def get_torch_device() -> torch.device:
    return torch.device("cpu")
