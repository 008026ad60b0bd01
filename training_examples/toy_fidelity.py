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

The same AUCs for each set of evaluation stand-ins (``--evaluators``; DINO's and CLIP-I's cosine to the
references for identity, CLIP-T for context), which the benchmark's DINO / CLIP-I / CLIP-T columns rest on.

The ceiling (``--judge_twins``): a second classifier with the judge's recipe on its own sample and seeds
(``build_toy_world.py --stages judge_twin``) scores the same images. The AUC of its probability of identity /
context for the judge's verdicts, and how often its own verdicts agree with the judge's (Cohen's κ), say how far
any learned model can agree with the judge on these images: a stand-in's AUC is read against that.

The numbers describe the stand-in, not which method wins. ``--scorers A B`` measures several scorers on the same
runs (trained with A; DreamBooth's training does not depend on the scorer, so its runs compare them fairly).
Writes ``fidelity_report.json``, ``images.csv`` (the scorers) and ``evaluation_images.csv`` (the evaluation encoders).
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
from rpo_diffusers.stats import cohen_kappa, grouped_auc, roc_auc, spearman
from rpo_diffusers.toy import (
    DEFAULT_SCORER,
    EVALUATORS,
    SAMPLING,
    SUBJECTS,
    asset_path,
    get_subject,
    ground_truth_quality,
    load_classifier,
    load_evaluator,
)
from rpo_diffusers.toy.models import (
    AttributeClassifier,
    context_hits,
    context_probabilities,
    identity_hits,
    identity_probabilities,
    parse_prompt,
)

METHODS = {"dreambooth": {"method": "dreambooth"}, "rpo": {"method": "rpo"}}
FIELDS = ("scorer", "subject", "method", "step", "prompt", "seed", "align_i", "align_t", "identity", "context")
TWIN_FIELDS = ("twin", "subject", "method", "step", "prompt", "seed", "identity_p", "context_p", "twin_identity",
               "twin_context", "identity", "context")  # fmt: skip
EVAL_FIELDS = ("evaluator", "subject", "method", "step", "prompt", "seed", "dino", "clip_i", "clip_t", "identity", "context")
# evaluation encoder score -> the judge's verdict it should rank
EVAL_TARGETS = {"dino": "identity", "clip_i": "identity", "clip_t": "context"}


def scorer_name(path: str) -> str:
    return Path(path).name


def changes_colour(prompt: str) -> bool:
    """A colour-change prompt ("a purple sks ball"): the judge then wants the split look in the new colour,
    which the references never show, so ALIGN-I (similarity to them) and the judge's identity part ways."""
    return "color" in parse_prompt(prompt)


def aucs_by_prompt_kind(rows: list[dict[str, Any]], pairs: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Pooled AUCs (``name: (score column, verdict column)``) on the prompts that keep the subject's colour and on
    the colour-change prompts apart, with the verdicts' rates."""
    out = {}
    for kind, keep in (("kept_colour", False), ("colour_change", True)):
        part = [r for r in rows if changes_colour(r["prompt"]) == keep]
        out[kind] = {"images": len(part)}
        for name, (score, verdict) in pairs.items():
            out[kind][name] = roc_auc([r[score] for r in part], [r[verdict] for r in part])
        for verdict in ("identity", "context"):
            out[kind][f"{verdict}_rate"] = sum(r[verdict] for r in part) / len(part) if part else float("nan")
    return out


def run_trajectory(args: argparse.Namespace, subject_name: str, method: str) -> dict[str, Any]:
    """One training run (with the first scorer); at each validation, every scorer's scores of the held-out
    images and its validation reward (the others' on the same validation images, redrawn with the run's
    seeds), and the judge's verdicts."""
    from rpo_diffusers.rewards import LambdaHarmonicScorer
    from rpo_diffusers.trainer import RPOTrainer

    torch.set_num_threads(args.threads)
    subject = get_subject(subject_name)
    classifier = load_classifier()
    evaluators = {name: load_evaluator(name=name) for name in args.evaluators}
    twins = {scorer_name(path): AttributeClassifier.from_pretrained(path) for path in args.judge_twins}
    config = RPOConfig(
        pretrained_model_name_or_path=str(asset_path("sd")), scorer_model_name_or_path=args.scorers[0],
        class_noun=subject.class_noun, train_prompts=subject.training_prompts(),
        output_dir=str(Path(args.output_dir) / "runs" / subject_name / method), report_to="none",
        resolution=SAMPLING["resolution"], num_inference_steps=SAMPLING["num_inference_steps"],
        guidance_scale=SAMPLING["guidance_scale"], images_per_prompt=args.images_per_prompt,
        num_validation_images=args.num_validation_images, max_train_steps=args.max_train_steps,
        validation_steps=args.validation_steps, learning_rate=1e-4, seed=args.seed, **METHODS[method],
    )  # fmt: skip
    references = subject.reference_images(32)
    with torch.no_grad():
        ref_features = {name: ev.reference_features(references) for name, ev in evaluators.items()}
    others = {}
    for path in args.scorers[1:]:
        others[scorer_name(path)] = LambdaHarmonicScorer.from_pretrained(path, lambda_=config.lambda_val)
        others[scorer_name(path)].set_reference_images(references)
    prompts = [p for p in subject.evaluation_prompts() for _ in range(args.num_eval_images)]
    seeds = [100_003 + i for i in range(len(prompts))]
    val_prompts = [p for p in config.validation_prompts for _ in range(config.num_validation_images)]
    val_seeds = [config.seed + 7919 * (1 + i) for i in range(len(val_prompts))]  # the trainer's validation seeds
    rows: list[dict[str, Any]] = []
    eval_rows: list[dict[str, Any]] = []
    twin_rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    trainer: RPOTrainer | None = None

    def draw(prompt_list: list[str], seed_list: list[int], validation: bool = False) -> list:
        """The current model's images; ``validation``: with the run's validation settings, as the trainer draws."""
        steps = (validation and config.validation_num_inference_steps) or config.num_inference_steps
        extra = {"scheduler": config.validation_sampling_scheduler} if validation and config.validation_sampling_scheduler else {}
        images = []
        for start in range(0, len(prompt_list), 32):
            images += trainer.components.generate(
                prompt_list[start : start + 32], seed_list[start : start + 32], steps, config.guidance_scale,
                (validation and config.validation_resolution) or config.resolution, **extra,
            )  # fmt: skip
        return images

    def on_validation(event: str, payload: dict[str, Any]) -> None:
        if event != "validation":
            return
        with torch.no_grad():
            images = draw(prompts, seeds)
            scorers = {scorer_name(args.scorers[0]): trainer.scorer, **others}
            val_reward = {scorer_name(args.scorers[0]): payload["reward"]}
            if others:
                val_images = draw(val_prompts, val_seeds, validation=True)
                for name, other in others.items():
                    val_reward[name] = float(other.score(val_images, val_prompts, lambda_=config.lambda_val).reward.mean())
            scores = {name: sc.score(images, prompts, lambda_=0.5) for name, sc in scorers.items()}
            encoded = {name: ev.image_scores(images, prompts, ref_features[name]) for name, ev in evaluators.items()}
            identity = identity_hits(images, subject, prompts, classifier)
            context = context_hits(images, prompts, classifier)
            for name, twin in twins.items():
                scores_id = identity_probabilities(images, subject, prompts, twin)
                scores_ctx = context_probabilities(images, prompts, twin)
                verdict_id = identity_hits(images, subject, prompts, twin)
                verdict_ctx = context_hits(images, prompts, twin)
                for i, prompt in enumerate(prompts):
                    twin_rows.append({
                        "twin": name, "subject": subject_name, "method": method, "step": payload["step"],
                        "prompt": prompt, "seed": seeds[i], "identity_p": scores_id[i], "context_p": scores_ctx[i],
                        "twin_identity": verdict_id[i], "twin_context": verdict_ctx[i],
                        "identity": identity[i], "context": context[i],
                    })  # fmt: skip
        for name, sc in scores.items():
            for i, prompt in enumerate(prompts):
                rows.append({
                    "scorer": name, "subject": subject_name, "method": method, "step": payload["step"],
                    "prompt": prompt, "seed": seeds[i], "align_i": float(sc.image_alignment[i]),
                    "align_t": float(sc.text_alignment[i]), "identity": identity[i], "context": context[i],
                })  # fmt: skip
        for name, enc in encoded.items():
            for i, prompt in enumerate(prompts):
                eval_rows.append({
                    "evaluator": name, "subject": subject_name, "method": method, "step": payload["step"],
                    "prompt": prompt, "seed": seeds[i], **{k: float(v[i]) for k, v in enc.items()},
                    "identity": identity[i], "context": context[i],
                })  # fmt: skip
        id_acc, ctx_acc = sum(identity) / len(identity), sum(context) / len(context)
        steps.append({"step": payload["step"], "val_reward": val_reward, "identity": id_acc,
                      "context": ctx_acc, "truth": ground_truth_quality(id_acc, ctx_acc)})  # fmt: skip

    t0 = time.perf_counter()
    trainer = RPOTrainer(config, reference_images=references, callbacks=[on_validation])
    result = trainer.train()
    print(f"{subject_name:>18} {method:>10}: {len(steps)} validations, chosen step {result.best_step}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return {"subject": subject_name, "method": method, "steps": steps, "rows": rows, "eval_rows": eval_rows,
            "twin_rows": twin_rows}  # fmt: skip


def selection_fidelity(run: dict[str, Any], scorer: str) -> dict[str, Any]:
    """The step early stopping picks on this scorer's validation reward (the first maximum) against the truth."""
    steps = run["steps"]
    truth = [s["truth"] for s in steps]
    rewards = [s["val_reward"][scorer] for s in steps]
    chosen = rewards.index(max(rewards))
    best = max(truth)
    return {
        "subject": run["subject"], "method": run["method"], "chosen_step": steps[chosen]["step"],
        "spearman": spearman(rewards, truth), "val_rewards": rewards,
        "truth_at_chosen": truth[chosen], "truth_best": best, "best_step": steps[truth.index(best)]["step"],
        "fraction_of_best": truth[chosen] / best if best > 0 else float("nan"),
    }  # fmt: skip


def report(runs: list[dict[str, Any]], scorer: str) -> dict[str, Any]:
    rows = [r for run in runs for r in run["rows"] if r["scorer"] == scorer]
    groups = [(r["subject"], r["prompt"]) for r in rows]
    align_i, align_t = [r["align_i"] for r in rows], [r["align_t"] for r in rows]
    identity, context = [r["identity"] for r in rows], [r["context"] for r in rows]
    per_run = [selection_fidelity(run, scorer) for run in runs]
    rhos = [r["spearman"] for r in per_run if r["spearman"] == r["spearman"]]
    fractions = [r["fraction_of_best"] for r in per_run if r["fraction_of_best"] == r["fraction_of_best"]]
    within_id, n_id = grouped_auc(align_i, identity, groups)
    within_ctx, n_ctx = grouped_auc(align_t, context, groups)
    return {
        "scorer": scorer, "images": len(rows),
        "identity_rate": sum(identity) / len(rows), "context_rate": sum(context) / len(rows),
        "align_i_identity_auc": roc_auc(align_i, identity),
        "align_i_identity_auc_within_prompt": within_id, "prompts_with_both_identity_classes": n_id,
        "align_t_context_auc": roc_auc(align_t, context),
        "align_t_context_auc_within_prompt": within_ctx, "prompts_with_both_context_classes": n_ctx,
        "align_i_context_auc": roc_auc(align_i, context),
        "median_spearman": statistics.median(rhos) if rhos else float("nan"),
        "runs_with_a_spearman": len(rhos),
        "mean_fraction_of_best": statistics.fmean(fractions) if fractions else float("nan"),
        "by_prompt_kind": aucs_by_prompt_kind(rows, {"align_i_identity_auc": ("align_i", "identity"),
                                                     "align_t_context_auc": ("align_t", "context")}),
        "runs": per_run,
    }  # fmt: skip


def evaluation_report(runs: list[dict[str, Any]], evaluator: str) -> dict[str, Any]:
    """ROC-AUC of each evaluation encoder's score for the judge's verdict it stands for, pooled and within prompt."""
    rows = [r for run in runs for r in run["eval_rows"] if r["evaluator"] == evaluator]
    groups = [(r["subject"], r["prompt"]) for r in rows]
    rep: dict[str, Any] = {"evaluator": evaluator, "images": len(rows)}
    for key, target in EVAL_TARGETS.items():
        scores, labels = [r[key] for r in rows], [r[target] for r in rows]
        rep[f"{key}_{target}_auc"] = roc_auc(scores, labels)
        rep[f"{key}_{target}_auc_within_prompt"] = grouped_auc(scores, labels, groups)[0]
    return rep


def twin_report(runs: list[dict[str, Any]], twin: str) -> dict[str, Any]:
    """How far a second judge (the judge's recipe, its own sample and seeds) agrees with the judge: AUCs of its
    probabilities for the judge's verdicts, pooled and within prompt, and its verdicts' agreement and κ."""
    rows = [r for run in runs for r in run["twin_rows"] if r["twin"] == twin]
    groups = [(r["subject"], r["prompt"]) for r in rows]
    rep: dict[str, Any] = {"twin": twin, "images": len(rows)}
    for target in ("identity", "context"):
        scores, labels, verdicts = [r[f"{target}_p"] for r in rows], [r[target] for r in rows], [r[f"twin_{target}"] for r in rows]
        rep[f"{target}_auc"] = roc_auc(scores, labels)
        rep[f"{target}_auc_within_prompt"] = grouped_auc(scores, labels, groups)[0]
        rep[f"{target}_agreement"] = sum(v == t for v, t in zip(verdicts, labels, strict=True)) / len(rows)
        rep[f"{target}_kappa"] = cohen_kappa(verdicts, labels)
        rep[f"{target}_rate_twin"] = sum(verdicts) / len(rows)
    rep["by_prompt_kind"] = aucs_by_prompt_kind(rows, {"identity_auc": ("identity_p", "identity"),
                                                       "context_auc": ("context_p", "context")})  # fmt: skip
    return rep


def format_twin_report(rep: dict[str, Any]) -> str:
    lines = [
        f"judge twin {rep['twin']} (the judge's recipe, its own sample and seeds) on the same {rep['images']} images: "
        "the ceiling for a stand-in",
        "| what | AUC pooled | AUC within prompt | verdicts agree | Cohen's κ | rate (twin) |",
        "|---|---|---|---|---|---|",
    ]
    for target in ("identity", "context"):
        lines.append(f"| twin's P({target}) for the judge's {target} | {rep[f'{target}_auc']:.3f} | "
                     f"{rep[f'{target}_auc_within_prompt']:.3f} | {rep[f'{target}_agreement']:.3f} | "
                     f"{rep[f'{target}_kappa']:.3f} | {rep[f'{target}_rate_twin']:.3f} |")  # fmt: skip
    lines += ["", format_prompt_kinds(rep["by_prompt_kind"], {"identity_auc": "twin's P(identity) AUC for identity",
                                                              "context_auc": "twin's P(context) AUC for context"})]
    return "\n".join(lines)


def format_prompt_kinds(kinds: dict[str, dict[str, Any]], names: dict[str, str]) -> str:
    lines = ["| pooled, by prompt kind | kept colour | colour change |", "|---|---|---|"]
    for key, name in names.items():
        lines.append(f"| {name} | {kinds['kept_colour'][key]:.3f} | {kinds['colour_change'][key]:.3f} |")
    for verdict in ("identity", "context"):
        lines.append(f"| {verdict} rate (judge) | {kinds['kept_colour'][f'{verdict}_rate']:.3f} | "
                     f"{kinds['colour_change'][f'{verdict}_rate']:.3f} |")  # fmt: skip
    lines.append(f"| images | {kinds['kept_colour']['images']} | {kinds['colour_change']['images']} |")
    return "\n".join(lines)


def format_evaluation_report(rep: dict[str, Any]) -> str:
    lines = [
        f"evaluation encoders {rep['evaluator']!r} ({', '.join(EVALUATORS[rep['evaluator']])}) on the same "
        f"{rep['images']} images",
        "| what | pooled | within prompt |",
        "|---|---|---|",
    ]
    names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
    for key, target in EVAL_TARGETS.items():
        lines.append(f"| {names[key]} AUC for {target} | {rep[f'{key}_{target}_auc']:.3f} | "
                     f"{rep[f'{key}_{target}_auc_within_prompt']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def format_report(rep: dict[str, Any]) -> str:
    lines = [
        f"scorer {rep['scorer']}: {rep['images']} generated held-out images (identity in {rep['identity_rate']:.2f}, context in "
        f"{rep['context_rate']:.2f} by the judge)",
        "| what | pooled | within prompt |",
        "|---|---|---|",
        f"| ALIGN-I AUC for identity | {rep['align_i_identity_auc']:.3f} | {rep['align_i_identity_auc_within_prompt']:.3f} |",
        f"| ALIGN-T AUC for context | {rep['align_t_context_auc']:.3f} | {rep['align_t_context_auc_within_prompt']:.3f} |",
        f"| ALIGN-I AUC for context | {rep['align_i_context_auc']:.3f} | |",
        "",
        format_prompt_kinds(rep["by_prompt_kind"], {"align_i_identity_auc": "ALIGN-I AUC for identity",
                                                    "align_t_context_auc": "ALIGN-T AUC for context"}),
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
    p.add_argument("--scorers", nargs="+", default=None,
                   help="λ-harmonic scorers to measure on the same images; the first one trains (default: the bundled one)")
    p.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=None, help="default: all")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--validation_steps", type=int, default=40)
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--num_validation_images", type=int, default=4, help="per training prompt (the paper's 4)")
    p.add_argument("--num_eval_images", type=int, default=4, help="per held-out prompt and validation step")
    p.add_argument("--evaluators", nargs="+", choices=sorted(EVALUATORS), default=sorted(EVALUATORS),
                   help="sets of evaluation stand-ins (DINO, CLIP) to measure on the same images")
    p.add_argument("--judge_twins", nargs="*", default=[],
                   help="classifiers with the judge's recipe (build_toy_world.py --stages judge_twin) to score the same "
                        "images: how far two judges agree, the ceiling for a stand-in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--quick", action="store_true", help="one subject, DreamBooth, 40 steps: a smoke test")
    args = p.parse_args(argv)
    args.scorers = args.scorers or [str(asset_path(DEFAULT_SCORER))]
    for paths, flag in ((args.scorers, "--scorers"), (args.judge_twins, "--judge_twins")):
        names = [scorer_name(path) for path in paths]
        if len(set(names)) < len(names):  # the report keys models by folder name: one would hide the other
            clash = next(n for n in names if names.count(n) > 1)
            p.error(f"{flag} has two folders named {clash!r}; the report names each by its folder, so give them "
                    "different folder names (a symlink with another name is enough)")
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
    reports = {scorer_name(path): report(runs, scorer_name(path)) for path in args.scorers}
    evaluation = {name: evaluation_report(runs, name) for name in args.evaluators}
    twins = {scorer_name(path): twin_report(runs, scorer_name(path)) for path in args.judge_twins}
    summary = {"scorers": reports, "evaluation_encoders": evaluation, "judge_twins": twins, "args": {k: v for k, v in vars(args).items() if k != "output_dir"},
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    with open(out / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(r for run in runs for r in run["rows"])
    with open(out / "evaluation_images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_FIELDS)
        writer.writeheader()
        writer.writerows(r for run in runs for r in run["eval_rows"])
    if twins:
        with open(out / "twin_images.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TWIN_FIELDS)
            writer.writeheader()
            writer.writerows(r for run in runs for r in run["twin_rows"])
    (out / "fidelity_report.json").write_text(json.dumps(summary, indent=2))
    for rep in reports.values():
        print("\n" + format_report(rep))
    for rep in evaluation.values():
        print("\n" + format_evaluation_report(rep))
    for rep in twins.values():
        print("\n" + format_twin_report(rep))
    print(f"\nwrote {out / 'fidelity_report.json'} and {out / 'images.csv'} in {summary['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
