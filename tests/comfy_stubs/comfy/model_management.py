"""Stand-in for ``comfy.model_management``."""

import torch

interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def throw_exception_if_processing_interrupted() -> None:
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device() -> torch.device:
    return torch.device("cpu")
