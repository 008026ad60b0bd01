"""``rpo-diffusers demo``: RPO end to end on the bundled default, on a CPU, with no download.

Until the bundled toy world ships trained models, the demo builds a tiny randomly initialised Stable
Diffusion and scorer from configs (cached in the output folder) and renders a subject procedurally: it
shows every phase of the method running, not image quality.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASS = "ball"
DEMO_IDENTIFIER = "sks"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="rpo-output", help="where the demo writes everything")
    parser.add_argument("--max_train_steps", type=int, default=60)
    parser.add_argument("--validation_steps", type=int, default=15)
    parser.add_argument(
        "--use_lora", action="store_true", help="train LoRA adapters instead of the full UNet"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def render_subject(num_images: int = 4, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """A two-colour ball (red top, blue bottom) on one grey backdrop, in varying positions and sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        im = Image.new("RGB", (size, size), (150, 150, 150))
        draw = ImageDraw.Draw(im)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.pieslice(box, 180, 360, fill=(220, 40, 40))
        draw.pieslice(box, 0, 180, fill=(40, 60, 220))
        images.append(im)
    return images


def _build_models(cache: Path) -> tuple[Path, Path]:
    from .testing.tiny_pipeline import build_tiny_pipeline
    from .testing.tiny_scorers import build_tiny_scorer

    sd, scorer = cache / "tiny-sd", cache / "tiny-scorer"
    if not (sd / "model_index.json").exists():
        build_tiny_pipeline(sd)
    if not (scorer / "config.json").exists():
        build_tiny_scorer(scorer, "clip")
    return sd, scorer


def run_demo(args: argparse.Namespace) -> int:
    from .config import RPOConfig
    from .trainer import RPOTrainer

    out = Path(args.output_dir)
    t0 = time.perf_counter()
    sd, scorer = _build_models(out / "_models")
    refs_dir = out / "references"
    refs_dir.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(render_subject(seed=args.seed)):
        im.save(refs_dir / f"{i:02d}.png")
    config = RPOConfig(
        pretrained_model_name_or_path=str(sd),
        scorer_model_name_or_path=str(scorer),
        instance_data_dir=str(refs_dir),
        class_noun=DEMO_CLASS,
        identifier=DEMO_IDENTIFIER,
        output_dir=str(out / "model"),
        resolution=32,
        num_inference_steps=4,
        guidance_scale=3.0,
        images_per_prompt=2,
        num_validation_images=2,
        max_train_steps=args.max_train_steps,
        validation_steps=args.validation_steps,
        use_lora=args.use_lora,
        learning_rate=1e-3 if args.use_lora else 1e-4,
        seed=args.seed,
        report_to="tensorboard",
    )
    print(
        f"RPO demo: subject 'a {DEMO_IDENTIFIER} {DEMO_CLASS}', {len(config.train_prompts)} training prompts, "
        f"{config.max_train_steps} steps, validation every {config.validation_steps} (λ_val={config.lambda_val})"
    )
    print(
        "models: tiny randomly initialised Stable Diffusion and CLIP scorer built from configs (no download)"
    )
    result = RPOTrainer(config).train()
    print("\nvalidation reward per interval:")
    for h in result.history:
        mark = "  <- chosen" if h["step"] == result.best_step else ""
        print(
            f"  step {h['step']:4d}  reward {h['reward']:.4f}  ALIGN-I {h['align_i']:.4f}  ALIGN-T {h['align_t']:.4f}{mark}"
        )
    print(f"chosen step: {result.best_step} (reward {result.best_reward:.4f})")
    summary = {
        "best_step": result.best_step,
        "best_reward": result.best_reward if math.isfinite(result.best_reward) else None,
        "timings_s": result.timings,
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
    print(
        f"wrote {out / 'model'} (model, before_after.png, reward_plot.png, rpo_history.json) and {out / 'demo_metrics.json'}"
    )
    return 0
