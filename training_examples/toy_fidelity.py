#!/usr/bin/env python
"""How faithful is the toy world's reward? The λ-harmonic scorer (the ALIGN stand-in) against the judge, on
the images the generator really makes along real training runs.

    python training_examples/toy_fidelity.py --output_dir fidelity --jobs 2     # every subject, DreamBooth + RPO
    python training_examples/toy_fidelity.py --output_dir /tmp/f --quick        # smoke test (one subject, 1 min)

For every subject and method a training run validates every ``--validation_steps`` steps as usual; at each
validation the current model also draws the subject's held-out prompts (``--num_eval_images`` each, the same
seeds at every step), which the scorer scores and the attribute classifier (the ground truth) judges. Reported:

- ROC-AUC of ALIGN-I for "identity present" and of ALIGN-T for "context present" (the judge's verdicts), pooled
  and within prompt (one subject and prompt at a time, so a score cannot lean on which prompt it sees); and the
  AUC of ALIGN-I for context (below 0.5: the image reward penalises the right context).
- Selection fidelity per run: Spearman's ρ between the validation reward and the ground truth (the harmonic
  mean of held-out identity and context accuracy) over the validation steps, and the ground truth of the
  reward-selected step as a fraction of the best step's.

The numbers describe the stand-in, not which method wins. Writes ``fidelity_report.json`` and ``images.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rpo_diffusers.config import RPOConfig
from rpo_diffusers.stats import grouped_auc, roc_auc, spearman
from rpo_diffusers.toy import SAMPLING, SUBJECTS, asset_path, get_subject, load_classifier
from rpo_diffusers.toy.models import context_hits, identity_hits

METHODS = {"dreambooth": {"method": "dreambooth"}, "rpo": {"method": "rpo"}}
FIELDS = ("subject", "method", "step", "prompt", "seed", "align_i", "align_t", "identity", "context")


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def run_trajectory(args: argparse.Namespace, subject_name: str, method: str) -> dict[str, Any]:
    """One training run; at each validation, the held-out images' scores and verdicts."""
    from rpo_diffusers.trainer import RPOTrainer

    torch.set_num_threads(args.threads)
    subject = get_subject(subject_name)
    classifier = load_classifier()
    config = RPOConfig(
        pretrained_model_name_or_path=str(asset_path("sd")), scorer_model_name_or_path=args.scorer,
        class_noun=subject.class_noun, train_prompts=subject.training_prompts(),
        output_dir=str(Path(args.output_dir) / "runs" / subject_name / method), report_to="none",
        resolution=SAMPLING["resolution"], num_inference_steps=SAMPLING["num_inference_steps"],
        guidance_scale=SAMPLING["guidance_scale"], images_per_prompt=args.images_per_prompt,
        num_validation_images=args.num_validation_images, max_train_steps=args.max_train_steps,
        validation_steps=args.validation_steps, learning_rate=1e-4, seed=args.seed, **METHODS[method],
    )  # fmt: skip
    prompts = [p for p in subject.evaluation_prompts() for _ in range(args.num_eval_images)]
    seeds = [100_003 + i for i in range(len(prompts))]
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, float]] = []
    trainer: RPOTrainer | None = None

    def on_validation(event: str, payload: dict[str, Any]) -> None:
        if event != "validation":
            return
        with torch.no_grad():
            images = []
            for start in range(0, len(prompts), 32):
                images += trainer.components.generate(
                    prompts[start : start + 32], seeds[start : start + 32], config.num_inference_steps,
                    config.guidance_scale, config.resolution,
                )  # fmt: skip
            scores = trainer.scorer.score(images, prompts, lambda_=0.5)
        identity = identity_hits(images, subject, prompts, classifier)
        context = context_hits(images, prompts, classifier)
        for i, prompt in enumerate(prompts):
            rows.append({
                "subject": subject_name, "method": method, "step": payload["step"], "prompt": prompt,
                "seed": seeds[i], "align_i": float(scores.image_alignment[i]), "align_t": float(scores.text_alignment[i]),
                "identity": identity[i], "context": context[i],
            })  # fmt: skip
        id_acc, ctx_acc = sum(identity) / len(identity), sum(context) / len(context)
        steps.append({"step": payload["step"], "val_reward": payload["reward"], "identity": id_acc,
                      "context": ctx_acc, "truth": harmonic(id_acc, ctx_acc)})  # fmt: skip

    t0 = time.perf_counter()
    trainer = RPOTrainer(config, reference_images=subject.reference_images(32), callbacks=[on_validation])
    result = trainer.train()
    print(f"{subject_name:>18} {method:>10}: {len(steps)} validations, chosen step {result.best_step}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return {"subject": subject_name, "method": method, "chosen_step": result.best_step, "steps": steps, "rows": rows}


def selection_fidelity(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["steps"]
    truth = [s["truth"] for s in steps]
    chosen = next(s for s in steps if s["step"] == run["chosen_step"])
    best = max(truth)
    return {
        "subject": run["subject"], "method": run["method"], "chosen_step": run["chosen_step"],
        "spearman": spearman([s["val_reward"] for s in steps], truth),
        "truth_at_chosen": chosen["truth"], "truth_best": best,
        "best_step": steps[truth.index(best)]["step"],
        "fraction_of_best": chosen["truth"] / best if best > 0 else float("nan"),
    }  # fmt: skip


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for run in runs for r in run["rows"]]
    groups = [(r["subject"], r["prompt"]) for r in rows]
    align_i, align_t = [r["align_i"] for r in rows], [r["align_t"] for r in rows]
    identity, context = [r["identity"] for r in rows], [r["context"] for r in rows]
    per_run = [selection_fidelity(run) for run in runs]
    rhos = [r["spearman"] for r in per_run if r["spearman"] == r["spearman"]]
    fractions = [r["fraction_of_best"] for r in per_run if r["fraction_of_best"] == r["fraction_of_best"]]
    within_id, n_id = grouped_auc(align_i, identity, groups)
    within_ctx, n_ctx = grouped_auc(align_t, context, groups)
    return {
        "images": len(rows),
        "identity_rate": sum(identity) / len(rows), "context_rate": sum(context) / len(rows),
        "align_i_identity_auc": roc_auc(align_i, identity),
        "align_i_identity_auc_within_prompt": within_id, "prompts_with_both_identity_classes": n_id,
        "align_t_context_auc": roc_auc(align_t, context),
        "align_t_context_auc_within_prompt": within_ctx, "prompts_with_both_context_classes": n_ctx,
        "align_i_context_auc": roc_auc(align_i, context),
        "median_spearman": statistics.median(rhos) if rhos else float("nan"),
        "runs_with_a_spearman": len(rhos),
        "mean_fraction_of_best": statistics.fmean(fractions) if fractions else float("nan"),
        "runs": per_run,
        "runs_val_rewards": [[s["val_reward"] for s in run["steps"]] for run in runs],
    }  # fmt: skip


def format_report(rep: dict[str, Any]) -> str:
    lines = [
        f"{rep['images']} generated held-out images (identity in {rep['identity_rate']:.2f}, context in "
        f"{rep['context_rate']:.2f} by the judge)",
        "| what | pooled | within prompt |",
        "|---|---|---|",
        f"| ALIGN-I AUC for identity | {rep['align_i_identity_auc']:.3f} | {rep['align_i_identity_auc_within_prompt']:.3f} |",
        f"| ALIGN-T AUC for context | {rep['align_t_context_auc']:.3f} | {rep['align_t_context_auc_within_prompt']:.3f} |",
        f"| ALIGN-I AUC for context | {rep['align_i_context_auc']:.3f} | |",
        "",
        f"selection: median Spearman {rep['median_spearman']:.2f} over {rep['runs_with_a_spearman']} runs; the chosen "
        f"step's ground truth is {rep['mean_fraction_of_best']:.2f} of the best step's on average",
        "| subject | method | Spearman | chosen step | best step | truth chosen / best |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["runs"]:
        lines.append(f"| {r['subject']} | {r['method']} | {r['spearman']:.2f} | {r['chosen_step']} | {r['best_step']} | "
                     f"{r['truth_at_chosen']:.2f} / {r['truth_best']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--scorer", default=None, help="the λ-harmonic scorer to measure (default: the bundled one)")
    p.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=None, help="default: all")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--validation_steps", type=int, default=40)
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--num_validation_images", type=int, default=4, help="per training prompt (the paper's 4)")
    p.add_argument("--num_eval_images", type=int, default=4, help="per held-out prompt and validation step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--quick", action="store_true", help="one subject, DreamBooth, 40 steps: a smoke test")
    args = p.parse_args(argv)
    args.scorer = args.scorer or str(asset_path("scorer"))
    if args.quick:
        args.subjects, args.methods = args.subjects or ["redblue_ball"], ["dreambooth"]
        args.max_train_steps, args.validation_steps, args.images_per_prompt = 40, 20, 1
        args.num_validation_images, args.num_eval_images = 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(s, m) for s in (args.subjects or list(SUBJECTS)) for m in args.methods]
    t0 = time.perf_counter()
    if args.jobs > 1:  # spawn: no forked torch state
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_trajectory, [args] * len(todo), *zip(*todo)))
    else:
        runs = [run_trajectory(args, s, m) for s, m in todo]
    rep = report(runs)
    rep["args"] = {k: v for k, v in vars(args).items() if k != "output_dir"}
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    with open(out / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(r for run in runs for r in run["rows"])
    (out / "fidelity_report.json").write_text(json.dumps(rep, indent=2))
    print("\n" + format_report(rep))
    print(f"\nwrote {out / 'fidelity_report.json'} and {out / 'images.csv'} in {rep['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
