"""Messages a user would read on every load that say nothing about their run, filtered at the source.

transformers 5 made the classic processor names (``CLIPImageProcessor``, ``SiglipImageProcessor``) point
at a torchvision backend; without torchvision it falls back to the PIL class (the one transformers 4
always used, and the one our models were built and measured with) and says so at every import of
diffusers' Stable Diffusion pipeline: "requires torchvision (not installed); falling back to ...". The
project does not need torchvision, so that one message, and only it, is dropped; every other
transformers warning still shows.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
_LOGGER = "transformers.utils.import_utils"  # where transformers logs the fallback (a standard logger)


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def silence_processor_fallback() -> None:
    """Install the filter once (stdlib logging only: importing this costs nothing)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
