#!/usr/bin/env python
"""Seconds per training step, peak memory and per-phase wall time, full UNet vs LoRA, for any method.

    python training_examples/benchmark_trainer.py --method dpg --dpg_reward dino    # DPG's cost beside RPO's
    python training_examples/benchmark_trainer.py --method dreambooth --with_prior_preservation --modes lora

    python training_examples/benchmark_trainer.py                                   # tiny pipeline, CPU
    python training_examples/benchmark_trainer.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --scorer kakaobrain/align-base --resolution 512 --steps 20 --mixed_precision fp16   # on a GPU
    python training_examples/benchmark_trainer.py --sd15_shaped --clip_b16 --resolution 512 \\
        --mixed_precision fp16 --steps 20 --images_per_prompt 2 --sampling_steps 20   # real size, random weights

Each mode runs in its own process so its peak memory is its own (CUDA: max allocated during train();
CPU: the process's max RSS, which includes Python, torch and the loaded models); train_add_mib = that peak
minus the memory in use just before train() (what training adds: activations, optimiser state, the
frozen reference copy of a full fine-tune, generated images); the models are moved to the device before
that baseline is read, so on CUDA it excludes the weights. s/step is the median gap
between consecutive optimiser steps, so the validation at the end does not count. Phases: setup = loading
the pipeline and scorer; generation = the base model's training images and their rewards (class_images: prior preservation's); training =
optimiser steps; validation = every validation including step 0; export = saving the best model.
gen_img_s = generated training images / generation seconds (sampling with CFG, VAE decode, PNG save).
--sd15_shaped and --clip_b16 build random-weight models with Stable Diffusion 1.5's and CLIP ViT-B/16's exact
shapes (no download): speed and memory do not depend on the weights' values.
On a shared CPU, pin --num_threads (default 1) or the numbers measure thread contention, not the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHASES = ("setup", "generation", "class_images", "training", "validation", "export")
COLUMNS = ("mode", "s_per_step", "cpu_s_per_step", "peak_mib", "train_add_mib", "gen_img_s", *(f"{p}_s" for p in PHASES))


def _rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _current_rss_mib() -> float:
    """Resident memory now (Linux /proc); NaN elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(args: argparse.Namespace) -> dict:
    """Train once in this process and return its measurements."""
    import torch

    from rpo_diffusers import RPOConfig, RPOTrainer

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    refs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8))
            for i in range(4)]  # fmt: skip
    config = RPOConfig(
        pretrained_model_name_or_path=args.model, scorer_model_name_or_path=args.scorer, class_noun="dog",
        output_dir=args.output_dir, resolution=args.resolution, num_inference_steps=args.sampling_steps,
        validation_num_inference_steps=args.sampling_steps,
        images_per_prompt=args.images_per_prompt, num_validation_images=1, max_train_steps=args.steps,
        validation_steps=args.steps, use_lora=args.mode == "lora", mixed_precision=args.mixed_precision,
        generation_batch_size=args.generation_batch_size, gradient_checkpointing=args.gradient_checkpointing,
        report_to="none", method=args.method, dpg_reward=args.dpg_reward, dpg_critic=args.dpg_critic,
        dpg_reward_model=args.dpg_reward_model, with_prior_preservation=args.with_prior_preservation,
        num_class_images=args.num_class_images,
    )  # fmt: skip
    step_times: list[float] = []
    step_cpu: list[float] = []  # this process's CPU seconds: a busy machine moves them far less than wall time

    def on_event(event: str, payload: dict) -> None:
        if event == "step":
            step_times.append(time.perf_counter())
            step_cpu.append(time.process_time())

    t0 = time.perf_counter()
    trainer = RPOTrainer(config, reference_images=refs, callbacks=[on_event])
    setup_s = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    trainer.components.to(trainer.accelerator.device)  # train() does this too: the baseline holds the weights
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_train = torch.cuda.memory_allocated() / 2**20
    else:
        before_train = _current_rss_mib()
    with _autocast_context(args, cuda):
        result = trainer.train()
    gaps = np.diff(step_times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    generated = len(config.train_prompts) * config.images_per_prompt
    return {
        "mode": args.mode,
        "s_per_step": float(np.median(gaps)) if len(gaps) else float("nan"),
        "cpu_s_per_step": float(np.median(np.diff(step_cpu))) if len(step_cpu) > 1 else float("nan"),
        "peak_mib": peak,
        "train_add_mib": peak - before_train,
        "before_train_mib": before_train,
        "gen_img_s": generated / result.timings["generation"]
        if result.timings.get("generation")
        else float("nan"),
        "generated_images": generated,
        "memory": "cuda max allocated" if cuda else "process max RSS",
        "device": str(trainer.accelerator.device),
        "trainable_params": sum(p.numel() for p in trainer.components.trainable_parameters()),
        "setup_s": setup_s,
        **{f"{k}_s": v for k, v in result.timings.items()},
    }


def _autocast_context(args: argparse.Namespace, cuda: bool):
    """--autocast: the whole of train() under torch.autocast, a stand-in for dtype fixes the trainer lacks
    (fp32 modules fed fp16/bf16 tensors); numbers taken with it say so in their header."""
    if not (args.autocast and cuda and args.mixed_precision in ("fp16", "bf16")):
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cuda", dtype=torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)


def _project_frames(stderr: str) -> str:
    """The traceback lines inside this project (rpo_diffusers/, this script) and the error itself."""
    lines = stderr.splitlines()
    keep = [
        f"{ln.strip()} | {lines[i + 1].strip() if i + 1 < len(lines) else ''}"
        for i, ln in enumerate(lines)
        if ln.strip().startswith('File "') and ("rpo_diffusers/" in ln or "benchmark_trainer" in ln)
    ]
    return "\n".join(keep + [_error_line(lines)])


def _error_line(lines: list[str]) -> str:
    """The exception line of a traceback (the last line may be a progress bar's)."""
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return errors[-1] if errors else next((ln for ln in reversed(lines) if ln.strip()), "unknown error")


def _child_command(args: argparse.Namespace, mode: str, output_dir: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--mode", mode, "--output_dir", str(output_dir)]
    for k in ("model", "scorer", "resolution", "steps", "sampling_steps", "images_per_prompt", "mixed_precision",
              "num_threads", "generation_batch_size", "method", "dpg_reward", "dpg_critic",
              "dpg_reward_model", "num_class_images"):  # fmt: skip
        cmd += [f"--{k}", str(getattr(args, k))]
    flags = ("gradient_checkpointing", "autocast", "with_prior_preservation")
    return cmd + [f"--{f}" for f in flags if getattr(args, f)]


def run_mode(args: argparse.Namespace, mode: str, output_dir: Path) -> dict:
    """Run one mode in a fresh process (so peak memory is its own) and parse its RESULT line.

    A failed mode (an out-of-memory error, a dtype error) becomes a row with NaNs and its error, so the other
    mode is still measured."""
    env = dict(os.environ)
    if args.num_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.num_threads)
    proc = subprocess.run(_child_command(args, mode, output_dir), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"The {mode} benchmark run failed (exit {proc.returncode}):\n{_project_frames(proc.stderr)}")
        error = _error_line(proc.stderr.splitlines())
        return {"mode": mode, **{c: float("nan") for c in COLUMNS[1:]}, "error": error}
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def build_models(args: argparse.Namespace, root: Path) -> None:
    """Fill in --model/--scorer with models built from configs (reused from --workdir when already there)."""
    if args.model is None:
        name = "sdxl-shaped" if args.sdxl_shaped else f"sd15-{args.sd15_dtype}" if args.sd15_shaped else "sd"
        args.model = str(root / ("tiny-sdxl" if args.tiny_sdxl else name))
        if not (Path(args.model) / "model_index.json").exists():
            import torch

            from rpo_diffusers.testing.tiny_pipeline import (
                build_sd15_shaped_pipeline,
                build_sdxl_shaped_pipeline,
                build_tiny_pipeline,
                build_tiny_sdxl_pipeline,
            )

            if args.sdxl_shaped:
                build_sdxl_shaped_pipeline(args.model)
            elif args.sd15_shaped:  # fp32 on disk by default, like the real SD1.5 repository's main branch
                dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.sd15_dtype]
                build_sd15_shaped_pipeline(args.model, dtype=dtype)
            elif args.tiny_sdxl:
                build_tiny_sdxl_pipeline(args.model)
            else:
                build_tiny_pipeline(args.model)
    if args.scorer is None:
        args.scorer = str(root / ("clip-b16" if args.clip_b16 else "scorer"))
        if not (Path(args.scorer) / "config.json").exists():
            if args.clip_b16:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from benchmark_scorer import build_random_clip_b16

                build_random_clip_b16(Path(args.scorer))
            else:
                from rpo_diffusers.testing.tiny_scorers import build_tiny_scorer

                build_tiny_scorer(args.scorer, "clip")
    if args.dpg_reward_model is None:  # DPG's DINO reward: a tiny ViT, never downloaded
        args.dpg_reward_model = str(root / "vit")
        if not (Path(args.dpg_reward_model) / "config.json").exists():
            from rpo_diffusers.testing.tiny_scorers import build_tiny_vit

            build_tiny_vit(args.dpg_reward_model, image_size=args.resolution)


def environment_line() -> str:
    """Accelerator and library versions, so a table can be compared with another machine's."""
    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"gpu={gpu} torch={torch.__version__} cuda={torch.version.cuda} diffusers={diffusers.__version__} "
            f"transformers={transformers.__version__}")  # fmt: skip


def format_table(rows: list[dict]) -> str:
    lines = [" ".join(f"{c:>13}" for c in COLUMNS)]
    for r in rows:
        lines.append(
            " ".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in COLUMNS)
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings (benchmark_protocol.py builds its per-step runs from these too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="SD pipeline; default: a tiny one built from configs")
    parser.add_argument(
        "--scorer", default=None, help="dual encoder; default: a tiny CLIP built from configs"
    )
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per mode")
    parser.add_argument(
        "--sampling_steps", type=int, default=10, help="sampling steps of generation/validation"
    )
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--generation_batch_size", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="run train() under torch.autocast (a workaround, see the docs)",
    )
    parser.add_argument(
        "--sd15_dtype", choices=["fp32", "fp16"], default="fp32", help="dtype saved by --sd15_shaped"
    )
    parser.add_argument(
        "--sd15_shaped",
        action="store_true",
        help="without --model: a random SD1.5-shaped pipeline (~860M UNet)",
    )
    parser.add_argument(
        "--sdxl_shaped", action="store_true", help="without --model: a random SDXL-base-shaped pipeline (fp16)"
    )
    parser.add_argument(
        "--tiny_sdxl", action="store_true", help="without --model: the tiny SDXL pipeline the tests use"
    )
    parser.add_argument(
        "--clip_b16", action="store_true", help="without --scorer: a random CLIP with ViT-B/16 shapes"
    )
    parser.add_argument(
        "--workdir", default=None, help="where built models go (reused if there); default: a temp dir"
    )
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--method", default="rpo", choices=("rpo", "dreambooth", "dpg"))
    parser.add_argument("--dpg_reward", default="latent", choices=("latent", "dino", "lambda_harmonic"))
    parser.add_argument("--dpg_critic", default="residual", choices=("residual", "latent", "none"))
    parser.add_argument("--dpg_reward_model", default=None, help="ViT of the DINO reward; default: a tiny one")
    parser.add_argument(
        "--with_prior_preservation", action="store_true", help="DreamBooth's prior loss (class images, 2 rows)"
    )
    parser.add_argument("--num_class_images", type=int, default=8, help="class images with the prior loss")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--mode", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode:  # child process
        print("RESULT " + json.dumps(run_one(args)))
        return
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rpo-bench-"))
    t0 = time.perf_counter()
    build_models(args, root)
    build_s = time.perf_counter() - t0
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=root))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [run_mode(args, mode, runs / mode) for mode in args.modes]
    first = next((r for r in rows if "error" not in r), rows[0])
    print(f"method={args.method} with_prior_preservation={args.with_prior_preservation} dpg_reward={args.dpg_reward} dpg_critic={args.dpg_critic} model={args.model} resolution={args.resolution} steps={args.steps} sampling_steps={args.sampling_steps} "
          f"images_per_prompt={args.images_per_prompt} generation_batch_size={args.generation_batch_size} "
          f"mixed_precision={args.mixed_precision} gradient_checkpointing={args.gradient_checkpointing} "
          f"autocast_workaround={args.autocast} "
          f"model_build_s={build_s:.1f}")  # fmt: skip
    print(environment_line())
    print(f"device={first.get('device')} threads={args.num_threads or 'default'} cpus={os.cpu_count()} "
          f"load_avg_at_start={load:.2f} python={platform.python_version()} memory={first.get('memory')}")  # fmt: skip
    print("trainable params: " + ", ".join(f"{r['mode']}={r.get('trainable_params', 0):,}" for r in rows))
    print(
        "weights on device before train() (MiB): "
        + ", ".join(f"{r['mode']}={r.get('before_train_mib', float('nan')):.0f}" for r in rows)
    )
    print(format_table(rows))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']} FAILED: {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
