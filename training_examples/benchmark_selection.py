#!/usr/bin/env python
"""Does a faster validation pick the same checkpoint? Selection agreement on the toy world's ground truth.

    python training_examples/benchmark_selection.py --output_dir bench-selection           # 4 toy subjects, CPU
    python training_examples/benchmark_selection.py --output_dir /tmp/s --quick            # smoke test

Each toy subject trains once with benchmark_protocol.py's ``rpo_paper`` settings (the paper's protocol and its
validation, PAPER_VALIDATION: 50 DDIM steps; LoRA); at every validation the same weights are also measured
three more ways:
  fast      the validation reward with FAST_VALIDATION (20 DPM-Solver++ steps: RPOConfig's default)
  reseed    the paper's validation again with other seeds: how much the paper's own choice moves by chance
  truth     the toy world's ground truth on the subject's held-out prompts: identity accuracy (the subject's
            look), context accuracy (the prompt's context) and their harmonic mean ``quality``
The paper's choice is the trainer's (the best paper-validation reward); the fast and reseed choices are the
argmax of their own series over the same steps. Printed per subject: each choice's step and quality; then,
over subjects, how often fast picks the paper's step, the mean |quality(fast) - quality(paper)|, and the same
for reseed, the noise floor any validation lives with. ``selection.json`` has every series.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rpo_diffusers.config import FAST_VALIDATION, PAPER_VALIDATION
from rpo_diffusers.stats import spearman
from rpo_diffusers.toy import ground_truth_quality

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchmark_protocol as protocol  # noqa: E402
from benchmark_methods import toy_subjects  # noqa: E402

RESEED = 104_729  # the reseeded paper validation's seeds: the trainer's seeds shifted by this


class ValidationProbe:
    """At each of the trainer's validations, the fast and reseeded validation rewards and the ground truth
    of the weights being validated (the trainer's own validation and training are untouched)."""

    def __init__(self, trainer, subject, eval_images: int, quick: bool) -> None:
        from rpo_diffusers.toy import SAMPLING, load_classifier

        self.trainer, self.subject, self.eval_images = trainer, subject, eval_images
        self.sampling, self.classifier = dict(SAMPLING), load_classifier()
        self.fast_steps = 1 if quick else FAST_VALIDATION["validation_num_inference_steps"]
        if quick:
            self.sampling["num_inference_steps"] = 2
        self.rows: list[dict[str, Any]] = []

    def _reward(self, steps: int, scheduler: str | None, seed_shift: int, batch: int) -> float:
        cfg, comp = self.trainer.config, self.trainer.components
        prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
        seeds = [cfg.seed + seed_shift + 7919 * (1 + i) for i in range(len(prompts))]
        images = []
        for i in range(0, len(prompts), batch):
            images += comp.generate(prompts[i : i + batch], seeds[i : i + batch], steps, cfg.guidance_scale,
                                    cfg.resolution, **({"scheduler": scheduler} if scheduler else {}))  # fmt: skip
        return float(self.trainer.scorer.score(images, prompts, lambda_=cfg.lambda_val).reward.mean())

    def _truth(self) -> dict[str, float]:
        from rpo_diffusers.toy.models import context_hits, identity_hits

        cfg, comp = self.trainer.config, self.trainer.components
        prompts = [p for p in self.subject.eval_prompts for _ in range(self.eval_images)]
        seeds = [cfg.seed + 31 * i for i in range(len(prompts))]
        images = comp.generate(prompts, seeds, self.sampling["num_inference_steps"],
                               self.sampling["guidance_scale"], cfg.resolution)  # fmt: skip
        identity = float(np.mean(identity_hits(images, self.subject.toy, prompts, self.classifier)))
        context = float(np.mean(context_hits(images, prompts, self.classifier)))
        return {"identity": identity, "context": context, "quality": ground_truth_quality(identity, context)}

    @torch.no_grad()
    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event != "validation":
            return
        cfg, fast = self.trainer.config, FAST_VALIDATION
        n = len(cfg.validation_prompts) * cfg.num_validation_images
        self.rows.append({
            "step": payload["step"], "paper": payload["reward"],
            "fast": self._reward(self.fast_steps, fast["validation_sampling_scheduler"], 0, n),
            "reseed": self._reward(cfg.validation_num_inference_steps, cfg.validation_sampling_scheduler, RESEED, n),
            **self._truth(),
        })  # fmt: skip


def choices(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The step each validation series picks (its first maximum, as the trainer's) and that step's truth."""
    out = {}
    for series in ("paper", "fast", "reseed", "quality"):
        best = rows[int(np.argmax([r[series] for r in rows]))]
        out[series] = {"step": best["step"], **{k: best[k] for k in ("identity", "context", "quality")}}
    return out


def run_subject(args: argparse.Namespace, subject, root: Path) -> dict[str, Any]:
    from rpo_diffusers import RPOConfig, RPOTrainer

    ns = protocol.parse_args(["--quick"] if args.quick else [])
    settings = protocol.project_settings(ns, root / subject.name, "rpo_paper")
    settings.pop("instance_data_dir", None)
    settings.update(class_noun=subject.class_noun, seed=args.seed, report_to="none")
    settings["train_prompts"] = subject.train_prompts[:2] if args.quick else subject.train_prompts
    if args.learning_rate:
        settings["learning_rate"] = args.learning_rate
    trainer = RPOTrainer(RPOConfig(**settings), reference_images=subject.references)
    probe = ValidationProbe(trainer, subject, args.num_eval_images, args.quick)
    trainer.callbacks.append(probe)
    t0 = time.perf_counter()
    result = trainer.train()
    assert result.best_step == choices(probe.rows)["paper"]["step"]  # the probe saw what the trainer chose
    return {"subject": subject.name, "seconds": time.perf_counter() - t0, "validations": probe.rows,
            "choices": choices(probe.rows)}  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of fast and reseed with the paper's choice, over subjects."""
    out: dict[str, Any] = {"runs": len(runs)}
    for other in ("fast", "reseed"):
        same = [r["choices"][other]["step"] == r["choices"]["paper"]["step"] for r in runs]
        gap = [abs(r["choices"][other]["quality"] - r["choices"]["paper"]["quality"]) for r in runs]
        rho = [
            spearman([v["paper"] for v in r["validations"]], [v[other] for v in r["validations"]])
            for r in runs
        ]
        out[other] = {"same_step": f"{sum(same)}/{len(same)}", "mean_abs_quality_gap": float(np.mean(gap)),
                      "max_abs_quality_gap": float(np.max(gap)), "median_spearman": float(np.nanmedian(rho))}  # fmt: skip
    return out


def format_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| subject | paper step (quality) | fast step (quality) | reseed step (quality) | best possible |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        c = r["choices"]
        cells = [f"{c[k]['step']} ({c[k]['quality']:.3f})" for k in ("paper", "fast", "reseed", "quality")]
        lines.append(f"| {r['subject']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="benchmark-selection")
    p.add_argument("--subjects", nargs="*", default=None, help="toy subjects (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning_rate", type=float, default=None, help="default: benchmark_protocol's (1e-4)")
    p.add_argument("--num_eval_images", type=int, default=4, help="images per held-out prompt (ground truth)")
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="one subject, a few steps: a smoke test")
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = toy_subjects(args.subjects or (["redblue_ball"] if args.quick else None))
    if args.quick:
        args.num_eval_images = 1
    runs = []
    for subject in subjects:
        runs.append(run_subject(args, subject, out / "runs"))
        c = runs[-1]["choices"]
        print(f"{subject.name}: paper step {c['paper']['step']}, fast {c['fast']['step']}, "
              f"reseed {c['reseed']['step']} ({runs[-1]['seconds']:.0f}s)", flush=True)  # fmt: skip
        (out / "selection.json").write_text(json.dumps({"runs": runs, "summary": summarize(runs)}, indent=2))
    summary = summarize(runs)
    print("\n" + format_table(runs))
    print(f"\nfast validation {FAST_VALIDATION} against the paper's {PAPER_VALIDATION}: {json.dumps(summary)}")
    print(f"wrote {out / 'selection.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
