#!/usr/bin/env python
"""Throughput of LambdaHarmonicScorer.score() against the bare dual-encoder forward on the same inputs.

    python training_examples/benchmark_scorer.py                      # tiny ALIGN/CLIP/SigLIP built from configs
    python training_examples/benchmark_scorer.py --model kakaobrain/align-base --device cuda --num_images 256

The bare forward runs the processor + get_image_features + get_text_features for every image (what a
naive reward function does); score() additionally computes ALIGN-I against cached reference features and
caches the prompt's text features, so its overhead should be small (or negative).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rpo_diffusers.rewards import LambdaHarmonicScorer, model_output_features


def _images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench(scorer: LambdaHarmonicScorer, images, refs, prompt: str, repeats: int) -> tuple[float, float]:
    scorer.set_reference_images(refs)
    proc, model, dev, dtype = scorer.processor, scorer.model, scorer.device, scorer.dtype

    @torch.inference_mode()
    def bare():
        for i in range(0, len(images), scorer.batch_size):
            batch = images[i : i + scorer.batch_size]
            px = proc.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(dev, dtype)
            model_output_features(model.get_image_features(pixel_values=px))
            tok = proc.tokenizer(
                [prompt] * len(batch), padding=scorer._text_padding, truncation=True, return_tensors="pt"
            )
            tok = {
                k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            model_output_features(model.get_text_features(**tok))

    t_bare = _timeit(bare, repeats)
    t_score = _timeit(lambda: scorer.score(images, prompt), repeats)
    return len(images) / t_bare, len(images) / t_score


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="*", default=None, help="hub ids or folders; default: tiny models")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    models = args.model
    if not models:
        from rpo_diffusers.testing.tiny_scorers import FAMILIES, build_tiny_scorer

        root = Path(tempfile.mkdtemp())
        models = [str(build_tiny_scorer(root / f, f)) for f in FAMILIES]
    images, refs = _images(args.num_images, args.image_size, 0), _images(4, args.image_size, 1)
    print(f"{'model':<40} {'bare img/s':>12} {'score() img/s':>14} {'overhead':>9}")
    for name in models:
        scorer = LambdaHarmonicScorer.from_pretrained(name, device=args.device, batch_size=args.batch_size)
        bare, score = bench(scorer, images, refs, "a sks dog on the Moon", args.repeats)
        label = type(scorer.model).__name__ + " " + Path(name).name
        print(f"{label[:40]:<40} {bare:12.1f} {score:14.1f} {100 * (bare / score - 1):8.1f}%")


if __name__ == "__main__":
    main()
