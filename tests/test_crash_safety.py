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

SYSCALLS = ("rename", "renameat", "renameat2", "symlink", "unlink", "unlinkat", "rmdir", "mkdir", "fsync", "write")

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
    """Fork; the child waits until strace is attached, then exports. Returns the child's wait status."""
    trainer.output_dir = out
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(go_write)
        tqdm.set_lock(threading.RLock())  # not the parent's (see the module's top)
        os.read(go_read, 1)  # blocks until strace is attached
        try:
            trainer._finish(stopped_early=False)
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
