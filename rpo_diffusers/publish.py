"""A run's result appears in ``output_dir`` all at once: the previous result or the new one, never a mix.

A result (model files, model card, history, plots) is several entries, and no sequence of renames replaces
several entries atomically. So each result is written complete into its own folder under
``output_dir/.rpo-results/``, and one symlink, ``.rpo-results/current``, names the published one. The
entries users load (``output_dir/unet``, ``output_dir/pytorch_lora_weights.safetensors``, ``README.md``, ...)
are symlinks to ``.rpo-results/current/<name>``: switching ``current`` with one ``rename`` switches all of
them together. A kill at any instant leaves either the old target or the new one; the next publication
removes what a killed one left (staging folders, unpublished results).

Everything stays inside ``output_dir`` (one filesystem, so a mount point works) and only the entries the
result itself names are touched; other files of the user are left alone. A folder written by an older
version (real files instead of symlinks) is first adopted as the current result, entry by entry with an
atomic exchange, so it stays loadable throughout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .export import WRITE_ERRORS, ExportError, _write_failure

STORE = ".rpo-results"
CURRENT = "current"
_RENAME_EXCHANGE = 2


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder of a staged result before it is published (a power cut, not only a kill)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


@functools.cache
def _renameat2():
    """libc's renameat2, or None where the system has none."""
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete folder ``src`` at ``dst`` in one step; an existing ``dst`` is swapped out and removed.

    Where the system has no atomic exchange, the old folder is moved aside first: a short window without it.
    """
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return
    aside = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Remove a folder so that a kill midway leaves nothing under its name: hidden first, then deleted."""
    aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class OutputNotWritableError(PermissionError):
    """The output folder cannot be written (read-only mount, no permission)."""


def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Fail now, naming the folder, if results could not be written there (a file, read-only, no permission).

    Probes by creating and removing a file in the folder (or its nearest existing parent), since permission
    bits say nothing about a read-only mount or, for root, anything at all.
    """
    target = Path(path).expanduser()
    probe_dir = target
    while not probe_dir.exists():
        if probe_dir.is_symlink():
            raise NotADirectoryError(f"{what} {str(target)!r}: {str(probe_dir)!r} is a broken symlink; fix or remove it.")
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NotADirectoryError(
            f"{what} {str(target)!r} is not a folder: {str(probe_dir)!r} is a file. Choose a folder path."
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".rpo-write-test-", dir=probe_dir)
    except OSError as err:
        reason = err.strerror.lower() if err.strerror else str(err)
        raise OutputNotWritableError(
            f"{what} {str(target)!r} cannot be written ({str(probe_dir)!r}: {reason}). Choose a folder you can "
            "write to, or fix its permissions."
        ) from err
    os.close(fd)
    os.unlink(name)


def _link_target(name: str) -> str:
    return os.path.join(STORE, CURRENT, name)


def _is_our_link(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == _link_target(path.name)


def _place_link(out: Path, name: str) -> None:
    """Make ``out/name`` the symlink to ``.rpo-results/current/name`` (atomic; a real entry is swapped out)."""
    dst = out / name
    if _is_our_link(dst):
        return
    tmp = out / f".{name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(_link_target(name), tmp)
    if dst.is_dir() and not dst.is_symlink():
        # a folder cannot be renamed over: swap it with the link in one step, then remove the old folder
        if _exchange(tmp, dst):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = out / f".{name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, aside)  # no atomic exchange on this system: a short window without the entry
        os.replace(tmp, dst)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(tmp, dst)


def current_result(output_dir: str | os.PathLike) -> Path | None:
    """The folder holding the published result, or None when nothing was published this way."""
    link = Path(output_dir) / STORE / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def cleanup(output_dir: str | os.PathLike) -> None:
    """Remove what an interrupted publication left: staging folders, results that are not current, temp links."""
    out = Path(output_dir)
    store = out / STORE
    if not store.is_dir():
        return
    current = current_result(out)
    for entry in store.iterdir():
        if entry.name == CURRENT or (current is not None and entry.resolve() == current):
            continue
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry, ignore_errors=True)
    for entry in out.iterdir():
        if entry.name.startswith(".") and (".link-" in entry.name or ".old-" in entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        elif _is_our_link(entry) and not entry.exists():  # a name only an earlier result had
            entry.unlink()


def _adopt_legacy(out: Path, names: list[str]) -> None:
    """Turn real result entries of an older layout into a published result, staying loadable throughout."""
    legacy = [n for n in names if (out / n).exists() and not (out / n).is_symlink()]
    if not legacy or current_result(out) is not None:
        return
    store = out / STORE
    staging = _staging_dir(store)
    for name in legacy:  # a copy: until the links are in place, the real entries keep serving the old result
        src = out / name
        if src.is_dir():
            shutil.copytree(src, staging / name, symlinks=True)
        else:
            shutil.copy2(src, staging / name)
    fsync_tree(staging)
    result = store / f"r-{uuid.uuid4().hex[:12]}"
    os.replace(staging, result)
    _switch(store, result)
    for name in legacy:
        _place_link(out, name)


def _staging_dir(store: Path) -> Path:
    """A new folder for a result, readable like any folder the user creates (mkdtemp makes it 0700)."""
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=store))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def _switch(store: Path, result: Path) -> None:
    tmp = store / f"{CURRENT}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(result.name, tmp)
    os.replace(tmp, store / CURRENT)  # the one step that publishes
    _fsync_dir(store)


@contextmanager
def result_transaction(output_dir: str | os.PathLike, legacy_names: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; write the whole result there; on success it is published at once.

    Args:
        output_dir: the run's output folder (it may be a mount point and hold other files).
        legacy_names: result names an older version wrote as real entries; adopted first (see module doc).

    On an error nothing visible changes and the staging folder is removed.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / STORE
    store.mkdir(exist_ok=True)
    cleanup(out)
    staging = _staging_dir(store)
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir())
        _adopt_legacy(out, [*legacy_names, *names])
        fsync_tree(staging)
        result = store / f"r-{uuid.uuid4().hex[:12]}"
        os.replace(staging, result)
        for name in names:  # new names first point at the old result (absent there: they dangle until the switch)
            _place_link(out, name)
        _fsync_dir(out)
        _switch(store, result)
    except (*WRITE_ERRORS, ExportError) as err:  # a full disk, an I/O error: say what is left
        shutil.rmtree(staging, ignore_errors=True)
        cause = err.__cause__ if isinstance(err, ExportError) and err.__cause__ else err  # not the staging path
        raise _write_failure(out, cause, "the previous result") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cleanup(out)
