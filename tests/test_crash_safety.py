"""A kill -9 at every system call of an export leaves the previous result or the new one, never a mix.

The export is the trainer's own (``_finish``), run in a child forked from a process that has everything
loaded; ``strace -e inject=SYSCALL:signal=SIGKILL:when=N`` kills that child at its N-th call of SYSCALL, for
every N up to the number of such calls the export makes (counted first). After each kill the folder must
load with diffusers and its single files (what ComfyUI's UNETLoader / LoraLoader read) must be readable, all
of one version (the weights, the history and the model card agree), and the next export cleans up.
Skipped where strace is missing or ptrace is not permitted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tqdm.std import tqdm

from rpo_diffusers import RPOConfig, RPOTrainer
from rpo_diffusers.export import FULL_UNET_FILENAME, LORA_DIFFUSERS_FILENAME, LORA_KOHYA_FILENAME
from rpo_diffusers.publish import STORE, cleanup

SYSCALLS = (
    "rename", "renameat", "renameat2", "symlink", "symlinkat", "unlink", "unlinkat", "rmdir", "mkdir", "fsync",
    "write", "writev", "pwrite64", "ftruncate",
)  # fmt: skip

# Threads, process-shared locks and fork do not mix: tqdm's default lock is a multiprocessing semaphore shared
# with every forked child, and a child killed while holding it blocks the parent's next progress bar forever.
tqdm.monitor_interval = 0
tqdm.set_lock(threading.RLock())
pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


class NoScorer:
    def set_reference_images(self, images): ...


def _trainer(tiny_sd_dir, out: Path, mode: str) -> RPOTrainer:
    config = RPOConfig(
        pretrained_model_name_or_path=str(tiny_sd_dir), class_noun="dog", output_dir=str(out), resolution=32,
        report_to="none", use_lora=mode == "lora", train_prompts=["a sks dog on the beach"],
    )  # fmt: skip
    refs = [torch.rand(3, 32, 32) for _ in range(3)]
    trainer = RPOTrainer(config, StableDiffusionPipeline.from_pretrained(tiny_sd_dir), NoScorer(), refs)
    if mode == "lora":
        trainer.components.add_lora(config.rank, config.lora_alpha, config.lora_target_modules)
    return trainer


def _set_version(trainer: RPOTrainer, base: dict, version: int) -> None:
    """Weights = base + version / 100; the history says best_step = version."""
    trainer.best_state = {k: v + version / 100 for k, v in base.items()}
    trainer.best_step, trainer.best_reward = version, 0.5
    trainer.history = [{"step": version, "reward": 0.5, "align_i": 0.5, "align_t": 0.5, "per_prompt": {}}]


def _export_in_child(trainer: RPOTrainer, out: Path, syscall: str | None, n: int | None, count_file: Path | None):
    trainer.output_dir = out
    return _in_traced_child(lambda: trainer._finish(stopped_early=False), syscall, n, count_file)


def _in_traced_child(work, syscall: str | None, n: int | None, count_file: Path | None):
    """Fork; the child waits until strace is attached, then runs ``work()``. Returns the child's wait status.

    With ``syscall`` strace kills the child at its n-th call of it; without, strace counts the calls into
    ``count_file``.
    """
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(go_write)
        tqdm.set_lock(threading.RLock())  # not the parent's (see the module's top)
        os.read(go_read, 1)  # blocks until strace is attached
        try:
            work()
        except BaseException:
            os._exit(3)
        os._exit(0)
    cmd = ["strace", "-qq", "-f", "-p", str(pid), "-e", f"trace={','.join(SYSCALLS)}"]
    if syscall is not None:
        cmd += ["-e", f"inject={syscall}:signal=SIGKILL:when={n}", "-o", os.devnull]
    else:
        cmd += ["-c", "-o", str(count_file)]
    tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:  # wait until strace has attached
        status = Path(f"/proc/{pid}/status").read_text()
        if re.search(r"^TracerPid:\s+[1-9]", status, re.M):
            break
        if tracer.poll() is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.skip(f"strace cannot attach here: {tracer.stderr.read().decode()[:200]}")
        time.sleep(0.01)
    os.close(go_read)
    os.write(go_write, b"x")
    os.close(go_write)
    _, wait_status = os.waitpid(pid, 0)
    tracer.wait(30)
    return wait_status


def _counts(path: Path) -> dict[str, int]:
    counts = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in SYSCALLS and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


def _plain(name: str) -> str:
    """A LoRA parameter's name without the wrapper and adapter parts: '<module>.lora_A.weight'."""
    name = name.removeprefix("unet.")
    return re.sub(r"\.default(_\d+)?\.", ".", name)


def _version_of(out: Path, mode: str, tiny_sd_dir, base: dict) -> int:
    """The one version the folder holds, checked across every file users load; fails on a mix."""
    history = json.loads((out / "rpo_history.json").read_text())
    version = history["best_step"]
    assert f"step **{version}**" in (out / "README.md").read_text(), "the model card describes another result"
    assert (out / "reward_plot.png").stat().st_size > 0

    def same_version(actual: torch.Tensor, base_value: torch.Tensor, atol: float = 1e-5) -> None:
        delta = actual.float() - base_value.float()
        torch.testing.assert_close(delta, torch.full_like(delta, version / 100), atol=atol, rtol=0)

    if mode == "full":
        pipe = StableDiffusionPipeline.from_pretrained(out)  # diffusers
        same_version(pipe.unet.conv_in.weight.detach(), base["unet.conv_in.weight"])
        single = load_file(str(out / FULL_UNET_FILENAME))  # what ComfyUI's UNETLoader reads
        same_version(single["conv_in.weight"], base["unet.conv_in.weight"])
        return version
    base_plain = {_plain(k): v for k, v in base.items()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(out, weight_name=LORA_DIFFUSERS_FILENAME)  # diffusers
    loaded = {_plain(k): v.detach() for k, v in pipe.unet.named_parameters() if "lora_" in k}
    assert loaded.keys() == base_plain.keys()
    for k, v in loaded.items():
        same_version(v, base_plain[k])
    kohya = load_file(str(out / LORA_KOHYA_FILENAME))  # what ComfyUI's LoraLoader reads (fp16)
    for k, v in base_plain.items():
        module, part = k.rsplit(".lora_", 1)
        kohya_part = "lora_down" if part.startswith("A") else "lora_up"
        same_version(kohya[f"lora_unet_{module.replace('.', '_')}.{kohya_part}.weight"], v, atol=2e-3)
    return version


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_kill_at_any_system_call_of_an_export_leaves_one_whole_result(tiny_sd_dir, tmp_path, mode):
    pristine = tmp_path / "previous"
    trainer = _trainer(tiny_sd_dir, pristine, mode)
    base = trainer.components.trainable_state_dict()
    pristine.mkdir()
    (pristine / "my_notes.txt").write_text("the user's own file")  # never touched
    _set_version(trainer, base, 1)
    trainer.output_dir = pristine
    trainer._finish(stopped_early=False)
    assert _version_of(pristine, mode, tiny_sd_dir, base) == 1

    _set_version(trainer, base, 2)
    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe, symlinks=True)
    status = _export_in_child(trainer, probe, None, None, tmp_path / "count.txt")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _version_of(probe, mode, tiny_sd_dir, base) == 2
    counts = _counts(tmp_path / "count.txt")
    assert counts.get("write", 0) > 5 and sum(counts.get(s, 0) for s in ("rename", "renameat", "renameat2")) > 2

    outcomes: dict[str, list[int]] = {}
    for syscall, total in sorted(counts.items()):
        for n in range(1, total + 1):
            out = tmp_path / f"k-{syscall}-{n}"
            shutil.copytree(pristine, out, symlinks=True)
            status = _export_in_child(trainer, out, syscall, n, None)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), (syscall, n, status)
            version = _version_of(out, mode, tiny_sd_dir, base)
            outcomes.setdefault(syscall, []).append(version)
            assert (out / "my_notes.txt").read_text() == "the user's own file"
            cleanup(out)  # what the next run does first
            store = out / STORE
            assert sorted(p.name for p in store.iterdir())[0] == "current" and len(list(store.iterdir())) == 2
            assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != STORE]
            assert _version_of(out, mode, tiny_sd_dir, base) == version
            shutil.rmtree(out)
    # every kill point was tried, and the switch happens at one of them: both versions occur, in order
    for syscall, versions in outcomes.items():
        assert versions == sorted(versions), (syscall, versions)  # old ... old, new ... new: never back
    assert {v for vs in outcomes.values() for v in vs} == {1, 2}
    print({s: f"{vs.count(1)} old / {vs.count(2)} new" for s, vs in outcomes.items()})


def test_a_failed_write_names_the_output_folder_and_keeps_the_previous_result(tiny_sd_dir, tmp_path, monkeypatch):
    from rpo_diffusers.export import ExportError

    out = tmp_path / "out"
    trainer = _trainer(tiny_sd_dir, out, "lora")
    base = trainer.components.trainable_state_dict()
    _set_version(trainer, base, 1)
    trainer._finish(stopped_early=False)
    _set_version(trainer, base, 2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rpo_diffusers.trainer.write_model_card", full_disk)  # the disk fills up mid-export
    with pytest.raises(ExportError, match=rf"Saving to '{re.escape(str(out))}' failed \(the disk is full\); "
                                          "the previous result is intact"):  # fmt: skip
        trainer._finish(stopped_early=False)
    assert _version_of(out, "lora", tiny_sd_dir, base) == 1
    assert [p.name for p in (out / STORE).iterdir() if p.name.startswith("staging")] == []


def _resumed_step(trainer: RPOTrainer, out: Path, first: dict[str, torch.Tensor]) -> int:
    """Resume ``latest`` from ``out`` the way a rerun does; the weights must be those of the step it names."""
    trainer.output_dir = out
    trainer.config.resume_from_checkpoint = "latest"
    visible = sorted(p.name for p in out.glob("checkpoint-*"))
    assert [p.name for p in trainer._checkpoint_dirs()] == visible, "a partial checkpoint is visible"
    path = trainer._checkpoint_to_resume()
    assert path is not None, "no complete checkpoint left"
    trainer._resume(path)
    assert path.name == f"checkpoint-{trainer.global_step}"
    offset = 0.0 if trainer.global_step == 1 else 0.01
    for name, value in trainer.components.trainable_state_dict().items():
        torch.testing.assert_close(value, first[name] + offset, atol=1e-6, rtol=0)
    return trainer.global_step


def _second_checkpoint_state(trainer: RPOTrainer, first: dict[str, torch.Tensor]) -> None:
    """Step 2 with the weights of step 1 + 0.01, so each checkpoint's weights say which one it is."""
    trainer.components.load_trainable_state_dict({k: v + 0.01 for k, v in first.items()})
    trainer.global_step = 2


@pytest.mark.slow
def test_a_kill_at_any_system_call_of_a_checkpoint_leaves_one_complete_checkpoint(
    tiny_sd_dir, clip_scorer, references, tmp_path
):
    """checkpoints_total_limit=1: the new checkpoint is complete before the old one goes, at every kill point."""
    from rpo_diffusers.testing.configs import tiny_config

    pristine = tmp_path / "previous"
    config = tiny_config(
        tiny_sd_dir, pristine, use_lora=True, max_train_steps=1, validation_steps=1, checkpointing_steps=1,
        checkpoints_total_limit=1, train_prompts=["a sks dog on the beach"],
    )  # fmt: skip
    trainer = RPOTrainer(config, scorer=clip_scorer, reference_images=references)
    trainer.train()  # writes checkpoint-1; the accelerator keeps everything prepared for the next save
    first = trainer.components.trainable_state_dict()
    assert [p.name for p in trainer._checkpoint_dirs()] == ["checkpoint-1"]

    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe, symlinks=True)
    trainer.output_dir = probe
    _second_checkpoint_state(trainer, first)
    status = _in_traced_child(trainer.save_checkpoint, None, None, tmp_path / "count.txt")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _resumed_step(trainer, probe, first) == 2
    assert not (probe / "checkpoint-1").exists()  # the limit of 1 was applied
    counts = _counts(tmp_path / "count.txt")
    assert counts.get("write", 0) > 3 and sum(counts.get(s, 0) for s in ("rename", "renameat", "renameat2")) >= 1

    outcomes: dict[str, list[int]] = {}
    for syscall, total in sorted(counts.items()):
        for n in range(1, total + 1):
            out = tmp_path / f"k-{syscall}-{n}"
            shutil.copytree(pristine, out, symlinks=True)
            trainer.output_dir = out
            _second_checkpoint_state(trainer, first)
            status = _in_traced_child(trainer.save_checkpoint, syscall, n, None)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), (syscall, n, status)
            outcomes.setdefault(syscall, []).append(_resumed_step(trainer, out, first))
            trainer.output_dir, trainer.global_step = out, 3  # the next run's next checkpoint cleans up
            trainer.save_checkpoint()
            assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"], (syscall, n)
            shutil.rmtree(out)
    for syscall, steps in outcomes.items():
        assert steps == sorted(steps), (syscall, steps)  # old ... old, new ... new: never back
    assert {s for steps in outcomes.values() for s in steps} == {1, 2}
    print({s: f"{steps.count(1)} old / {steps.count(2)} new" for s, steps in outcomes.items()})


@pytest.fixture
def tmpfs(tmp_path) -> Path:
    """A fresh 16 MB tmpfs mount point (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:200]}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _tree(root: Path, skip: str = "") -> dict[str, str]:
    """Every entry under root (a link's target, a file's bytes, or 'dir'), except ``skip``."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if rel == skip:
                continue
            found[rel] = ("-> " + os.readlink(path)) if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return found


def _fill(folder: Path, name: str = "filler") -> Path:
    """Write until the disk is full."""
    filler = folder / name
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as err:
            assert err.errno == 28
    return filler


def test_a_mount_point_as_output_dir_and_a_full_disk_there(tiny_sd_dir, clip_scorer, references, tmpfs):
    """The output folder is a mount point (a Docker volume): training saves there; when the disk fills up the
    export and the checkpoint fail in one clear line each and the previous result stays byte-identical."""
    from rpo_diffusers.export import ExportError
    from rpo_diffusers.testing.configs import tiny_config
    from rpo_diffusers.trainer import CheckpointError

    (tmpfs / "my_notes.txt").write_text("the user's own file")
    config = tiny_config(
        tiny_sd_dir, tmpfs, use_lora=True, max_train_steps=2, validation_steps=1, checkpointing_steps=1,
        checkpoints_total_limit=1, train_prompts=["a sks dog on the beach"],
    )  # fmt: skip
    trainer = RPOTrainer(config, scorer=clip_scorer, reference_images=references)
    trainer.train()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(tmpfs, weight_name=LORA_DIFFUSERS_FILENAME)
    assert [p.name for p in trainer._checkpoint_dirs()] == ["checkpoint-2"]

    before = _tree(tmpfs)
    filler = _fill(tmpfs)
    with pytest.raises(ExportError, match=rf"Saving to '{re.escape(str(tmpfs))}' failed \(the disk is full\); the previous result is intact"):  # fmt: skip
        trainer._finish(stopped_early=False)
    assert _tree(tmpfs, skip=filler.name) == before
    trainer.global_step = 3
    with pytest.raises(CheckpointError, match=r"Writing checkpoint-3 in .* failed \(the disk is full\); earlier checkpoints are intact"):  # fmt: skip
        trainer.save_checkpoint()
    assert _tree(tmpfs, skip=filler.name) == before

    filler.unlink()  # space again: both work, and nothing of the failed attempts is left
    trainer._finish(stopped_early=False)
    trainer.save_checkpoint()
    assert [p.name for p in trainer._checkpoint_dirs()] == ["checkpoint-3"]
    assert not [p.name for p in tmpfs.iterdir() if p.name.startswith(".") and p.name != STORE]
    assert len(list((tmpfs / STORE).iterdir())) == 2  # current and the one result
    assert (tmpfs / "my_notes.txt").read_text() == "the user's own file"
