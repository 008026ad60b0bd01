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
from pathlib import Path

DEMO_SUBJECT = "whiteblack_ring"
EVAL_IMAGES_PER_PROMPT = 4


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .toy import list_subjects

    parser.add_argument("--output_dir", default="rpo-output", help="where the demo writes everything")
    parser.add_argument(
        "--subject", default=DEMO_SUBJECT, choices=list_subjects(), help="bundled toy subject"
    )
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--validation_steps", type=int, default=40)
    parser.add_argument("--lambda_val", type=float, default=0.5, help="λ of the validation reward")
    parser.add_argument(
        "--use_lora", action="store_true", help="train LoRA adapters instead of the full UNet"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 on a busy machine)",
    )
    parser.set_defaults(func=run_demo)


def _metrics_line(name: str, row: dict[str, float]) -> str:
    keys = ("identity_acc", "context_acc", "dino", "clip_i", "clip_t", "lambda_harmonic")
    return f"  {name:<7}" + "  ".join(f"{k} {row[k]:.3f}" for k in keys)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .config import RPOConfig
    from .data import make_image_grid
    from .evaluation import Judges, generate_images, load_result_pipeline
    from .toy import SAMPLING, asset_path, get_subject
    from .trainer import RPOTrainer

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    subject = get_subject(args.subject)
    refs_dir = subject.write_references(out / "references")
    config = RPOConfig(
        pretrained_model_name_or_path=str(asset_path("sd")),
        scorer_model_name_or_path=str(asset_path("scorer")),
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
    print(
        f"RPO demo: toy subject {subject.name} ('a sks {subject.class_noun}', {subject.color}/{subject.color2} "
        f"split, unseen by the base model), {len(config.train_prompts)} training prompts, "
        f"{config.max_train_steps} steps, validation every {config.validation_steps} (λ_val={config.lambda_val})"
    )
    print(f"models: the bundled toy world ({asset_path('sd').parent}), no download")
    result = RPOTrainer(config).train()
    print("\nvalidation reward per interval:")
    for h in result.history:
        mark = "  <- chosen" if h["step"] == result.best_step else ""
        print(
            f"  step {h['step']:4d}  reward {h['reward']:.4f}  ALIGN-I {h['align_i']:.4f}  "
            f"ALIGN-T {h['align_t']:.4f}{mark}"
        )
    print(f"chosen step: {result.best_step} (reward {result.best_reward:.4f})")

    print(
        f"\nheld-out prompts ({len(subject.evaluation_prompts())} x {EVAL_IMAGES_PER_PROMPT} images), base -> RPO:"
    )
    judges = Judges.for_toy_world()
    metrics, images = {}, {}
    for name, out_dir in (("base", None), ("rpo", config.output_dir)):
        pipe = load_result_pipeline(asset_path("sd"), out_dir, args.use_lora)
        images[name] = generate_images(
            pipe,
            subject.evaluation_prompts(),
            EVAL_IMAGES_PER_PROMPT,
            seed=args.seed,
            resolution=SAMPLING["resolution"],
            num_inference_steps=SAMPLING["num_inference_steps"],
            guidance_scale=SAMPLING["guidance_scale"],
        )
        metrics[name] = judges.score(subject.reference_images(), images[name], subject.name, subject)
        print(_metrics_line(name, metrics[name]))
    cells = [im for name in ("base", "rpo") for ims in images[name].values() for im in ims[:1]]
    make_image_grid(cells, rows=2).resize((8 * 96, 2 * 96)).save(out / "heldout_before_after.png")
    summary = {
        "subject": subject.name,
        "best_step": result.best_step,
        "best_reward": result.best_reward if math.isfinite(result.best_reward) else None,
        "history": [{k: h[k] for k in ("step", "reward", "align_i", "align_t")} for h in result.history],
        "heldout_metrics": metrics,
        "timings_s": result.timings,
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nwrote {out / 'model'} (model, before_after.png, reward_plot.png, rpo_history.json), "
        f"{out / 'heldout_before_after.png'} (top: base, bottom: RPO) and {out / 'demo_metrics.json'} "
        f"in {summary['wall_time_s']:.0f}s"
    )
    return 0
