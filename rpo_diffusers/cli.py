"""The ``rpo-diffusers`` command: ``score``, ``evaluate`` and ``demo``.

Thin argument parsing only; the work is done by ``rewards``, ``metrics`` and ``demo``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .data import list_image_files, load_image, load_image_folder
from .errors import run_cli
from .prompts import DEFAULT_IDENTIFIER

DEFAULT_SCORER = "kakaobrain/align-base"
DEFAULT_DINO = (
    "facebook/dino-vits16"  # = metrics.DEFAULT_DINO / DEFAULT_CLIP; not imported, so --help is fast
)
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default (not None / False) that the
    help does not state already; argparse's own formatter also prints "(default: None)" everywhere."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            any(action.default is v for v in (None, False, argparse.SUPPRESS))  # 0 is a real default
            or "(default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _print_table(rows: list[dict], columns: Sequence[str], file=None) -> None:
    file = file or sys.stdout

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=file)
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns), file=file)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cmd_score(args: argparse.Namespace) -> int:
    from .hub import resolve_model

    if not args.prompt.strip():
        raise ValueError('--prompt is empty: give the prompt the images were made for, e.g. "a sks dog on the Moon".')

    model = resolve_model(args.model, "scorer")  # an unreachable hub id fails before torch even loads
    from .rewards import LambdaHarmonicScorer

    refs = load_image_folder(args.references)
    files = list_image_files(args.images)
    if not files:
        raise ValueError(
            f"No images found in {args.images!r}: put the images to score there (PNG, JPEG, WebP, ...)."
        )
    scorer = LambdaHarmonicScorer.from_pretrained(
        model,
        lambda_=args.lambda_,
        device=args.device,
        batch_size=args.batch_size,
        identifier=args.identifier,
    )
    scorer.set_reference_images(refs)
    result = scorer.score([load_image(f) for f in files], args.prompt)
    rows = [
        {"image": f.name, **{k: v for k, v in r.items() if k != "prompt"}}
        for f, r in zip(files, result.to_rows())
    ]
    rows.append(
        {
            "image": "mean",
            "align_i": float(result.image_alignment.mean()),
            "align_t": float(result.text_alignment.mean()),
            "reward": float(result.reward.mean()),
        }
    )
    print(f"prompt (identifier removed): {result.prompts[0]!r}   λ = {result.lambda_}")
    _print_table(rows, ["image", "align_i", "align_t", "reward"])
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


def _prompt_folders(subject_dir: Path) -> dict[str, list[Path]]:
    """``<subject>/<prompt>/*.png``; the prompt is ``prompt.txt`` when present, else the folder name."""
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
        files = list_image_files(d)
        if not files:
            continue
        txt = d / "prompt.txt"
        prompt = txt.read_text(encoding="utf-8").strip() if txt.exists() else d.name.replace("_", " ")
        out[prompt] = files
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .hub import resolve_model

    dino, clip = resolve_model(args.dino_model, "DINO model"), resolve_model(args.clip_model, "CLIP model")
    from .metrics import DreamBenchEvaluator, mean_scores

    images_root, refs_root = Path(args.images), Path(args.references)
    subjects = sorted(p.name for p in images_root.iterdir() if p.is_dir()) if images_root.is_dir() else []
    if args.subjects:
        subjects = [s for s in subjects if s in set(args.subjects)]
    if not subjects:
        raise ValueError(
            f"No subject folders found in {str(images_root)!r}: expected IMAGES/<subject>/<prompt>/*.png."
        )
    evaluator = DreamBenchEvaluator.from_pretrained(
        dino=dino, clip=clip, identifier=args.identifier, device=args.device
    )
    results, baselines = [], []
    for subject in tqdm(subjects, desc="subjects"):
        refs = load_image_folder(refs_root / subject)
        by_prompt = {
            p: [load_image(f) for f in fs] for p, fs in _prompt_folders(images_root / subject).items()
        }
        if not by_prompt:
            raise ValueError(f"No prompt folders with images under {str(images_root / subject)!r}.")
        results.append(evaluator.evaluate_subject(by_prompt, refs, subject=subject))
        if len(refs) > 1:
            baselines.append(evaluator.reference_baseline(refs))
    rows = [{"subject": r.subject, "dino": r.dino, "clip_i": r.clip_i, "clip_t": r.clip_t} for r in results]
    overall = {"subject": "mean", **mean_scores(results)}
    rows.append(overall)
    if baselines:
        rows.append(
            {
                "subject": "reference images",
                "dino": sum(b["dino"] for b in baselines) / len(baselines),
                "clip_i": sum(b["clip_i"] for b in baselines) / len(baselines),
                "clip_t": "",
            }
        )
    _print_table(rows, ["subject", "dino", "clip_i", "clip_t"])
    out = Path(args.output_dir or images_root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dreambench_metrics.json").write_text(
        json.dumps({"overall": overall, "subjects": [r.to_dict() for r in results], "table": rows}, indent=2),
        encoding="utf-8",
    )
    per_prompt = [{"subject": r.subject, **p.__dict__} for r in results for p in r.prompts]
    _write_csv(out / "dreambench_metrics.csv", per_prompt)
    print(f"wrote {out / 'dreambench_metrics.json'} and {out / 'dreambench_metrics.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_arguments

    parser = argparse.ArgumentParser(prog="rpo-diffusers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fmt = DefaultsHelpFormatter  # --help shows every default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p = sub.add_parser(
        "score", help="λ-harmonic reward of a folder of images against reference photos", formatter_class=fmt, parents=[common]
    )
    p.add_argument("--references", required=True, help="folder with the subject's reference photos")
    p.add_argument("--images", required=True, help="folder with the images to score")
    p.add_argument("--prompt", required=True, help='prompt with the identifier, e.g. "a sks dog on the Moon"')
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.5, help="λ in [0, 1]")
    p.add_argument(
        "--model",
        "--scorer",
        dest="model",
        default=DEFAULT_SCORER,
        help="ALIGN/CLIP/SigLIP: hub id, local folder, or 'toy-scorer-domain' (the bundled stand-in)",
    )
    p.add_argument(
        "--identifier", default=DEFAULT_IDENTIFIER, help="identifier token removed before the text tower"
    )
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    p.add_argument("--output", default=None, help="optional JSON file for the table")
    p.set_defaults(func=cmd_score)

    e = sub.add_parser(
        "evaluate", help="DreamBench DINO / CLIP-I / CLIP-T of generated images", formatter_class=fmt, parents=[common]
    )
    e.add_argument(
        "--images", required=True, help="IMAGES/<subject>/<prompt>/*.png (prompt.txt overrides the name)"
    )
    e.add_argument(
        "--references", required=True, help="REFS/<subject>/*.jpg, e.g. the DreamBench dataset folder"
    )
    e.add_argument("--subjects", nargs="*", default=None, help="only these subjects (default: all)")
    e.add_argument(
        "--dino_model",
        "--dino",
        dest="dino_model",
        default=DEFAULT_DINO,
        help="DINO ViT: hub id, local folder, or 'toy-dino-domain' (the bundled stand-in)",
    )
    e.add_argument(
        "--clip_model",
        "--clip",
        dest="clip_model",
        default=DEFAULT_CLIP,
        help="CLIP for CLIP-I / CLIP-T: hub id, local folder, or 'toy-clip-domain' (the bundled stand-in)",
    )
    e.add_argument("--identifier", default=DEFAULT_IDENTIFIER, help="identifier token removed from prompts")
    e.add_argument("--device", default="cpu", help="e.g. cuda, cpu")
    e.add_argument("--output_dir", default=None, help="where to write JSON and CSV (default: --images)")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser(
        "demo", help="run RPO on the bundled default subject and models (no download)", formatter_class=fmt, parents=[common]
    )
    add_demo_arguments(d)
    return parser


def _quiet_loading_bars() -> None:
    """Without a terminal, per-file "Loading weights" bars only flood the log; training bars stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        _quiet_loading_bars()
    return run_cli(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
