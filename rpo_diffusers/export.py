"""Writing results where users load them: diffusers folders, LoRA (diffusers + kohya), model card, Hub.

Every writer goes through :func:`atomic_output_dir`, so a crash or a full disk in the middle of a save
never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FULL_UNET_FILENAME = "rpo_unet.safetensors"
LORA_DIFFUSERS_FILENAME = "pytorch_lora_weights.safetensors"
LORA_KOHYA_FILENAME = "rpo_lora_kohya.safetensors"
SAFE_SUFFIXES = (".safetensors",)


class ExportError(RuntimeError):
    """A save failed; the message says what is left on disk."""


# A failed write: OSError from Python, SafetensorError from safetensors' Rust writer (not an OSError).
WRITE_ERRORS = (OSError, SafetensorError)


def describe_write_error(err: BaseException) -> str:
    """A failed write in a few words: 'the disk is full' for ENOSPC (from Python or safetensors' Rust)."""
    text = str(err)
    full = getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text
    return "the disk is full" if full else text


def _write_failure(target: Path, err: BaseException, what: str = "the previous content there") -> ExportError:
    return ExportError(f"Saving to {str(target)!r} failed ({describe_write_error(err)}); {what} is intact.")


@contextmanager
def atomic_output_dir(final_dir: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final_dir``; on success its content replaces the old output.

    ``merge=False``: the temp folder replaces ``final_dir`` in one rename. ``merge=True``: ``final_dir`` keeps
    unrelated content (checkpoints, logs) and each top-level entry written here replaces its namesake; if any
    rename fails, every entry is rolled back. On any error the temp folder is removed and ``final_dir`` is
    left as it was; a failed write (full disk, I/O error) is re-raised as :class:`ExportError` naming
    ``final_dir`` and saying the previous output is intact.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except (*WRITE_ERRORS, ExportError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(final, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if merge and final.is_dir():
            _merge_into(tmp, final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(final, err) from err


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it; the old ``dst`` is moved aside first and restored on failure."""
    old = _aside(dst)
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old.exists():
            os.replace(old, dst)
        raise
    _remove(old)


def _merge_into(src_dir: Path, dst_dir: Path) -> None:
    """Move every entry of ``src_dir`` into ``dst_dir``; all-or-nothing (rolled back if a rename fails)."""
    moved_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for entry in sorted(src_dir.iterdir()):
            dst = dst_dir / entry.name
            if dst.exists() or dst.is_symlink():
                old = _aside(dst)
                os.replace(dst, old)
                moved_aside.append((old, dst))
            os.replace(entry, dst)
            placed.append(dst)
    except OSError:
        for dst in placed:
            _remove(dst)
        for old, dst in reversed(moved_aside):
            os.replace(old, dst)
        raise
    for old, _ in moved_aside:
        _remove(old)


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.save_file`` to a temp name, then ``os.replace``: readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    except WRITE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise _write_failure(target, err, "any previous file there") from err
    return target


def load_safetensors_only(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load weights from a ``.safetensors`` file; refuse pickle formats (.bin/.pt/.ckpt) from untrusted paths."""
    p = Path(path)
    if p.suffix.lower() not in SAFE_SUFFIXES:
        raise ValueError(
            f"Refusing to load {str(p)!r}: only .safetensors files are loaded (pickle formats such as .bin, .pt and "
            ".ckpt can run code). Convert it with safetensors first."
        )
    if not p.is_file():
        raise FileNotFoundError(f"Weights file {str(p)!r} does not exist.")
    return load_file(str(p))


# --------------------------------------------------------------------------------------------------
# Full fine-tuning
# --------------------------------------------------------------------------------------------------


def use_classic_text_encoder_keys(folder: str | os.PathLike) -> None:
    """Rewrite a saved CLIP text encoder with the ``text_model.`` key prefix of real SD checkpoints.

    transformers 5 saves a ``CLIPTextModel`` built in code without the prefix; transformers 4 then loads
    such a file as *random* weights (with only a warning), and ComfyUI's loaders expect the prefix too.
    Every transformers version reads the prefixed layout, so that is what we write.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if not {"CLIPTextModel", "CLIPTextModelWithProjection"} & set(config.get("architectures") or []):
        return
    for path in folder.glob("*.safetensors"):
        state = load_file(str(path))
        classic = {
            k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items()
        }
        if classic.keys() != state.keys():
            save_file(classic, str(path), metadata={"format": "pt"})


def write_bpe_vocab_files(folder: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` beside a BPE ``tokenizer.json`` when they are missing.

    transformers 5 saves only ``tokenizer.json``; the ``CLIPTokenizer`` class a Stable Diffusion
    ``model_index.json`` names is, in transformers 4, the slow tokenizer, which needs the two vocabulary
    files (real SD repositories have them).
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_text_files_portable(pipeline_dir: str | os.PathLike) -> None:
    """Make a saved pipeline's text encoder and tokenizer load under transformers 4 as well as 5."""
    pipeline_dir = Path(pipeline_dir)
    for sub in ("text_encoder", "text_encoder_2"):
        if (pipeline_dir / sub).is_dir():
            use_classic_text_encoder_keys(pipeline_dir / sub)
    for sub in ("tokenizer", "tokenizer_2"):
        if (pipeline_dir / sub).is_dir():
            write_bpe_vocab_files(pipeline_dir / sub)


def save_full_model(pipeline, output_dir: str | os.PathLike, unet=None) -> dict[str, str]:
    """A ``from_pretrained``-loadable pipeline folder plus the UNet as one diffusers-format file.

    ``rpo_unet.safetensors`` is what ComfyUI's UNETLoader takes from ``models/diffusion_models``. A UNet
    wrapped by DDP or ``torch.compile`` is unwrapped first; one that still carries LoRA adapters is refused
    (its keys would not load as a plain UNet): save it with :func:`save_lora_model`.
    """
    from accelerate.utils import extract_model_from_parallel

    unet = extract_model_from_parallel(unet if unet is not None else pipeline.unet, keep_torch_compile=False)
    if getattr(unet, "peft_config", None):
        raise ValueError(
            f"The UNet carries LoRA adapters ({sorted(unet.peft_config)}): export them with save_lora_model(), or "
            "merge them into the weights first (unet.fuse_lora()) to save a full model."
        )
    pipeline.unet = unet
    out = Path(output_dir)
    with atomic_output_dir(out, merge=True) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        make_text_files_portable(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}, str(tmp / FULL_UNET_FILENAME),
                  metadata={"format": "diffusers-unet"})  # fmt: skip
    return {"pipeline": str(out), "unet": str(out / FULL_UNET_FILENAME)}


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def peft_to_kohya_state_dict(
    peft_state_dict: Mapping[str, torch.Tensor],
    alpha: float,
    prefix: str = "lora_unet",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT LoRA weights (``<module>.lora_A.weight`` / ``lora_B``) -> kohya keys ComfyUI and A1111 read.

    ``<prefix>_<module path with . as _>.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and
    ``.alpha`` = the real ``lora_alpha`` (diffusers' converter writes the rank there, which rescales the LoRA).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state_dict.items():
        for peft_part, kohya_part in (
            (".lora_A.weight", "lora_down.weight"),
            (".lora_B.weight", "lora_up.weight"),
        ):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                for strip in ("base_model.model.", "unet."):
                    module = module.removeprefix(strip)
                name = f"{prefix}_{module.replace('.', '_')}"
                out[f"{name}.{kohya_part}"] = value.detach().to(dtype or value.dtype).cpu().contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
                break
        else:
            raise ValueError(
                f"Unexpected key {key!r} in a PEFT LoRA state dict (expected lora_A / lora_B weights)."
            )
    return out


def kohya_lora_delta(kohya: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """W_delta = (alpha / rank) * up @ down for one kohya module (how every kohya loader applies it)."""
    down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
    alpha = float(kohya[f"{name}.alpha"])
    rank = down.shape[0]
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1))


def lora_metadata(rank: int, alpha: float, target_modules: Sequence[str]) -> dict[str, str]:
    """Safetensors metadata in kohya's convention plus an ``rpo`` JSON entry."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "rpo": json.dumps({"rank": rank, "alpha": alpha, "target_modules": list(target_modules)}),
    }


def text_encoder_lora_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's PEFT LoRA weights under real SD checkpoints' module paths.

    transformers 5 flattens ``CLIPTextModel`` (no ``text_model.``); ComfyUI's ``lora_te_text_model_*`` mapping and
    older diffusers / transformers expect the prefix, and diffusers strips it again where the model has none.
    """
    from peft.utils import get_peft_model_state_dict

    return {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in get_peft_model_state_dict(text_encoder).items()
    }


PORTABLE_LORA_FIELDS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "bias", "use_dora", "init_lora_weights",
)  # fmt: skip


def portable_adapter_metadata(config) -> dict[str, Any]:
    """The LoraConfig fields diffusers rebuilds the adapter from, and no more.

    ``LoraConfig.to_dict()`` of a new peft lists fields an older peft rejects (``LoraConfig(**metadata)`` fails
    in diffusers' loader), so a LoRA saved with peft 0.21 would not load with peft 0.15.
    """
    meta = {k: v for k, v in config.to_dict().items() if k in PORTABLE_LORA_FIELDS}
    meta["lora_alpha"] = float(config.lora_alpha)
    if isinstance(meta.get("target_modules"), set):
        meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def kohya_text_encoder_prefixes(count: int) -> list[str]:
    """kohya's text-encoder key prefixes: ``lora_te`` for SD's one encoder, ``lora_te1`` / ``lora_te2`` for
    SDXL's two (what ComfyUI's LoraLoader and A1111 map to CLIP-L and CLIP-G)."""
    return ["lora_te"] if count == 1 else [f"lora_te{i + 1}" for i in range(count)]


def save_lora_model(
    pipeline,
    unet,
    output_dir: str | os.PathLike,
    lora_alpha: float | None = None,
    kohya_dtype: torch.dtype = torch.float16,
    text_encoder=None,
    text_encoders: Sequence[Any] = (),
) -> dict[str, str]:
    """``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out)``) + a kohya file for ComfyUI/A1111.

    With text encoders carrying LoRA adapters (``text_encoder``, or ``text_encoders`` in the pipeline's order:
    SDXL's two) their LoRA goes into both files too: diffusers' ``text_encoder.*`` / ``text_encoder_2.*``
    keys, and kohya's ``lora_te_*`` (SD) or ``lora_te1_*`` / ``lora_te2_*`` (SDXL) keys that ComfyUI's
    LoraLoader applies to CLIP. The pipeline's class writes the diffusers file (SD or SDXL layout).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"]
    alpha = float(config.lora_alpha)
    if lora_alpha is not None and float(lora_alpha) != alpha:
        raise ValueError(
            f"lora_alpha={lora_alpha} differs from the adapter's own lora_alpha={alpha}, which the weights were trained "
            "with; exporting it would rescale the LoRA. Leave lora_alpha unset."
        )
    peft_sd = get_peft_model_state_dict(unet)
    if not peft_sd:
        raise ValueError("The UNet has no LoRA adapters to save: was add_lora() called?")
    targets = (
        sorted(config.target_modules)
        if not isinstance(config.target_modules, str)
        else [config.target_modules]
    )
    kohya = peft_to_kohya_state_dict(peft_sd, alpha, dtype=kohya_dtype)
    text_kwargs: dict[str, Any] = {}
    encoders = [*([text_encoder] if text_encoder is not None else []), *text_encoders]
    for i, (encoder, prefix) in enumerate(zip(encoders, kohya_text_encoder_prefixes(len(encoders)))):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        text_config = encoder.peft_config["default"]
        text_sd = text_encoder_lora_state_dict(encoder)
        if not text_sd:
            raise ValueError(f"The {name} has no LoRA adapters to save.")
        text_kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(text_sd)
        text_kwargs[f"{name}_lora_adapter_metadata"] = portable_adapter_metadata(text_config)
        kohya.update(
            peft_to_kohya_state_dict(text_sd, float(text_config.lora_alpha), prefix=prefix, dtype=kohya_dtype)
        )
    # the pipeline's class knows its layout (SDXL: text_encoder_2); anything else writes SD's
    writer = type(pipeline) if hasattr(pipeline, "save_lora_weights") else StableDiffusionPipeline
    out = Path(output_dir)
    with atomic_output_dir(out, merge=True) as tmp:
        adapter_meta = portable_adapter_metadata(config)
        writer.save_lora_weights(
            save_directory=tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(peft_sd),
            safe_serialization=True,
            unet_lora_adapter_metadata=adapter_meta,
            **text_kwargs,
        )
        atomic_save_file(kohya, tmp / LORA_KOHYA_FILENAME, metadata=lora_metadata(config.r, alpha, targets))
    return {"lora": str(out / LORA_DIFFUSERS_FILENAME), "kohya": str(out / LORA_KOHYA_FILENAME)}


# --------------------------------------------------------------------------------------------------
# Model card and the Hub
# --------------------------------------------------------------------------------------------------


METHOD_CARD_TEXT = {
    "rpo": ("RPO", "Reward Preference Optimization (Miao et al., NeurIPS 2024)"),
    "dreambooth": ("DreamBooth", "DreamBooth (Ruiz et al., CVPR 2023)"),
    "dpg": ("DPG", "DPG, look-forward reward with a learned critic (Wei et al., ECCV 2024)"),
}


def hub_base_model(base_model: str | os.PathLike | None) -> str | None:
    """The Hub id of the base model, or ``None`` when it is a local folder (or unknown).

    The Hub rejects a path as ``base_model`` metadata, and a path on the trainer's disk means nothing to
    the card's readers; an existing folder, a bundled short name (``toy-sd``) or anything that is not
    ``org/name`` is not an id.
    """
    import re

    if base_model is None:
        return None
    text = os.fspath(base_model)
    if text in ("", "unknown") or os.path.exists(os.path.expanduser(text)):
        return None
    return text if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) else None


def _is_toy_model(base_model: str | os.PathLike | None) -> bool:
    """The bundled toy Stable Diffusion (by path or short name): its card says so and shows its settings."""
    if base_model is None:
        return False
    text = os.fspath(base_model)
    if text == "toy-sd":
        return True
    try:
        from .toy.models import ASSETS_DIR

        return Path(text).expanduser().resolve() == (ASSETS_DIR / "sd").resolve()
    except OSError:
        return False


# per model family: the pipeline class users load the result with, the Hub tags and license of its cards
FAMILY_CARDS = {
    "sd": ("StableDiffusionPipeline", ["stable-diffusion"], "creativeml-openrail-m", "a Stable Diffusion model"),
    "sdxl": ("StableDiffusionXLPipeline", ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"], "openrail++",
             "a Stable Diffusion XL model"),
}  # fmt: skip


def _usage_snippet(
    name: str, base_id: str | None, toy: bool, lora: bool, instance_prompt: str, config: Mapping[str, Any],
    pipeline_class: str = "StableDiffusionPipeline",
) -> str:  # fmt: skip
    """How to load the result: the toy model plainly on a CPU; a real one in half precision on a GPU with a
    float32 CPU fallback (fp16 is not what a CPU runs)."""
    imports = f"from diffusers import {pipeline_class}\n"
    call = f'image = pipe("{instance_prompt} on the beach").images[0]'
    if toy:
        res = int(config.get("resolution") or 32)
        steps = config.get("num_inference_steps")
        extra = f", num_inference_steps={int(steps)}" if steps else ""
        call = f'image = pipe("{instance_prompt} on the beach", height={res}, width={res}{extra}).images[0]'
        if lora:
            load = (
                "from rpo_diffusers.toy import asset_path\n\n"
                f'pipe = {pipeline_class}.from_pretrained(asset_path("sd"))  # the bundled toy model, CPU\n'
                f'pipe.load_lora_weights("{name}")\n'
            )
        else:
            load = f'pipe = {pipeline_class}.from_pretrained("{name}")  # a tiny toy model: CPU, float32\n'
        return f"```python\n{imports}{'' if lora else chr(10)}{load}{call}\n```"
    device = (
        "import torch\n" + imports + "\n"
        'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
        'dtype = torch.float16 if device == "cuda" else torch.float32  # half precision on a GPU; a CPU needs float32\n'
    )
    if lora:
        base = base_id or "path/to/the/base/model"
        comment = "" if base_id else "  # the base model this LoRA was trained on"
        load = (
            f'pipe = {pipeline_class}.from_pretrained("{base}", torch_dtype=dtype).to(device){comment}\n'
            f'pipe.load_lora_weights("{name}")\n'
        )
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{name}", torch_dtype=dtype).to(device)\n'
    return f"```python\n{device}{load}{call}\n```"


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    instance_prompt: str,
    lora: bool,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    sample_images: Sequence[str] | None = None,
    repo_id: str | None = None,
    best_step: int | None = None,
    best_reward: float | None = None,
    method: str = "rpo",
    reward: str | None = None,
    family: str = "sd",
    widget_prompts: Sequence[str] = (),
) -> Path:
    """A diffusers-style ``README.md`` with YAML metadata, usage, settings and the validation history.

    ``method`` ("rpo", "dreambooth", "dpg") and ``reward`` (what trained the model) go into the tags and the text;
    ``family`` ("sd", "sdxl") picks the pipeline class, the family's Hub tags and license; ``widget_prompts``
    become the card's widget entries (the first shows the first sample image), as the Hub's LoRA cards have.
    """
    pipeline_class, family_tags, license_name, family_name = FAMILY_CARDS.get(family, FAMILY_CARDS["sd"])
    tags = [
        "text-to-image",
        "diffusers",
        *family_tags,
        *(["rpo"] if method == "rpo" else []),
        "dreambooth",
        *(["dpg"] if method == "dpg" else []),
        "lora" if lora else "full-finetune",
        *(["template:sd-lora"] if lora else []),
    ]
    base_id = hub_base_model(base_model)
    toy = _is_toy_model(base_model)
    widget = []
    for i, prompt in enumerate(widget_prompts):
        widget.append(f"- text: {json.dumps(prompt)}")
        if i == 0 and sample_images:
            widget += ["  output:", f"    url: {json.dumps(sample_images[0])}"]
    meta_lines = [
        "---",
        *([f"base_model: {json.dumps(base_id)}"] if base_id else []),
        "library_name: diffusers",
        f"license: {license_name}",
        f"instance_prompt: {json.dumps(instance_prompt)}",
        "tags:",
        *[f"- {t}" for t in tags],
        *(["widget:", *widget] if widget else []),
        "inference: true",
        "---",
    ]
    name = repo_id or "path/to/this/folder"
    snippet = _usage_snippet(name, base_id, toy, lora, instance_prompt, config, pipeline_class)
    if lora:
        usage = f"{snippet}\n\nComfyUI / A1111: copy `{LORA_KOHYA_FILENAME}` to `models/loras` and use LoraLoader."
    else:
        usage = f"{snippet}\n\nComfyUI: copy `{FULL_UNET_FILENAME}` to `models/diffusion_models` and use UNETLoader."
    base_name = (
        base_id
        or ("the bundled toy Stable Diffusion (rpo-diffusers `toy-sd`)" if toy else None)
        or (
            f"a local model (`{Path(os.fspath(base_model)).name}`)"
            if base_model and base_model != "unknown"
            else family_name
        )
    )
    settings = "\n".join(
        f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in config.items()
    )
    rows = "\n".join(
        f"| {h.get('step')} | {h.get('reward', float('nan')):.4f} | {h.get('align_i', float('nan')):.4f} | "
        f"{h.get('align_t', float('nan')):.4f} |"
        for h in history
    )
    best = (
        f"\nThe exported weights are from step **{best_step}** (validation reward {best_reward:.4f}).\n"
        if best_step is not None and best_reward is not None
        else ""
    )
    samples = "\n".join(f"![sample]({s})" for s in (sample_images or []))
    method_text = METHOD_CARD_TEXT.get(method, (method, method))
    trained_by = f" Reward: {reward}." if reward else ""
    body = f"""
# {method_text[0]} personalization of {base_name}

Trained with [rpo-diffusers](https://github.com/rpo-diffusers/rpo-diffusers): {method_text[1]},
{"LoRA" if lora else "full UNet"} fine-tuning.{trained_by} The subject is called with `{instance_prompt}`.
{best}
## How to use

{usage}

## Validation history (λ-harmonic reward)

| step | reward | ALIGN-I | ALIGN-T |
|---|---|---|---|
{rows}

{samples}

## Training settings

| setting | value |
|---|---|
{settings}
"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(meta_lines) + "\n" + body, encoding="utf-8")
    return path


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload RPO personalization",
) -> str:
    """Create ``repo_id`` (if needed) and upload the output folder. Failures leave the local folder intact."""
    from huggingface_hub import HfApi

    from .publish import current_result

    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to upload: {str(folder)!r} does not exist.")
    folder = current_result(folder) or folder  # the published result itself (real files, no symlinks)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ExportError(
            f"Cannot push to the Hub: HF_HUB_OFFLINE is set. The local output at {str(folder)!r} is intact; "
            f"upload it later with `hf upload {repo_id} {folder}`."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=["checkpoint-*", "logs/*", "training_images/*", ".*"],
        )
    except Exception as err:  # network errors, 401/403, rate limits: all leave the folder untouched
        raise ExportError(
            f"Pushing {str(folder)!r} to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}). "
            f"The local output is intact; check your token (`hf auth login`) and network, then retry with "
            f"`hf upload {repo_id} {folder}`."
        ) from err
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
