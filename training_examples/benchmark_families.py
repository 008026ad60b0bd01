#!/usr/bin/env python
"""One training step of each model family's denoiser, interleaved in one process: SD vs SDXL, full vs LoRA.

    python training_examples/benchmark_families.py                      # the tiny pipelines the tests use, CPU
    python training_examples/benchmark_families.py --sd path/to/sd15 --sdxl path/to/sdxl --resolution 1024

A step is what the loop does per micro-batch: noise, the denoiser's forward through the family's
conditioning (SDXL: pooled embedding and size ids), backward, AdamW. Rounds alternate between the families so
that a busy machine slows both alike; the median over rounds is reported, as wall seconds and as this process's
CPU seconds (what contention changes least). Peak memory is CUDA's max allocated per family on a GPU; on a CPU,
use benchmark_trainer.py (one process per run) for memory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def step_timer(components, resolution: int, batch: int, lora: bool):
    """A closure running one training step; returns (wall s, cpu s)."""
    if lora:
        components.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    denoiser = components.denoiser
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    device = components.device
    latent = resolution // components.pipeline.vae_scale_factor
    cond = components.encode_prompts(["a photo of sks dog"])
    cond = components.condition_on_sizes(cond, [(resolution, resolution)] * batch, resolution)
    sched = components.noise_scheduler
    x0 = torch.randn(batch, 4, latent, latent, device=device)

    def run() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        pred = denoiser(sched.add_noise(x0, noise, t), t, cond.to(device))
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", default=None, help="SD pipeline folder; default: the tiny one, built here")
    parser.add_argument(
        "--sdxl", default=None, help="SDXL pipeline folder; default: the tiny one, built here"
    )
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    from rpo_diffusers.families import load_components
    from rpo_diffusers.testing.tiny_pipeline import build_tiny_pipeline, build_tiny_sdxl_pipeline

    root = Path(tempfile.mkdtemp(prefix="families-"))
    paths = {"sd": args.sd, "sdxl": args.sdxl}
    if paths["sd"] is None:
        build_tiny_pipeline(root / "sd")
        paths["sd"] = str(root / "sd")
    if paths["sdxl"] is None:
        build_tiny_sdxl_pipeline(root / "sdxl")
        paths["sdxl"] = str(root / "sdxl")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for lora in (False, True):
        runs, peaks = {}, {}
        for family, path in paths.items():
            comp = load_components(path, resolution=args.resolution).to(device)
            runs[family] = step_timer(comp, args.resolution, args.batch, lora)
            runs[family]()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {f: [] for f in runs}
        for _ in range(args.rounds):
            for family, run in runs.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                samples = [run() for _ in range(args.steps)]
                times[family].append(
                    (sum(s[0] for s in samples) / args.steps, sum(s[1] for s in samples) / args.steps)
                )
                if device == "cuda":
                    peaks[family] = torch.cuda.max_memory_allocated() / 2**20
        for family, rows in times.items():
            wall = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            peak = f" peak_cuda_mib={peaks[family]:.0f}" if family in peaks else ""
            print(f"{family:>4} {'lora' if lora else 'full'}: s/step wall={wall:.4f} cpu={cpu:.4f}{peak}")


if __name__ == "__main__":
    main()
