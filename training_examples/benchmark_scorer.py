#!/usr/bin/env python
"""Throughput of LambdaHarmonicScorer.score() against the bare dual-encoder forward on the same inputs.

    python training_examples/benchmark_scorer.py                      # tiny ALIGN/CLIP/SigLIP built from configs
    python training_examples/benchmark_scorer.py --model kakaobrain/align-base --device cuda --num_images 256
    python training_examples/benchmark_scorer.py --clip_b16 --num_images 16   # random weights, real CLIP-B/16 shapes

Columns (images per second, median over --repeats interleaved runs):
- bare: processor + get_image_features + get_text_features for every batch (what a naive reward does);
- score(): with references cached by set_reference_images and the prompt's text features cached;
- score(refs): the references passed on every call, so they are re-embedded each time.
On a shared CPU machine, ``--threads 1 --clock cpu`` measures the process's own CPU time, which other
processes' load disturbs far less than wall time. Before timing, the script checks that score() sees the
same image features as the bare forward, so the columns compare the same work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_diffusers.rewards import LambdaHarmonicScorer, model_output_features

PROMPT = "a sks dog on the Moon"


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def build_random_clip_b16(directory: Path) -> Path:
    """A randomly initialised CLIPModel shaped like ``openai/clip-vit-base-patch16`` (no download).

    Real-size towers give real-size timings; the tokenizer is the small test one (only its ids matter).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from rpo_diffusers.testing.tokenizers import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory / "_tokenizer"))
    vision = {"patch_size": 16, "image_size": 224}
    text = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(
        directory
    )
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(scorer: LambdaHarmonicScorer, images: list[Image.Image], prompt: str) -> torch.Tensor:
    """The dual encoder called directly, batch by batch, with no caching; returns normalised image features."""
    proc, model, device = scorer.processor, scorer.model, scorer.device
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), scorer.batch_size):
            batch = images[i : i + scorer.batch_size]
            px = proc.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            feats.append(
                model_output_features(model.get_image_features(pixel_values=px.to(device, scorer.dtype)))
            )
            # SigLIP is trained on max_length padding; the others pad to the longest prompt.
            padding = "max_length" if "siglip" in type(model).__name__.lower() else True
            tok = proc.tokenizer([prompt] * len(batch), padding=padding, truncation=True, return_tensors="pt")
            keys = ("input_ids", "attention_mask", "token_type_ids")
            model_output_features(
                model.get_text_features(**{k: v.to(device) for k, v in tok.items() if k in keys})
            )
    return F.normalize(torch.cat(feats).float(), dim=-1)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each function, run in turn so that load changes hit all of them alike.

    ``clock="cpu"`` counts this process's CPU seconds (all threads) instead of wall time.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    for fn in fns.values():  # warm-up (fills the text cache, allocator, lazy imports)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = now()
            fn()
            _sync(device)
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(scorer: LambdaHarmonicScorer, images, refs, repeats: int, clock: str = "wall") -> dict[str, float]:
    """Images per second of the bare forward, score() with cached references, and score(refs)."""
    scorer.set_reference_images(refs)
    gap = (bare_forward(scorer, images, PROMPT) - scorer.embed_images(images)).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"score() and the bare forward disagree on image features (max |diff| {gap:.2e}).")
    seconds = time_interleaved(
        {
            "bare": lambda: bare_forward(scorer, images, PROMPT),
            "score": lambda: scorer.score(images, PROMPT),
            "score_refs": lambda: scorer.score(images, PROMPT, reference_images=refs),
        },
        repeats,
        scorer.device,
        clock,
    )
    return {name: len(images) / s for name, s in seconds.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="*", default=None, help="hub ids or folders; default: tiny models")
    parser.add_argument(
        "--clip_b16", action="store_true", help="also time a random CLIP with ViT-B/16 shapes (no download)"
    )
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--num_references", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=256, help="side of the random input images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (CPU device only)"
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error(
            "--clock cpu measures CPU time and only makes sense with --device cpu; use --clock wall."
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = list(args.model or [])
    root = Path(tempfile.mkdtemp(prefix="bench-scorers-"))
    if not models and not args.clip_b16:
        from rpo_diffusers.testing.tiny_scorers import FAMILIES, build_tiny_scorer

        models = [str(build_tiny_scorer(root / family, family)) for family in FAMILIES]
    if args.clip_b16:
        models.append(str(build_random_clip_b16(root / "random-clip-b16")))
    images = random_images(args.num_images, args.image_size, seed=0)
    refs = random_images(args.num_references, args.image_size, seed=1)
    print(
        f"{args.num_images} images of {args.image_size}px, {args.num_references} references, batch "
        f"{args.batch_size}, {args.device} {args.dtype}, {torch.get_num_threads()} CPU threads, "
        f"{args.clock} clock, median of {args.repeats}"
    )
    print(f"{'model':<28} {'bare img/s':>11} {'score() img/s':>14} {'score(refs) img/s':>18} {'speed-up':>9}")
    for name in models:
        scorer = LambdaHarmonicScorer.from_pretrained(
            name, device=args.device, dtype=getattr(torch, args.dtype), batch_size=args.batch_size
        )
        ips = bench(scorer, images, refs, args.repeats, args.clock)
        label = f"{type(scorer.model).__name__} {Path(name).name}"
        print(
            f"{label[:28]:<28} {ips['bare']:11.1f} {ips['score']:14.1f} {ips['score_refs']:18.1f} "
            f"{ips['score'] / ips['bare']:8.2f}x"
        )


if __name__ == "__main__":
    main()
