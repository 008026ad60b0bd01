"""Where a model name goes before anything loads: bundled short names, local folders, Hub ids.

Every ``--model`` / ``--scorer`` / ``--dino`` / ``--clip`` flag and every ``*_name_or_path`` setting goes
through :func:`resolve_model`, so the same rules hold in every entry point:

- ``toy-sd``, ``toy-scorer``, ``toy-dino``, ``toy-clip``, ``toy-classifier`` are the bundled toy world's
  models (nothing to download);
- a local folder is used as is; a local-looking path that does not exist fails at once, naming it;
- a Hub id is passed on when it is in the local cache; otherwise the Hub is asked once, without retries,
  whether it can be reached. Offline mode (``HF_HUB_OFFLINE=1``) or an unreachable endpoint fails in one
  line saying what could not be downloaded and how to pass a local folder or a bundled model instead,
  instead of huggingface_hub's retries (about 25 s per file) and a long traceback.

:func:`load_pretrained` wraps a ``from_pretrained`` call so that a download that fails later (a repo that
does not exist, a connection that drops) is the same one-line error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# short name -> (toy asset folder, what it stands in for)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "toy-sd": ("sd", "Stable Diffusion"),
    "toy-scorer": ("scorer", "the ALIGN / CLIP scorer"),
    "toy-scorer-domain": ("scorer_domain", "the scorer that has also seen the generator's images"),
    "toy-dino": ("dino_eval", "DINO"),
    "toy-clip": ("clip_eval", "CLIP"),
    "toy-dino-domain": ("dino_eval_domain", "DINO, also trained on the generator's images"),
    "toy-clip-domain": ("clip_eval_domain", "CLIP, also trained on the generator's images"),
    "toy-classifier": ("classifier", "the toy world's attribute classifier"),
}
# what a kind of model is called in messages -> the bundled model suggested instead
KIND_TO_BUNDLED = {
    "base model": "toy-sd",
    "scorer": "toy-scorer-domain",
    "DINO model": "toy-dino-domain",
    "CLIP model": "toy-clip-domain",
}


class ModelNotAvailableError(FileNotFoundError):
    """A model could not be found locally nor downloaded (offline, unreachable Hub, unknown repo).

    A ``FileNotFoundError``, so every front end that reports a missing path reports this in one line too.
    """


def bundled_model_path(name: str) -> Path | None:
    """The folder of a bundled model's short name (``toy-sd`` ...), ``None`` for any other name."""
    entry = BUNDLED_MODELS.get(str(name).strip().lower())
    if entry is None:
        return None
    from .toy.models import asset_path

    return asset_path(entry[0])


def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text


def _alternatives(kind: str | None) -> str:
    suggested = KIND_TO_BUNDLED.get(kind or "")
    bundled = (
        f"the bundled toy model '{suggested}'"
        if suggested
        else "a bundled toy model (" + ", ".join(f"'{n}'" for n in KIND_TO_BUNDLED.values()) + ")"
    )
    return f"Pass a local folder saved with save_pretrained() instead, or {bundled}"


def unavailable_message(repo_id: str, kind: str | None, reason: str) -> str:
    """The one line every entry point prints when a Hub model cannot be had."""
    what = f"the {kind} " if kind else ""
    return f"Could not download {what}{repo_id!r} from the Hugging Face Hub: {reason}. {_alternatives(kind)}."


def _hub_offline() -> bool:
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def is_cached(repo_id: str) -> bool:
    """Whether a snapshot of the model repo is in the local Hub cache (then no download is needed)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@lru_cache(maxsize=8)
def _unreachable_reason(endpoint: str, repo_id: str) -> str | None:
    """One request, no retries: ``None`` when the endpoint answers at all (any HTTP status), else why not."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    timeout = float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10) or 10)
    try:
        get_session().head(f"{endpoint}/api/models/{repo_id}", timeout=timeout)
    except Exception as err:  # requests' and httpx's connection errors share no base class
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{endpoint} cannot be reached ({detail})"
    return None


def hub_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be downloaded now (offline mode, unreachable endpoint), or ``None``."""
    from huggingface_hub import constants

    if _hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache"
    reason = _unreachable_reason(constants.ENDPOINT.rstrip("/"), repo_id)
    return f"{reason} and it is not in the local cache" if reason else None


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_only(folder: str | os.PathLike) -> None:
    """Refuse a local model folder whose weights exist only in a pickle format (loading pickle can run code).

    Looks at the folder and its direct subfolders (a pipeline's ``unet/``, ``text_encoder/``...): a subfolder
    with pickled weights and no ``.safetensors`` file beside them gets a one-line error saying how to convert.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    for sub in [root, *(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))]:
        names = [f.name for f in sub.iterdir() if f.is_file()]
        pickled = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS) and n != "training_args.bin")
        if pickled and not any(n.endswith(".safetensors") for n in names):
            raise ValueError(
                f"{str(sub)!r} holds only pickled weights ({pickled[0]}), and only .safetensors weights are loaded "
                "from user paths (a pickle can run code). Convert it once where you trust it: load it with "
                "from_pretrained() and save_pretrained(folder, safe_serialization=True)."
            )


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Refuse a local base-model folder that is not a complete diffusers pipeline, naming what is missing."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(
            f"Base model {str(root)!r} is a file; pass a diffusers pipeline folder (with model_index.json, unet/, "
            "vae/, text_encoder/, tokenizer/, scheduler/) or a Hub id."
        )
    index = root / "model_index.json"
    if not index.is_file():
        alone = " it holds a single model (config.json), not a pipeline;" if (root / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"Base model folder {str(root)!r} has no model_index.json:{alone} pass the folder of a whole diffusers "
            "pipeline (saved with pipeline.save_pretrained(), with unet/, vae/, text_encoder/...)."
        )
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(index)!r} is not valid JSON ({err}); restore the pipeline's model_index.json.") from err
    missing = [
        name
        for name, spec in components.items()
        if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None and not (root / name).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"Base model folder {str(root)!r} is incomplete: model_index.json lists {', '.join(missing)} but "
            f"{'/, '.join(missing)}/ {'is' if len(missing) == 1 else 'are'} missing. Copy or download the whole "
            "pipeline folder again."
        )


def resolve_model(name_or_path: str | os.PathLike, kind: str | None = None) -> str:
    """The path or Hub id to hand to ``from_pretrained``, or a one-line error now.

    Args:
        name_or_path: a bundled short name (``toy-sd``, ``toy-scorer``, ``toy-dino``, ``toy-clip``,
            ``toy-classifier``), a local folder, or a Hub id (``org/name``).
        kind: what the model is for ("base model", "scorer", "DINO model", "CLIP model"), used in messages
            to suggest the matching bundled model.
    """
    text = os.fspath(name_or_path)
    bundled = bundled_model_path(text)
    if bundled is not None:
        return str(bundled)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        if kind == "base model":
            check_pipeline_folder(expanded)
        check_safetensors_only(expanded)
        return expanded
    if _looks_local(text):
        bundled_names = ", ".join(BUNDLED_MODELS)
        raise FileNotFoundError(
            f"Model path {text!r} does not exist. Pass a local folder saved with save_pretrained(), a Hugging "
            f"Face Hub id such as 'kakaobrain/align-base', or a bundled toy model ({bundled_names})."
        )
    if not is_cached(text):
        problem = hub_problem(text)
        if problem:
            raise ModelNotAvailableError(unavailable_message(text, kind, problem))
    return text


def _is_download_error(err: BaseException) -> bool:
    """An error from fetching files, as opposed to a bad model (wrong class, broken weights)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    hub_errors = {
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "HfHubHTTPError",
        "ConnectionError",
        "ConnectError",
        "TimeoutException",
        "Timeout",
    }
    if names & hub_errors:
        return True
    text = str(err)
    return isinstance(err, OSError) and (
        "huggingface.co" in text or "couldn't connect" in text or "offline mode" in text.lower()
    )


def load_pretrained(
    loader: Callable[..., T],
    name_or_path: str | os.PathLike,
    *args: Any,
    kind: str | None = None,
    **kwargs: Any,
) -> T:
    """``loader(resolved, *args, **kwargs)`` (a ``from_pretrained``) with download failures as one line.

    ``name_or_path`` is resolved by :func:`resolve_model` first (bundled names, fast offline check); a Hub
    id whose download still fails raises :class:`ModelNotAvailableError` naming the model and the way out.
    """
    path = resolve_model(name_or_path, kind)
    try:
        return loader(path, *args, **kwargs)
    except ModelNotAvailableError:
        raise
    except Exception as err:
        if os.path.exists(path) or not _is_download_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(unavailable_message(path, kind, first.rstrip("."))) from err


def pipeline_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The dtype keyword of a diffusers ``from_pretrained``: ``dtype`` where diffusers takes it (it warns
    that ``torch_dtype`` is deprecated there), ``torch_dtype`` on older diffusers (which ignore ``dtype``)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
