"""Comparisons for tests: weights exactly, model outputs with a tolerance.

Two modules holding bit-identical weights can still produce outputs that differ in the last bits (CPU
kernels choose code paths by memory layout and alignment), so a round trip's real claim, that the weights
survived, is checked exactly on the tensors, and outputs only up to float noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def assert_same_weights(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """The same keys, and every tensor bit-identical (dtype and shape included)."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
    different = [
        k
        for k in expected
        if actual[k].dtype != expected[k].dtype
        or actual[k].shape != expected[k].shape
        or not torch.equal(actual[k].cpu(), expected[k].cpu())
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
