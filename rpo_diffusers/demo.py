"""``rpo-diffusers demo``: RPO end to end on the bundled toy world, on a CPU, with no download.

The subject is a toy-world object whose two-colour look the bundled Stable Diffusion has never seen; its
5 references share one grey studio. RPO trains on 8 prompts, picks the step by the validation reward, and
the demo then measures the base model and the chosen model on the subject's held-out prompts: DINO,
CLIP-I, CLIP-T, the λ-harmonic reward and the ground truth (does the image show the subject? the
prompt's context?).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEMO_SUBJECT = "whiteblack_ring"
EVAL_IMAGES_PER_PROMPT = 4


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .toy import list_subjects

    parser.add_argument("--output_dir", default="rpo-output", help="where the demo writes everything")
    parser.add_argument(
        "--subject", default=DEMO_SUBJECT, choices=list_subjects(), help="bundled toy subject"
    )
    parser.add_argument("--max_train_steps", type=int, default=400, help="optimiser steps")
    parser.add_argument("--validation_steps", type=int, default=40, help="validate every N steps")
    parser.add_argument("--lambda_val", type=float, default=0.5, help="λ of the validation reward")
    parser.add_argument(
        "--use_lora", action="store_true", help="train LoRA adapters instead of the full UNet"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the held-out images")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 = torch's own choice (one per core). The toy models are too small to gain "
        "from more than one, and on a busy machine several threads per process slow the run down tenfold",
    )
    parser.set_defaults(func=run_demo)


def _metrics_line(name: str, row: dict[str, float]) -> str:
    keys = ("identity_acc", "context_acc", "dino", "clip_i", "clip_t", "lambda_harmonic")
    return f"  {name:<7}" + "  ".join(f"{k} {row[k]:.3f}" for k in keys)


class PhaseTimer:
    """Wall time of named phases, in the order they ran (printed at the end and kept in demo_metrics.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _caption(per_image: dict[str, list], index: int) -> str:
    """What one shown image scored: its reward and, on the toy world, whether the judge sees the subject
    and the prompt's context in it."""
    parts = [f"reward {per_image['lambda_harmonic'][index]:.3f}"]
    for key, name in (("identity", "subject"), ("context", "context")):
        if key in per_image:
            parts.append(f"{name} {'yes' if per_image[key][index] else 'no'}")
    return ", ".join(parts)


def _save_heldout(root: Path, subject: str, references: list, images: dict[str, dict[str, list]]) -> None:
    """The held-out images in the layout ``rpo-diffusers evaluate`` reads (``<model>/<subject>/<prompt>/``,
    the prompt in ``prompt.txt``) and the references as ``references/<subject>/``, so the README's
    ``score`` and ``evaluate`` commands run on what the demo wrote."""
    for i, im in enumerate(references):
        (root / "references" / subject).mkdir(parents=True, exist_ok=True)
        im.save(root / "references" / subject / f"{i}.png")
    for model, by_prompt in images.items():
        for prompt, ims in by_prompt.items():
            folder = root / model / subject / prompt.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
            for i, im in enumerate(ims):
                im.save(folder / f"{i}.png")


def _print_timings(training: dict[str, float], evaluation: dict[str, float], wall: float) -> None:
    rows = [(f"training: {k}", v) for k, v in training.items() if v] + [
        (f"evaluation: {k}", v) for k, v in evaluation.items()
    ]
    print("\ntime per phase (wall seconds):")
    for name, seconds in rows:
        print(f"  {name:<38} {seconds:6.1f}")
    print(f"  {'total':<38} {wall:6.1f}")


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .config import RPOConfig
    from .evaluation import Judges, generate_images, load_result_pipeline
    from .plots import before_after_grid
    from .toy import DEFAULT_SCORER, SAMPLING, asset_path, get_subject
    from .trainer import RPOTrainer

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    timer = PhaseTimer()
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    subject = get_subject(args.subject)
    refs_dir = subject.write_references(out / "references")
    config = RPOConfig(
        pretrained_model_name_or_path=str(asset_path("sd")),
        scorer_model_name_or_path=str(asset_path(DEFAULT_SCORER)),
        instance_data_dir=str(refs_dir),
        class_noun=subject.class_noun,
        train_prompts=subject.training_prompts(),
        output_dir=str(out / "model"),
        resolution=SAMPLING["resolution"],
        num_inference_steps=SAMPLING["num_inference_steps"],
        guidance_scale=SAMPLING["guidance_scale"],
        images_per_prompt=4,
        num_validation_images=2,
        max_train_steps=args.max_train_steps,
        validation_steps=args.validation_steps,
        lambda_val=args.lambda_val,
        use_lora=args.use_lora,
        learning_rate=1e-3 if args.use_lora else 1e-4,  # the 1M-parameter toy UNet needs more than SD's 5e-6
        seed=args.seed,
        report_to="tensorboard",
    )
    threads = torch.get_num_threads()
    print(
        f"RPO demo: toy subject {subject.name} ('a sks {subject.class_noun}', {subject.color}/{subject.color2} "
        f"split, unseen by the base model), {len(config.train_prompts)} training prompts, "
        f"{config.max_train_steps} steps, validation every {config.validation_steps} (λ_val={config.lambda_val})"
    )
    print(
        f"models: the bundled toy world ({asset_path('sd').parent}), no download; {threads} torch "
        f"thread{'s' if threads > 1 else ''}"
    )
    t_train = time.perf_counter()
    result = RPOTrainer(config).train()
    train_wall = time.perf_counter() - t_train
    print("\nvalidation reward per interval:")
    for h in result.history:
        mark = "  <- chosen" if h["step"] == result.best_step else ""
        print(
            f"  step {h['step']:4d}  reward {h['reward']:.4f}  ALIGN-I {h['align_i']:.4f}  "
            f"ALIGN-T {h['align_t']:.4f}{mark}"
        )
    print(f"chosen step: {result.best_step} (reward {result.best_reward:.4f})")

    prompts = subject.evaluation_prompts()
    print(f"\nheld-out prompts ({len(prompts)} x {EVAL_IMAGES_PER_PROMPT} images), base -> RPO:")
    with timer("load the judges"):
        judges = Judges.for_toy_world()
    references = subject.reference_images()
    metrics, images, per_image = {}, {}, {}
    for name, out_dir in (("base", None), ("rpo", config.output_dir)):
        with timer(f"load the {name} model"):
            pipe = load_result_pipeline(asset_path("sd"), out_dir, args.use_lora)
        with timer(f"generate ({name})"):
            images[name] = generate_images(
                pipe,
                prompts,
                EVAL_IMAGES_PER_PROMPT,
                seed=args.seed,
                resolution=SAMPLING["resolution"],
                num_inference_steps=SAMPLING["num_inference_steps"],
                guidance_scale=SAMPLING["guidance_scale"],
            )
        del pipe
        with timer(f"score ({name})"):
            per_image[name] = {}
            metrics[name] = judges.score(references, images[name], subject.name, subject, per_image[name])
        print(_metrics_line(name, metrics[name]))
    with timer("save images"):
        _save_heldout(out / "heldout", subject.name, references, images)
    with timer("picture"):
        shown = [EVAL_IMAGES_PER_PROMPT * i for i in range(len(prompts))]  # the first image of each prompt
        grid = before_after_grid(
            [images["base"][p][0] for p in prompts],
            [images["rpo"][p][0] for p in prompts],
            prompts,
            "base model (step 0)",
            f"RPO, step {result.best_step} (chosen)",
            [_caption(per_image["base"], i) for i in shown],
            [_caption(per_image["rpo"], i) for i in shown],
            title=f"held-out prompts, {subject.name}: the first of {EVAL_IMAGES_PER_PROMPT} images per prompt, "
            "same seed in both columns",
        )
        grid.save(out / "heldout_before_after.png")
    wall = time.perf_counter() - t0
    training_phases = {
        **result.timings,
        "other (loading, setup)": max(0.0, train_wall - sum(result.timings.values())),
    }
    summary = {
        "subject": subject.name,
        "best_step": result.best_step,
        "best_reward": result.best_reward if math.isfinite(result.best_reward) else None,
        "history": [{k: h[k] for k in ("step", "reward", "align_i", "align_t")} for h in result.history],
        "heldout_metrics": metrics,
        "timings_s": result.timings,
        "training_wall_s": train_wall,
        "evaluation_timings_s": timer.seconds,
        "torch_threads": threads,
        "wall_time_s": wall,
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
    _print_timings(training_phases, timer.seconds, wall)
    print(
        f"\nwrote {out / 'model'} (model, before_after.png, reward_plot.png, rpo_history.json), "
        f"{out / 'heldout_before_after.png'} (a row per held-out prompt: base | RPO), {out / 'heldout'}/ "
        f"(the images, for `rpo-diffusers score` / `evaluate`) and {out / 'demo_metrics.json'} in {wall:.0f}s"
    )
    return 0
