#!/usr/bin/env python
"""The paper's ablation on the same subjects: which training recipe keeps the subject AND follows the prompt?

    python training_examples/benchmark_methods.py --output_dir bench-toy            # bundled toy world, 2 CPU cores
    python training_examples/benchmark_methods.py --output_dir /tmp/b --quick       # smoke test (one subject, minutes)
    python training_examples/benchmark_methods.py --output_dir bench-sd --dreambench_dir ../shared/dreambench \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --scorer kakaobrain/align-base \\
        --dino facebook/dino-vits16 --clip openai/clip-vit-base-patch16 --resolution 512 --use_lora   # a GPU

Methods (each trains from the same base model with the same seed; see METHODS):
  base              no training
  dreambooth        L_sim only, the last step is exported (DreamBooth without prior preservation)
  dreambooth_prior  L_sim + prior-preservation loss on base-model class images, the last step
  pref_no_es        L_sim + L_pref, the last step (RPO without early stopping)
  es_no_pref        L_sim only, the best validation step at λ_val 0.5 (early stopping without L_pref)
  rpo_lambda0.3/0.5/0.7   RPO: L_sim + L_pref, the best validation step at that λ_val
  rpo_paper_val     rpo_lambda0.5's training, selected by the paper's validation (PAPER_VALIDATION: 50 DDIM steps)
                    instead of RPOConfig's default 20 DPM-Solver++ steps (--validation_num_inference_steps)
  dpg_latent        DPG: L_sim + the look-forward latent reconstruction reward through the critic, the last step
  dpg_image         DPG with the image-feature reward (the paper's DINO reward) of --dpg_reward_model, which is
                    never the evaluation DINO (toy world: the scorer's image tower), the last step
  dpg_lambda        DPG with the λ-harmonic reward of the scorer on the look-forward image, the last step

Methods that differ only in which step they export (SELECTION_FIELDS: es_no_pref from dreambooth's run; pref_no_es,
rpo_lambda0.3/0.7 and rpo_paper_val from rpo_lambda0.5's) select from that run instead of training again: the same
weights step for step, their own rewards (the run's validation images rescored at their λ_val, or their own
images for another validation sampler), so 6 trainings give the 11 trained rows. Their wall time is what a run of
their own would take. Methods that export their last step validate only at step 0 and at the end (the weights are
the same: training draws its own seeds), and results with the same weights are evaluated once.

Validation (what early stopping sees) uses the training prompts; evaluation uses each subject's held-out
prompts, with the same seeds for every method. Columns: DINO, CLIP-I, CLIP-T (evaluation encoders, never the
scorer), the λ-harmonic reward at λ 0.5 (the scorer), and on the toy world the ground-truth identity and
context accuracy from the attribute classifier; wall time is the training run's (generation, training,
validation, export). The table shows the mean over subjects with its 95% bootstrap interval, and a second table
each method minus DreamBooth on the same subjects (paired: mean, interval, subjects won); ``results.csv`` has one row per subject and
method; ``grids/`` one image per subject (a row per method); ``tradeoff.png`` plots identity against context.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rpo_diffusers.config import FAST_VALIDATION, PAPER_VALIDATION, RPOConfig
from rpo_diffusers.data import load_image_folder, make_image_grid
from rpo_diffusers.evaluation import Judges, generate_images, load_result_pipeline
from rpo_diffusers.prompts import evaluation_prompts, load_dreambench_classes, subject_type_for
from rpo_diffusers.stats import bootstrap_ci, paired_comparison
from rpo_diffusers.toy import ground_truth_quality


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    overrides: dict[str, Any] | None  # RPOConfig fields; None = the base model, untrained
    # another method whose training run this one selects from: the two differ only in SELECTION_FIELDS, so a run
    # of their own would train the same weights step for step (validation draws from its own seeds)
    trained_by: str | None = None


# RPOConfig fields that decide only which validated step is exported, never the weights a step has
SELECTION_FIELDS = frozenset(
    {"lambda_val", "early_stopping", "validation_num_inference_steps", "validation_sampling_scheduler"}
)
# what a validation's images depend on: a selection with the same values rescores the run's own images
VALIDATION_FIELDS = (
    "validation_prompts", "num_validation_images", "seed", "validation_num_inference_steps",
    "validation_sampling_scheduler", "validation_resolution", "validation_batch_size", "guidance_scale",
)  # fmt: skip


METHODS: tuple[Method, ...] = (
    Method("base", "base model", None),
    Method("dreambooth", "DreamBooth (L_sim)", {"pref_loss_weight": 0.0, "early_stopping": False}),
    Method(
        "dreambooth_prior",
        "DreamBooth + prior",
        {"pref_loss_weight": 0.0, "early_stopping": False, "with_prior_preservation": True},
    ),
    Method("pref_no_es", "L_pref, no early stop", {"early_stopping": False}, trained_by="rpo_lambda0.5"),
    Method(
        "es_no_pref", "early stop, no L_pref", {"pref_loss_weight": 0.0, "lambda_val": 0.5}, trained_by="dreambooth"
    ),
    Method("rpo_lambda0.3", "RPO λ_val 0.3", {"lambda_val": 0.3}, trained_by="rpo_lambda0.5"),
    Method("rpo_lambda0.5", "RPO λ_val 0.5", {"lambda_val": 0.5}),
    Method("rpo_lambda0.7", "RPO λ_val 0.7", {"lambda_val": 0.7}, trained_by="rpo_lambda0.5"),
    # rpo_lambda0.5's training chosen by the paper's 50 DDIM validation steps instead of the default 20
    # DPM-Solver++ steps (its own validation images): does the default pick as good a step?
    Method(
        "rpo_paper_val",
        "RPO λ_val 0.5, paper's validation",
        {"lambda_val": 0.5, **PAPER_VALIDATION},
        trained_by="rpo_lambda0.5",
    ),
    # DPG (DreamBooth + a look-forward reward through a critic), a fixed number of steps as its paper trains
    Method("dpg_latent", "DPG look forward", {"method": "dpg", "dpg_reward": "latent", "early_stopping": False}),
    Method(
        "dpg_image", "DPG image-feature reward", {"method": "dpg", "dpg_reward": "dino", "early_stopping": False}
    ),
    Method(
        "dpg_lambda",
        "DPG λ-harmonic reward",
        {"method": "dpg", "dpg_reward": "lambda_harmonic", "early_stopping": False},
    ),
)
METRICS = ("dino", "clip_i", "clip_t", "lambda_harmonic", "identity_acc", "context_acc", "wall_s")


@dataclass
class BenchSubject:
    """One subject: its references, class noun and prompts (toy subjects also carry their ground truth)."""

    name: str
    class_noun: str
    references: list[Image.Image]
    eval_prompts: list[str]
    train_prompts: list[str] | None = None  # None: RPO's 8 default prompts for the class
    toy: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def toy_subjects(names: Sequence[str] | None) -> list[BenchSubject]:
    from rpo_diffusers.toy import SUBJECTS, get_subject

    chosen = [get_subject(n) for n in (names or list(SUBJECTS))]
    return [
        BenchSubject(
            s.name, s.class_noun, s.reference_images(32), s.evaluation_prompts(), s.training_prompts(), s
        )
        for s in chosen
    ]


def dreambench_subjects(root: Path, names: Sequence[str] | None, identifier: str) -> list[BenchSubject]:
    classes = load_dreambench_classes(str(root / "prompts_and_classes.txt"))
    unknown = sorted(set(names or ()) - set(classes))
    if unknown:
        raise ValueError(f"Not DreamBench subjects: {unknown}; choose from {sorted(classes)}.")
    out = []
    for name in names or sorted(classes):
        noun = classes[name]
        prompts = evaluation_prompts(noun, identifier, subject_type_for(noun))
        out.append(BenchSubject(name, noun, load_image_folder(root / name), prompts))
    return out


# ------------------------------------------------------------------------------------------------
# one run: train (or not), then generate the held-out prompts
# ------------------------------------------------------------------------------------------------


def run_config(args: argparse.Namespace, subject: BenchSubject, method: Method, run_dir: Path) -> RPOConfig:
    settings: dict[str, Any] = dict(
        pretrained_model_name_or_path=args.model, scorer_model_name_or_path=args.scorer,
        class_noun=subject.class_noun, identifier=args.identifier, train_prompts=subject.train_prompts,
        max_train_steps=args.max_train_steps, validation_steps=args.validation_steps,
        learning_rate=args.learning_rate, use_lora=args.use_lora, resolution=args.resolution,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        validation_num_inference_steps=args.validation_num_inference_steps,
        images_per_prompt=args.images_per_prompt, num_validation_images=args.num_validation_images,
        mixed_precision=args.mixed_precision,
        output_dir=str(run_dir), report_to="none", seed=args.seed,
    )  # fmt: skip
    settings.update(method.overrides or {})
    if settings.get("dpg_reward") == "dino":
        settings["dpg_reward_model"] = args.dpg_reward_model
    if settings.get("with_prior_preservation"):
        settings["num_class_images"] = args.num_class_images
    return RPOConfig(**settings)


def training_settings(method: Method) -> dict[str, Any]:
    return {k: v for k, v in (method.overrides or {}).items() if k not in SELECTION_FIELDS}


def training_runs(methods: Sequence[Method]) -> list[tuple[Method, list[Method]]]:
    """The training runs ``methods`` need, in METHODS order: (the method that trains, the requested methods that
    select from its run). A trained_by method brings its trainer's run even when that method is not requested."""
    by_name = {m.name: m for m in METHODS}
    runs: dict[str, list[Method]] = {}
    for m in sorted(methods, key=lambda m: METHODS.index(by_name[m.trained_by or m.name])):
        runs.setdefault(m.trained_by or m.name, [])
        if m.trained_by:
            runs[m.trained_by].append(m)
    return [(by_name[name], readers) for name, readers in runs.items()]


def check_shared_runs(methods: Sequence[Method] = METHODS) -> None:
    """A method may read another's run only if nothing but its selection differs."""
    by_name = {m.name: m for m in methods}
    for m in methods:
        if m.trained_by is None:
            continue
        trainer = by_name.get(m.trained_by)
        if trainer is None or trainer.trained_by is not None or trainer.overrides is None:
            raise ValueError(f"{m.name}: trained_by={m.trained_by!r} must name a method that trains its own run.")
        if training_settings(m) != training_settings(trainer):
            raise ValueError(
                f"{m.name} differs from {trainer.name} in training settings, not only in {sorted(SELECTION_FIELDS)}:"
                f" {training_settings(m)} vs {training_settings(trainer)}; give it a run of its own."
            )


class SharedSelection:
    """The methods that select from another method's training run: at each of the run's validations, each one's
    own reward of the same weights (the run's validation images rescored at its λ_val, or its own validation
    images where its validation settings differ), so its history, chosen step and weights are what a run of its
    own would have given. Without early stopping a method takes the last step, as the trainer does."""

    def __init__(self, trainer, configs: dict[str, RPOConfig]) -> None:
        self.trainer, self.configs = trainer, configs
        self.history: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        self.best: dict[str, tuple[float, int, dict[str, torch.Tensor] | None]] = {}
        self.validation_s = dict.fromkeys(configs, 0.0)
        run = trainer.config
        self.rescored = {
            name: all(getattr(cfg, f) == getattr(run, f) for f in VALIDATION_FIELDS) for name, cfg in configs.items()
        }

    @torch.no_grad()
    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        from rpo_diffusers.rewards import lambda_harmonic

        if event != "validation":
            return
        state = None  # one copy of the weights per validation, shared by every method that keeps them
        for name, cfg in self.configs.items():
            if self.rescored[name]:
                per_image = payload["per_image"]
                align_i = torch.tensor(per_image["image_alignment"])
                align_t = torch.tensor(per_image["text_alignment"])
                reward = lambda_harmonic(align_i, align_t, cfg.lambda_val).float()
            else:
                t0 = time.perf_counter()
                _, scores = self.trainer.validation_scores(cfg)
                align_i, align_t, reward = scores.image_alignment, scores.text_alignment, scores.reward
                self.validation_s[name] += time.perf_counter() - t0
            k = cfg.num_validation_images
            entry = {
                "step": payload["step"], "reward": float(reward.mean()), "align_i": float(align_i.mean()),
                "align_t": float(align_t.mean()),
                "per_prompt": {p: float(reward[i * k : (i + 1) * k].mean()) for i, p in enumerate(cfg.validation_prompts)},
            }  # fmt: skip
            self.history[name].append(entry)
            if not cfg.early_stopping:  # the last step: the trainer's weights when the run ends
                self.best[name] = (entry["reward"], entry["step"], None)
            elif name not in self.best or entry["reward"] > self.best[name][0]:
                state = state if state is not None else self.trainer.components.trainable_state_dict()
                self.best[name] = (entry["reward"], entry["step"], state)

    def export(self, name: str, run_dir: Path) -> int:
        """Write ``name``'s chosen weights as the trainer exports a result; returns the chosen step. Call
        :meth:`run_ended` first: exports load other weights into the model."""
        _, step, state = self.best[name]
        self.trainer.components.load_trainable_state_dict(state if state is not None else self.last)
        self.trainer.components.export(run_dir, {"best_step": step})
        return step

    def run_ended(self) -> None:
        """Keep the weights the run ended with: the last step, for the methods without early stopping."""
        self.last = self.trainer.components.trainable_state_dict()


def train_and_load(
    args, subject: BenchSubject, method: Method, run_dir: Path, readers: Sequence[Method] = ()
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Per method name (``method``, then each of ``readers``, which select from its run): the pipeline it ends
    with and what its training reported. Each wall time is what a run of the method's own would take
    (:func:`own_run_seconds`). A run that exports its last step and has no readers validates only at step 0 and at
    the end."""
    from rpo_diffusers.trainer import RPOTrainer

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if method.overrides is None:
        return {method.name: (load_result_pipeline(args.model, dtype=dtype), {"wall_s": 0.0, "best_step": None,
                                                                               "history": []})}  # fmt: skip
    config = run_config(args, subject, method, run_dir)
    if not config.early_stopping and not readers:
        # the last step is exported and nothing selects from this run: validating at step 0 and at the end (the
        # reward logged before and after) gives the same weights as every 40 steps (training draws its own seeds)
        config = replace(config, validation_steps=config.max_train_steps)
    trainer = RPOTrainer(config, reference_images=subject.references)
    shared = SharedSelection(trainer, {m.name: run_config(args, subject, m, run_dir.parent / m.name) for m in readers})
    trainer.callbacks.append(shared)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0 - sum(shared.validation_s.values())  # the run as it validated
    validation, n = trainer.timings["validation"], len(result.history)
    shared.run_ended()
    out = {method.name: (load_result_pipeline(args.model, run_dir, args.use_lora, dtype),
                         {"wall_s": own_run_seconds(wall, validation, n, config.early_stopping),
                          "best_step": result.best_step, "history": result.history})}  # fmt: skip
    for m in readers:
        step = shared.export(m.name, run_dir.parent / m.name)
        own = validation if shared.rescored[m.name] else shared.validation_s[m.name]
        seconds = own_run_seconds(wall, validation, n, shared.configs[m.name].early_stopping, own)
        out[m.name] = (load_result_pipeline(args.model, run_dir.parent / m.name, args.use_lora, dtype),
                       {"wall_s": seconds, "best_step": step, "history": shared.history[m.name]})  # fmt: skip
    return out


def own_run_seconds(
    wall: float, validation: float, validations: int, early_stopping: bool, own_validation: float | None = None
) -> float:
    """What a run of a method's own takes, from a shared run's ``wall`` seconds that spent ``validation`` seconds
    on ``validations`` validations: the method's own validation (``own_validation``, its own sampler's; default the
    run's) in place of the run's and, for a method that exports its last step, only the first and last of them."""
    own = validation if own_validation is None else own_validation
    seconds = wall - validation + own
    return seconds - own * (validations - 2) / validations if not early_stopping and validations > 2 else seconds


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def weights_digest(pipe) -> str:
    """A hash of every weight the pipeline samples with: two results with equal digests draw the same images from
    the same seeds, so the benchmark evaluates them once (readers that export the step their run exports, a
    run whose chosen step is 0 and the base model)."""
    h = hashlib.blake2b(digest_size=16)
    for part, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, tensor in component.state_dict().items():
                h.update(f"{part}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif hasattr(component, "get_vocab"):  # a tokenizer
            h.update(f"{part}:{sorted(component.get_vocab().items())}".encode())
        elif component is not None:  # the scheduler: its config decides the sampler
            h.update(f"{part}:{json.dumps(dict(getattr(component, 'config', {})), sort_keys=True, default=str)}".encode())
    return h.hexdigest()


def load_judges(args) -> Judges:
    return Judges.from_pretrained(
        dino=args.dino, clip=args.clip, scorer=args.scorer, identifier=args.identifier,
        classifier=args.classifier if args.toy else None,
    )  # fmt: skip


BASELINE = "dreambooth"


def summarize(rows: list[dict[str, Any]], methods: Sequence[Method]) -> list[dict[str, Any]]:
    """Per method (in METHODS order) and metric: (mean, std) over subjects, the 95% bootstrap interval of the
    mean (``<metric>_ci``), and on the same subjects the paired difference to DreamBooth (``vs_dreambooth``)."""
    out = []
    baseline = {r["subject"]: r for r in rows if r["method"] == BASELINE}
    for m in methods:
        mine = [r for r in rows if r["method"] == m.name]
        if not mine:
            continue
        entry: dict[str, Any] = {"method": m.name, "label": m.label, "subjects": len(mine)}
        for k in METRICS:
            values = [float(r[k]) for r in mine if r.get(k) not in (None, "")]
            entry[k] = (float(np.mean(values)), float(np.std(values))) if values else None
            entry[f"{k}_ci"] = bootstrap_ci(values)[1:] if values else None
        if m.name != BASELINE and baseline:
            paired = [r for r in mine if r["subject"] in baseline]
            entry["vs_dreambooth"] = {
                k: paired_comparison([float(r[k]) for r in paired], [float(baseline[r["subject"]][k]) for r in paired])
                for k in METRICS
                if k != "wall_s" and all(r.get(k) not in (None, "") for r in paired)
                and all(baseline[r["subject"]].get(k) not in (None, "") for r in paired)
            }  # fmt: skip
        out.append(entry)
    return out


# (method, the method it must agree with): the same training, chosen by another validation
SELECTION_PAIRS = (("rpo_lambda0.5", "rpo_paper_val"),)


def selection_agreement(rows: list[dict[str, Any]], method: str, reference: str, toy: bool) -> dict[str, Any] | None:
    """Does ``method``'s validation pick as good a step as ``reference``'s on the same training? Per subject:
    the same step or not, and the paired difference of the chosen models' quality (the ground truth's harmonic
    mean of identity and context on the toy world, else the λ-harmonic reward)."""
    mine = {r["subject"]: r for r in rows if r["method"] == method}
    theirs = {r["subject"]: r for r in rows if r["method"] == reference}
    subjects = sorted(set(mine) & set(theirs))
    if not subjects:
        return None

    def quality(r: dict[str, Any]) -> float:
        if not toy:
            return float(r["lambda_harmonic"])
        return ground_truth_quality(float(r["identity_acc"]), float(r["context_acc"]))

    same = [mine[s]["best_step"] == theirs[s]["best_step"] for s in subjects]
    a, b = [quality(mine[s]) for s in subjects], [quality(theirs[s]) for s in subjects]
    return {
        "method": method, "reference": reference, "subjects": len(subjects), "same_step": int(sum(same)),
        "quality": "harmonic(identity_acc, context_acc)" if toy else "lambda_harmonic",
        "mean_abs_diff": float(np.mean(np.abs(np.subtract(a, b)))), "max_abs_diff": float(np.max(np.abs(np.subtract(a, b)))),
        "paired": paired_comparison(a, b),
        "per_subject": {s: {"steps": (mine[s]["best_step"], theirs[s]["best_step"]), "quality": (x, y)}
                        for s, x, y in zip(subjects, a, b)},
    }  # fmt: skip


def format_agreement(agreement: dict[str, Any]) -> str:
    p = agreement["paired"]
    return (
        f"Selection agreement, {agreement['method']} against {agreement['reference']} (same training): the same "
        f"step for {agreement['same_step']}/{agreement['subjects']} subjects; {agreement['quality']} of the chosen "
        f"model differs by {agreement['mean_abs_diff']:.3f} on average (at most {agreement['max_abs_diff']:.3f}); "
        f"paired difference {p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
        f"{' (the interval excludes 0)' if p['excludes_zero'] else ''}, wins / ties / losses "
        f"{p['wins']} / {p['ties']} / {p['losses']}."
    )


REPO_ROOT = Path(__file__).resolve().parents[1]


def portable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments with paths inside this repository written relative to it (no checkout's path)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, str) and Path(v).is_absolute() and Path(v).resolve().is_relative_to(REPO_ROOT):
            v = str(Path(v).resolve().relative_to(REPO_ROOT))
        out[k] = v
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """A markdown table: mean over subjects with its 95% bootstrap interval."""
    head = ["method", "n", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["label"], str(s["subjects"])]
        for k in METRICS:
            v, ci = s[k], s.get(f"{k}_ci")
            if v is None:
                cells.append("–")
            elif k == "wall_s":
                cells.append(f"{v[0]:.0f} ± {v[1]:.0f}")
            else:
                cells.append(f"{v[0]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v[0]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_comparison(summary: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """A markdown table: each method minus DreamBooth on the same subjects (mean, 95% interval, wins / n);
    a difference is marked * when its interval excludes 0."""
    lines = ["| method vs DreamBooth | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for s in summary:
        comparison = s.get("vs_dreambooth")
        if not comparison:
            continue
        cells = []
        for k in keys:
            c = comparison.get(k)
            cells.append(
                "–" if c is None else f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
                f"{'*' if c['excludes_zero'] else ''}, wins {c['wins']}/{c['subjects']}"
            )
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


AXIS_LABELS = {
    "identity_acc": "identity accuracy (the image shows the subject)",
    "context_acc": "context accuracy (the image shows the prompt's context)",
    "dino": "DINO (subject fidelity)",
    "clip_i": "CLIP-I (subject fidelity)",
    "clip_t": "CLIP-T (prompt fidelity)",
}


def tradeoff_plot(summary: list[dict[str, Any]], x_key: str, y_key: str, size=(1100, 600)) -> Image.Image:
    """Scatter of the methods' means over subjects: subject fidelity (x) against prompt fidelity (y), one
    labelled point per method (the spread over subjects is in the table; as bars it hid the labels)."""
    from rpo_diffusers.plots import scatter_plot

    shown = [s for s in summary if s.get(x_key) and s.get(y_key)]
    return scatter_plot(
        [(s[x_key][0], s[y_key][0], s["label"]) for s in shown],
        title=f"{y_key} against {x_key} (mean over {max((s['subjects'] for s in shown), default=0)} subjects)",
        xlabel=AXIS_LABELS.get(x_key, x_key),
        ylabel=AXIS_LABELS.get(y_key, y_key),
        size=size,
    )


def subject_grid(
    subject: str, rows: list[tuple[str, list[Image.Image]]], prompts: Sequence[str], cell: int = 128
) -> Image.Image:
    """One row per method (its name and numbers on the left), one column per held-out prompt."""
    from rpo_diffusers.plots import labeled_grid

    n = max(len(ims) for _, ims in rows)
    return labeled_grid(
        [ims for _, ims in rows],
        row_labels=[label for label, _ in rows],
        col_labels=list(prompts)[:n],
        title=f"{subject}: the first held-out image per prompt, per method (same seeds)",
        cell_size=cell,
    )


def row_label(label: str, row: dict[str, Any] | None, toy: bool) -> str:
    """A method's name plus the subject's numbers for it, so the grid reads without the table."""
    if not row:
        return label
    keys = ("identity_acc", "context_acc") if toy else ("dino", "clip_t")
    numbers = ", ".join(
        f"{k.replace('_acc', '')} {float(row[k]):.2f}" for k in keys if row.get(k) is not None
    )
    step = f", step {row['best_step']}" if row.get("best_step") is not None else ""
    return f"{label}\n{numbers}{step}"


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from rpo_diffusers.toy.models import DEFAULT_EVALUATOR, DEFAULT_SCORER, EVALUATORS, SAMPLING, asset_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="benchmark-methods")
    p.add_argument("--quick", action="store_true", help="one subject, 3 methods, few steps: a smoke test")
    p.add_argument("--methods", nargs="*", default=None, choices=[m.name for m in METHODS])
    p.add_argument("--subjects", nargs="*", default=None, help="subject names (default: all)")
    p.add_argument("--dreambench_dir", default=None, help="DreamBench folder; default: the bundled toy world")
    p.add_argument("--model", default=None, help="Stable Diffusion pipeline (default: the toy world's)")
    p.add_argument("--scorer", default=None, help="λ-harmonic dual encoder (default: the toy world's)")
    p.add_argument("--dino", default=None, help="DINO ViT for evaluation (default: the toy world's)")
    p.add_argument("--clip", default=None, help="CLIP for evaluation (default: the toy world's)")
    p.add_argument(
        "--dpg_reward_model",
        default=None,
        help="image model of dpg_image's reward; never the evaluation DINO (default: facebook/dino-vits16, "
        "on the toy world the scorer's image tower)",
    )
    p.add_argument("--identifier", default="sks")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--validation_steps", type=int, default=40)
    p.add_argument(
        "--learning_rate", type=float, default=None, help="default: 1e-4 on the toy world, else RPO's"
    )
    p.add_argument("--use_lora", action="store_true")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument(
        "--validation_num_inference_steps", type=int, default=None,
        help="validation sampling steps (DPM-Solver++, RPOConfig's default); default: its 20, or fewer when "
        "--num_inference_steps is fewer",
    )  # fmt: skip
    p.add_argument("--images_per_prompt", type=int, default=4, help="base-model training images per prompt")
    p.add_argument("--num_validation_images", type=int, default=4, help="per training prompt (the paper's 4)")
    p.add_argument("--num_class_images", type=int, default=50, help="prior preservation's class images")
    p.add_argument("--num_eval_images", type=int, default=16, help="images per held-out prompt")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per job (1 is fastest on a shared CPU)"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="subjects run in parallel processes (e.g. 2 on 2 cores)"
    )
    p.add_argument("--keep_models", action="store_true", help="keep every run's exported weights")
    p.add_argument(
        "--resume", action="store_true", help="keep the finished runs in --output_dir, run the rest"
    )
    args = p.parse_args(argv)
    args.toy = args.dreambench_dir is None
    if args.toy:
        args.model = args.model or str(asset_path("sd"))
        args.scorer = args.scorer or str(asset_path(DEFAULT_SCORER))
        args.dpg_reward_model = args.dpg_reward_model or args.scorer
        args.dino = args.dino or str(asset_path(EVALUATORS[DEFAULT_EVALUATOR][0]))
        args.clip = args.clip or str(asset_path(EVALUATORS[DEFAULT_EVALUATOR][1]))
        args.classifier = str(asset_path("classifier"))
        args.resolution = args.resolution or SAMPLING["resolution"]
        args.num_inference_steps = args.num_inference_steps or SAMPLING["num_inference_steps"]
        args.guidance_scale = args.guidance_scale or SAMPLING["guidance_scale"]
        if args.learning_rate is None and not args.use_lora:
            args.learning_rate = 1e-4  # the 1M-parameter toy UNet needs more than SD's 5e-6
    else:
        args.dpg_reward_model = args.dpg_reward_model or "facebook/dino-vits16"
        missing = [k for k in ("model", "scorer", "dino", "clip") if getattr(args, k) is None]
        if missing:
            p.error(f"with --dreambench_dir, also give --{' --'.join(missing)} (hub ids or local folders)")
        args.resolution = args.resolution or 512
        args.num_inference_steps = args.num_inference_steps or 50
        args.guidance_scale = args.guidance_scale or 7.5
    args.validation_num_inference_steps = args.validation_num_inference_steps or min(
        args.num_inference_steps, FAST_VALIDATION["validation_num_inference_steps"]
    )
    if args.quick:  # enough steps for the toy subject to appear, few images
        args.subjects = args.subjects or (["redblue_ball"] if args.toy else None)
        args.methods = args.methods or ["base", "dreambooth", "rpo_lambda0.5"]
        args.max_train_steps, args.validation_steps = (
            min(args.max_train_steps, 120),
            min(args.validation_steps, 40),
        )
        args.images_per_prompt, args.num_validation_images = 2, 1
        args.num_eval_images, args.num_class_images = 2, 8
    return args


_JUDGES: Judges | None = None


def run_subject(
    args: argparse.Namespace, subject: BenchSubject, methods: Sequence[Method]
) -> list[dict[str, Any]]:
    """Every method on one subject: one result row each (with its validation history), and the subject's grid."""
    global _JUDGES
    torch.set_num_threads(args.threads)
    if _JUDGES is None:
        _JUDGES = load_judges(args)
    out = Path(args.output_dir)
    wanted = {m.name for m in methods}
    rows = []
    evaluated: dict[str, tuple[dict[str, float], Path]] = {}  # weights digest -> scores, the method's strip
    for method, readers in training_runs(methods):
        run_dir = out / "runs" / subject.name / method.name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        results = train_and_load(args, subject, method, run_dir, readers)
        for name, (pipe, info) in results.items():
            if name not in wanted:  # trained only for its readers
                continue
            strip = run_dir.parent / f"{name}.png"
            digest = weights_digest(pipe)
            if digest in evaluated:  # the same weights (e.g. two selections of one step): the same seeded images
                scores, seen = evaluated[digest]
                shutil.copyfile(seen, strip)
            else:
                images = generate_images(
                    pipe, subject.eval_prompts, args.num_eval_images, seed=args.seed, resolution=args.resolution,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                )  # fmt: skip
                scores = _JUDGES.score(subject.references, images, subject.name, subject.toy)
                make_image_grid([ims[0] for ims in images.values()], rows=1).save(strip)
                evaluated[digest] = (scores, strip)
            row = {"subject": subject.name, "method": name, "best_step": info["best_step"], **scores}
            row["wall_s"] = info["wall_s"]
            row["history"] = info["history"]
            rows.append(row)
            shown = ", ".join(f"{k} {row[k]:.3f}" for k in METRICS if k in row and k != "wall_s")
            print(f"{subject.name:>18} {name:>16}: {shown}, chosen step {info['best_step']}, "
                  f"{info['wall_s']:.0f}s", flush=True)  # fmt: skip
        del results
        if not args.keep_models:
            for name in (method.name, *(m.name for m in readers)):
                for f in (run_dir.parent / name).rglob("*.safetensors"):
                    f.unlink()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = (
        toy_subjects(args.subjects)
        if args.toy
        else dreambench_subjects(Path(args.dreambench_dir), args.subjects, args.identifier)
    )
    check_shared_runs()
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    print(
        f"{len(subjects)} subjects x {len(methods)} methods, {args.jobs} job(s); results in {out}", flush=True
    )
    rows: list[dict[str, Any]] = load_previous(out) if args.resume else []
    done = {(r["subject"], r["method"]) for r in rows}
    todo = [(s, [m for m in methods if (s.name, m.name) not in done]) for s in subjects]
    todo = [(s, ms) for s, ms in todo if ms]
    csv_path = out / "results.csv"
    t_start = time.perf_counter()
    if args.jobs > 1:  # one process per subject at a time (spawn: no forked torch state)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_subject, args, s, ms) for s, ms in todo]
            for future in as_completed(futures):
                rows += future.result()
                write_csv(csv_path, rows)
    else:
        for subject, ms in todo:
            rows += run_subject(args, subject, ms)
            write_csv(csv_path, rows)
    names = [m.name for m in METHODS]
    rows.sort(key=lambda r: (r["subject"], names.index(r["method"])))
    write_csv(csv_path, rows)
    methods = [m for m in METHODS if any(r["method"] == m.name for r in rows)]
    for subject in subjects:  # one grid per subject: references, then a row per method, one image per prompt
        grid_rows = [("references", subject.references[: len(subject.eval_prompts)])]
        by_method = {r["method"]: r for r in rows if r["subject"] == subject.name}
        for m in methods:
            path = out / "runs" / subject.name / f"{m.name}.png"
            if path.exists():
                strip = Image.open(path).convert("RGB")
                w = strip.width // len(subject.eval_prompts)
                grid_rows.append((row_label(m.label, by_method.get(m.name), args.toy),
                                  [strip.crop((i * w, 0, (i + 1) * w, strip.height))
                                   for i in range(len(subject.eval_prompts))]))  # fmt: skip
        (out / "grids").mkdir(exist_ok=True)
        grid = subject_grid(subject.name, grid_rows, subject.eval_prompts)
        grid.save(out / "grids" / f"{subject.name}.png")
    summary = summarize(rows, methods)
    compared = ("identity_acc", "context_acc", "lambda_harmonic") if args.toy else ("dino", "clip_i", "clip_t")
    table = format_table(summary) + "\n\n" + format_comparison(summary, compared)
    agreements = [a for pair in SELECTION_PAIRS if (a := selection_agreement(rows, *pair, toy=args.toy))]
    for agreement in agreements:
        table += "\n\n" + format_agreement(agreement)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    runs = {
        f"{r['subject']}/{r['method']}": {"best_step": r["best_step"], "history": r.get("history", [])}
        for r in rows
    }
    (out / "summary.json").write_text(
        json.dumps({"args": portable_args(args), "summary": summary, "selection_agreement": agreements,
                    "runs": runs}, indent=2)
    )
    x_key, y_key = ("identity_acc", "context_acc") if args.toy else ("dino", "clip_t")
    tradeoff_plot(summary, x_key, y_key).save(out / "tradeoff.png")
    print(
        f"wrote {csv_path}, {out / 'table.md'}, {out / 'summary.json'}, {out / 'tradeoff.png'}, {out / 'grids'}/"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def load_previous(out: Path) -> list[dict[str, Any]]:
    """The rows (and validation histories) of an earlier, possibly interrupted, run in the same folder."""
    path = out / "results.csv"
    if not path.exists():
        return []
    runs = {}
    if (out / "summary.json").exists():
        runs = json.loads((out / "summary.json").read_text()).get("runs", {})
    rows = []
    with path.open() as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {"subject": raw["subject"], "method": raw["method"]}
            row["best_step"] = int(raw["best_step"]) if raw["best_step"] else None
            row.update({k: float(raw[k]) for k in METRICS if raw.get(k)})
            row["history"] = runs.get(f"{raw['subject']}/{raw['method']}", {}).get("history", [])
            rows.append(row)
    print(f"resuming: {len(rows)} finished runs in {path}", flush=True)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewritten after every run, so an interrupted benchmark keeps what it measured."""
    keys = ["subject", "method", "best_step", *METRICS]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                                 else r[k]) for k in keys})  # fmt: skip
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
