#!/usr/bin/env python
"""The whole protocol, side by side with diffusers' DreamBooth LoRA script: wall time, phases, peak memory, ratios.

    python training_examples/benchmark_protocol.py --quick                          # smoke test, about a minute
    python training_examples/benchmark_protocol.py --repeats 3 \\
        --peer_script ~/diffusers/examples/dreambooth/train_dreambooth_lora.py      # bundled toy SD, 32 px, CPU
    python training_examples/benchmark_protocol.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --scorer kakaobrain/align-base --instance_data_dir dog --class_noun dog --resolution 512 \\
        --mixed_precision fp16 --peer_script ~/diffusers/examples/dreambooth/train_dreambooth_lora.py  # a GPU

Runs, each in a process of its own and all repeated ``--repeats`` times in turn (A B C A B C ..., so a drift
of the machine's speed hits every run alike); the project's runs are the paper's protocol with LoRA:
  rpo         RPOConfig's defaults: 8 prompts x 4 base-model images at 50 sampling steps with CFG 7.5, 400
              steps, a validation every 40 steps of 8 prompts x 4 images at 20 DPM-Solver++ steps
              (FAST_VALIDATION), the best step exported
  rpo_paper   the same with the paper's validation (PAPER_VALIDATION: 50 DDIM steps); benchmark_selection.py
              measures that both pick the same step
  rpo_before  rpo on --baseline_checkout's rpo_diffusers (another checkout: the numbers before a change)
  rpo_fast    rpo with every validation image in one batch and the training images drawn 32 at a time (the
              same images, more memory per call)
  peer_prior  --peer_script, 1000 steps with prior preservation on 200 class images (its README's recipe)
  peer        --peer_script, 400 steps without prior preservation
The peer gets the same model, photos, resolution, seed, precision and LoRA learning rate; its class images are
drawn afresh in every run (the project's runs draw their training images afresh too).

Printed: wall (the process from start to exit: imports, loading, everything), cpu (the process's user + system
seconds, which a busy machine disturbs far less than wall time), the phases (project: set-up,
generation, class images, training, validation, export, from the trainer's timings; both: the time before the
first optimiser step, from the first to the last, and after it), s/step (the median gap between optimiser steps,
so validations do not count), peak memory (CUDA: max allocated; CPU: the process's max RSS) and the ratios
project / peer, taken repeat by repeat and then the median. Then per optimiser step at batch 1, RPO against
DreamBooth with prior preservation on the same loop (benchmark_trainer.py's runs, interleaved too).
On a shared CPU pin --num_threads (default 1), or the numbers measure thread contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rpo_diffusers.config import FAST_VALIDATION, PAPER_VALIDATION

HERE = Path(__file__).resolve().parent
RATIO_KEYS = ("wall_s", "cpu_s", "s_per_step", "peak_mib")
PROJECT_PHASES = ("setup", "generation", "class_images", "training", "validation", "export")
SPAN_PHASES = ("before_first_step", "steps", "after_last_step")


# ------------------------------------------------------------------------------------------------
# measurements inside a child process
# ------------------------------------------------------------------------------------------------
class StepClock:
    """Times of the optimiser steps of the first optimiser that steps (the model's; DPG's critic is not
    counted), through torch's global step hook, so the project's loop and the peer script are timed alike."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self._owner: int | None = None
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if self._owner is None:
            self._owner = id(optimizer)
        if id(optimizer) == self._owner:
            self.times.append(time.perf_counter())

    def summary(self, start: float, end: float) -> dict[str, float]:
        """s/step and the spans before, between and after the steps (seconds since ``start``)."""
        t = self.times
        if not t:
            return {
                "s_per_step": float("nan"),
                "steps_done": 0,
                **{f"{k}_s": float("nan") for k in SPAN_PHASES},
            }
        return {
            "s_per_step": float(np.median(np.diff(t))) if len(t) > 1 else float("nan"),
            "steps_done": len(t),
            "before_first_step_s": t[0] - start,
            "steps_s": t[-1] - t[0],
            "after_last_step_s": end - t[-1],
        }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process: on a shared machine it moves far less than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory_mib() -> tuple[float, str]:
    """CUDA max allocated when a GPU ran, else this process's max RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "process max RSS"


def child_project(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """One project run with ``settings`` (RPOConfig fields) in this process."""
    start = time.perf_counter()
    import torch

    from rpo_diffusers import RPOConfig, RPOTrainer

    if threads:
        torch.set_num_threads(threads)
    clock = StepClock()
    t0 = time.perf_counter()
    trainer = RPOTrainer(RPOConfig(**settings))
    setup = time.perf_counter() - t0
    result = trainer.train()
    end = time.perf_counter()
    peak, kind = peak_memory_mib()
    phases = {f"{k}_s": result.timings.get(k, 0.0) for k in PROJECT_PHASES if k != "setup"}
    return {
        **clock.summary(start, end), **phases, "setup_s": setup, "peak_mib": peak, "memory": kind, "cpu_s": cpu_seconds(),
        "best_step": result.best_step, "device": str(trainer.accelerator.device),
    }  # fmt: skip


def child_peer(script: str, peer_args: list[str], threads: int, extra_path: str | None) -> dict[str, Any]:
    """The peer script in this process (``runpy``), timed by the same step hook as the project's runs.

    ``extra_path`` goes on ``sys.path`` only after transformers, peft and diffusers have imported, so their
    checks of what is installed see the real environment and only the script's own imports see the folder
    (e.g. a stand-in for a torchvision that has no wheel for this machine).
    """
    start = time.perf_counter()
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    if extra_path:
        sys.path.insert(0, extra_path)
    clock = StepClock()
    sys.argv = [script, *peer_args]
    runpy.run_path(script, run_name="__main__")
    end = time.perf_counter()
    peak, kind = peak_memory_mib()
    return {**clock.summary(start, end), "peak_mib": peak, "memory": kind, "cpu_s": cpu_seconds()}


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------
def project_settings(args: argparse.Namespace, run_dir: Path, variant: str = "rpo") -> dict[str, Any]:
    """RPOConfig's defaults (the paper's protocol, the fast validation) with LoRA on this benchmark's model and
    photos; ``variant`` rpo_paper: the paper's validation, rpo_fast: everything sampled 32 images at a time."""
    settings: dict[str, Any] = {
        "pretrained_model_name_or_path": args.model, "scorer_model_name_or_path": args.scorer,
        "instance_data_dir": args.instance_data_dir, "class_noun": args.class_noun, "resolution": args.resolution,
        "use_lora": True, "learning_rate": args.learning_rate, "mixed_precision": args.mixed_precision,
        "output_dir": str(run_dir), "seed": args.seed,
    }  # fmt: skip
    if args.train_prompts:
        settings["train_prompts"] = args.train_prompts
    if args.quick:
        settings.update(max_train_steps=4, validation_steps=2, images_per_prompt=1, num_validation_images=1,
                        num_inference_steps=2, train_prompts=(args.train_prompts or [])[:2] or None)  # fmt: skip
    if variant == "rpo_paper":
        settings.update(PAPER_VALIDATION)
    if variant == "rpo_fast":  # every validation image in one call, the training images 32 at a time
        settings.update(validation_batch_size=32, generation_batch_size=32)
    if args.quick:
        settings["validation_num_inference_steps"] = 2 if variant == "rpo_paper" else 1
    return {k: v for k, v in settings.items() if v is not None}


def peer_arguments(args: argparse.Namespace, run_dir: Path, prior: bool) -> list[str]:
    """The peer's README recipe on the same model, photos, resolution, seed and precision."""
    steps = (6 if prior else 4) if args.quick else (args.peer_prior_steps if prior else args.peer_steps)
    out = [
        "--pretrained_model_name_or_path", args.model, "--instance_data_dir", args.instance_data_dir,
        "--output_dir", str(run_dir), "--instance_prompt", f"a photo of {args.identifier} {args.class_noun}",
        "--resolution", str(args.resolution), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
    ]  # fmt: skip
    if prior:
        out += ["--with_prior_preservation", "--prior_loss_weight", "1.0",
                "--class_prompt", f"a photo of {args.class_noun}", "--class_data_dir", str(run_dir / "class_images"),
                "--num_class_images", str(2 if args.quick else args.num_class_images)]  # fmt: skip
    return out


def variants(args: argparse.Namespace) -> list[str]:
    names = ["rpo", "rpo_paper", "rpo_fast", *(["rpo_before"] if args.baseline_checkout else [])]
    if args.peer_script:
        names += ["peer_prior", "peer"]
    return [n for n in names if not args.only or n in args.only]


def child_command(args: argparse.Namespace, variant: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--_child", variant, "--_run_dir", str(run_dir)]
    if variant.startswith("rpo"):
        payload = project_settings(args, run_dir, variant)  # rpo_before: rpo's
    else:
        payload = {"script": args.peer_script, "args": peer_arguments(args, run_dir, prior=variant == "peer_prior"),
                   "extra_path": args.peer_pythonpath}  # fmt: skip
    return [*cmd, "--_payload", json.dumps(payload), "--num_threads", str(args.num_threads)]


def run_child(args: argparse.Namespace, variant: str, run_dir: Path) -> dict[str, Any]:
    """One run in a fresh process; its log goes to ``run_dir``.log. A failed run is a row with its error."""
    if run_dir.exists():  # a rerun in the same --workdir: a fresh run, not one that reuses its images
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.num_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.num_threads)
    if variant == "rpo_before":  # the same run on another checkout's rpo_diffusers
        env["PYTHONPATH"] = os.pathsep.join([args.baseline_checkout, env.get("PYTHONPATH", "")])
    log = run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            child_command(args, variant, run_dir), stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - t0
    lines = log.read_text(errors="replace").splitlines()
    found = [ln for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        tail = " | ".join(ln.strip() for ln in lines[-3:])
        return {"variant": variant, "wall_s": wall, "error": f"exit {proc.returncode}: {tail} (log: {log})"}
    return {"variant": variant, "wall_s": wall, **json.loads(found[-1][len("RESULT ") :])}


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(np.median(values)) if values else float("nan")


def paired_ratio(runs: list[list[dict[str, Any]]], a: str, b: str, key: str) -> float:
    """Median over repeats of a's ``key`` / b's in the same repeat (pairs keep the ratio honest under drift)."""
    ratios = []
    for rep in runs:
        ra = next((r for r in rep if r["variant"] == a and "error" not in r), None)
        rb = next((r for r in rep if r["variant"] == b and "error" not in r), None)
        if ra and rb and rb.get(key):
            ratios.append(ra[key] / rb[key])
    return float(np.median(ratios)) if ratios else float("nan")


def format_runs(runs: list[list[dict[str, Any]]], names: list[str]) -> str:
    cols = ["wall_s", "cpu_s", *(f"{p}_s" for p in SPAN_PHASES), *(f"{p}_s" for p in PROJECT_PHASES), "s_per_step",
            "peak_mib", "best_step"]  # fmt: skip
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        rows = [r for rep in runs for r in rep if r["variant"] == name and "error" not in r]
        cells = []
        for c in cols:
            v = median(rows, c)
            cells.append("–" if v != v else (f"{v:.0f}" if c in ("peak_mib", "best_step") else f"{v:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratios(runs: list[list[dict[str, Any]]], names: list[str]) -> str:
    lines = ["| project / peer | wall | cpu | s/step | peak memory |", "|---|---|---|---|---|"]
    for a in (n for n in names if n.startswith("rpo")):
        for b in (n for n in names if n.startswith("peer")):
            cells = [paired_ratio(runs, a, b, k) for k in RATIO_KEYS]
            lines.append(f"| {a} / {b} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    for a, b in (("rpo", "rpo_paper"), ("rpo_fast", "rpo"), ("rpo", "rpo_before"), ("rpo_fast", "rpo_before")):
        if a in names and b in names:
            cells = [paired_ratio(runs, a, b, k) for k in RATIO_KEYS]
            lines.append(f"| {a} / {b} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def per_step(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """RPO and DreamBooth + prior preservation per optimiser step, LoRA, batch 1, on the project's loop:
    benchmark_trainer.py's runs (short, validation at the end only), interleaved ``--repeats`` times."""
    sys.path.insert(0, str(HERE))
    import benchmark_trainer as bt

    common = ["--model", args.model, "--scorer", args.scorer, "--resolution", str(args.resolution),
              "--steps", str(6 if args.quick else args.step_steps), "--sampling_steps", "2",
              "--images_per_prompt", "1", "--num_class_images", "2", "--mixed_precision", args.mixed_precision,
              "--num_threads", str(args.num_threads), "--modes", "lora"]  # fmt: skip
    kinds = {
        "rpo": ["--method", "rpo"],
        "dreambooth_prior": ["--method", "dreambooth", "--with_prior_preservation"],
    }
    out = []
    for rep in range(1 if args.quick else args.repeats):
        for name, extra in kinds.items():
            ns = bt.parse_args(common + extra)
            bt.build_models(ns, root)
            row = bt.run_mode(ns, "lora", root / "steps" / f"{name}-{rep}")
            out.append({"variant": name, "repeat": rep, **row})
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peer_script", default=None, help="diffusers' examples/dreambooth/train_dreambooth_lora.py"
    )
    p.add_argument(
        "--peer_pythonpath", default=None,
        help="a folder for the peer's own imports only (added after transformers/diffusers load), e.g. a "
        "stand-in for torchvision where no wheel installs",
    )  # fmt: skip
    p.add_argument(
        "--baseline_checkout", default=None,
        help="another rpo-diffusers checkout (e.g. the last release): its rpo run, as rpo_before, for before/after",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="Stable Diffusion pipeline; default: the toy world's")
    p.add_argument("--scorer", default=None, help="λ-harmonic dual encoder; default: the toy world's")
    p.add_argument("--instance_data_dir", default=None, help="the subject's photos; default: a toy subject's")
    p.add_argument("--subject", default="whiteblack_ring", help="toy subject without --instance_data_dir")
    p.add_argument("--class_noun", default=None, help="the subject's class (default: the toy subject's)")
    p.add_argument("--identifier", default="sks")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (toy), else 512")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="LoRA learning rate of every run")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer_prior_steps", type=int, default=1000)
    p.add_argument("--peer_steps", type=int, default=400)
    p.add_argument("--num_class_images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every run")
    p.add_argument("--step_steps", type=int, default=60, help="optimiser steps of each per-step run")
    p.add_argument("--no_per_step", action="store_true", help="skip the per-step comparison")
    p.add_argument(
        "--only", nargs="*", default=None, help="run only these of rpo, rpo_paper, rpo_fast, peer_prior, peer"
    )
    p.add_argument(
        "--num_threads", type=int, default=1, help="torch CPU threads per run; 0 = torch's default"
    )
    p.add_argument("--workdir", default=None, help="where runs go; default: a temp dir")
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    p.add_argument("--quick", action="store_true", help="a few steps and images: a smoke test")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_run_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_payload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return args
    from rpo_diffusers.toy import DEFAULT_SCORER, asset_path, get_subject

    toy = args.model is None
    args.model = args.model or str(asset_path("sd"))
    args.scorer = args.scorer or str(asset_path(DEFAULT_SCORER))
    args.resolution = args.resolution or (32 if toy else 512)
    args.train_prompts = None
    if args.instance_data_dir is None:
        subject = get_subject(args.subject)
        args.class_noun = args.class_noun or subject.class_noun
        args.train_prompts = subject.training_prompts(args.identifier) if toy else None
    elif not args.class_noun:
        p.error("with --instance_data_dir, also give --class_noun")
    if args.quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        payload = json.loads(args._payload)
        if args._child.startswith("rpo"):
            result = child_project(payload, args.num_threads)
        else:
            result = child_peer(payload["script"], payload["args"], args.num_threads, payload["extra_path"])
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    from tqdm.auto import tqdm

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rpo-protocol-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.instance_data_dir is None:
        from rpo_diffusers.toy import get_subject

        args.instance_data_dir = str(
            get_subject(args.subject).write_references(root / "photos", args.resolution)
        )
    names = variants(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    runs: list[list[dict[str, Any]]] = []
    bar = tqdm(total=args.repeats * len(names), desc="protocol runs")
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # who goes first rotates
        runs.append([])
        for name in order:
            bar.set_postfix_str(f"repeat {rep + 1}: {name}")
            row = run_child(args, name, root / "runs" / f"{name}-{rep}")
            runs[-1].append({"repeat": rep, **row})
            bar.update(1)
    bar.close()
    steps = [] if args.no_per_step else per_step(args, root)
    import torch

    print(f"\nmodel={args.model} resolution={args.resolution} mixed_precision={args.mixed_precision} "
          f"repeats={args.repeats} threads={args.num_threads} cpus={os.cpu_count()} load_avg_at_start={load:.2f} "
          f"gpu={torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'} "
          f"python={platform.python_version()} torch={torch.__version__} quick={args.quick}")  # fmt: skip
    print(f"validation: rpo {FAST_VALIDATION} (RPOConfig's default), rpo_paper {PAPER_VALIDATION}")
    print("\nwhole runs (median over repeats; seconds, MiB):\n" + format_runs(runs, names))
    print("\nratios (repeat by repeat, median):\n" + format_ratios(runs, names))
    for rep in runs:
        for r in rep:
            if "error" in r:
                print(f"{r['variant']} (repeat {r['repeat'] + 1}) FAILED: {r['error']}")
    if steps:
        rpo = [r["s_per_step"] for r in steps if r["variant"] == "rpo"]
        db = [r["s_per_step"] for r in steps if r["variant"] == "dreambooth_prior"]
        ratio = float(np.median([a / b for a, b in zip(rpo, db)])) if rpo and db else float("nan")
        print(f"\nper optimiser step, LoRA, batch 1, project loop: RPO {np.median(rpo):.4f} s, DreamBooth + prior "
              f"{np.median(db):.4f} s, ratio {ratio:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": runs, "per_step": steps}, indent=2)
        )
    print(f"\nruns and logs in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
