#!/usr/bin/env python
"""Seconds per RPO training step, peak memory and per-phase wall time, full UNet vs LoRA.

    python training_examples/benchmark_trainer.py                                   # tiny pipeline, CPU
    python training_examples/benchmark_trainer.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --scorer kakaobrain/align-base --resolution 512 --steps 20 --mixed_precision fp16   # on a GPU

Each mode runs in its own process so peak memory (CUDA: max allocated; CPU: max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from rpo_diffusers import RPOConfig, RPOTrainer

    refs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8))
            for i in range(4)]  # fmt: skip
    config = RPOConfig(
        pretrained_model_name_or_path=args.model, scorer_model_name_or_path=args.scorer, class_noun="dog",
        output_dir=args.output_dir, resolution=args.resolution, num_inference_steps=args.sampling_steps,
        images_per_prompt=args.images_per_prompt, num_validation_images=1, max_train_steps=args.steps,
        validation_steps=args.steps, use_lora=args.mode == "lora", mixed_precision=args.mixed_precision,
        report_to="none",
    )  # fmt: skip
    steps = []
    trainer = RPOTrainer(
        config,
        reference_images=refs,
        callbacks=[lambda e, p: steps.append(time.perf_counter()) if e == "step" else None],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    per_step = float(np.median(np.diff(steps))) if len(steps) > 2 else float("nan")
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": args.mode,
        "s_per_step": per_step,
        "peak_mib": peak,
        **{f"{k}_s": v for k, v in result.timings.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="SD pipeline; default: a tiny one built from configs")
    parser.add_argument(
        "--scorer", default=None, help="dual encoder; default: a tiny CLIP built from configs"
    )
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampling_steps", type=int, default=10)
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--mode", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # child process
        print("RESULT " + json.dumps(run_one(args)))
        return
    root = Path(tempfile.mkdtemp())
    if args.model is None:
        from rpo_diffusers.testing.tiny_pipeline import build_tiny_pipeline

        args.model = str(root / "sd")
        build_tiny_pipeline(args.model)
    if args.scorer is None:
        from rpo_diffusers.testing.tiny_scorers import build_tiny_scorer

        args.scorer = str(build_tiny_scorer(root / "scorer", "clip"))
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--mode", mode, "--output_dir", str(root / mode)]
        for k in (
            "model",
            "scorer",
            "resolution",
            "steps",
            "sampling_steps",
            "images_per_prompt",
            "mixed_precision",
        ):
            cmd += [f"--{k}", str(getattr(args, k))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    cols = ["mode", "s_per_step", "peak_mib", "generation_s", "training_s", "validation_s", "export_s"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>13.4f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols))


if __name__ == "__main__":
    main()
