"""training_examples/benchmark_protocol.py --quick: the project's runs on the bundled toy world, a peer script
run by the same step clock, and the per-step comparison (speed itself is the benchmark's to print, not a test's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from example_scripts import load_example

from rpo_diffusers.toy import assets_available

REPO = Path(__file__).resolve().parents[1]

# a stand-in for diffusers' script (never in this repository): it takes the same flags, records them and
# makes --max_train_steps optimiser steps, which is all the benchmark observes of a peer
PEER = """
import argparse, json, sys
from pathlib import Path
import torch

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir")
    p.add_argument("--max_train_steps", type=int)
    args, _ = p.parse_known_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "argv.json").write_text(json.dumps(sys.argv[1:]))
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    for _ in range(args.max_train_steps):
        (w - 1).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
"""


def load_benchmark():
    return load_example("benchmark_protocol")


@pytest.mark.slow
@pytest.mark.skipif(not assets_available(), reason="the toy world's models are not built")
def test_quick_protocol_runs_project_and_peer_and_prints_ratios(tmp_path, capsys):
    peer = tmp_path / "peer_script.py"
    peer.write_text(PEER)
    bench = load_benchmark()
    out = tmp_path / "numbers.json"
    assert (
        bench.main(
            ["--quick", "--workdir", str(tmp_path / "w"), "--json", str(out), "--peer_script", str(peer)]
        )
        == 0
    )
    numbers = json.loads(out.read_text())
    runs = {r["variant"]: r for rep in numbers["runs"] for r in rep}
    assert set(runs) == {"rpo", "rpo_paper", "rpo_fast", "peer_prior", "peer"}
    assert not [r["error"] for r in runs.values() if "error" in r]
    # the step clock counts the optimiser steps of both kinds of run
    assert runs["rpo"]["steps_done"] == runs["rpo_paper"]["steps_done"] == runs["rpo_fast"]["steps_done"] == 4
    # rpo is RPOConfig's defaults (the fast validation); rpo_paper validates as the paper does
    ns = bench.parse_args([])
    assert "validation_sampling_scheduler" not in bench.project_settings(ns, tmp_path, "rpo")
    paper = bench.project_settings(ns, tmp_path, "rpo_paper")
    assert (paper["validation_num_inference_steps"], paper["validation_sampling_scheduler"]) == (50, "DDIMScheduler")
    assert runs["peer_prior"]["steps_done"] == 6 and runs["peer"]["steps_done"] == 4
    for r in runs.values():
        assert r["wall_s"] > 0 and r["peak_mib"] > 0 and math.isfinite(r["s_per_step"])
        assert r["before_first_step_s"] + r["steps_s"] + r["after_last_step_s"] <= r["wall_s"]
    assert runs["rpo"]["best_step"] in (0, 2, 4) and runs["rpo"]["generation_s"] > 0
    # the peer gets the same model, resolution and photos, and prior preservation only in peer_prior
    argv = {
        v: json.loads((tmp_path / "w/runs" / f"{v}-0/argv.json").read_text()) for v in ("peer_prior", "peer")
    }
    assert (
        "--with_prior_preservation" in argv["peer_prior"] and "--with_prior_preservation" not in argv["peer"]
    )
    for a in argv.values():
        assert a[a.index("--resolution") + 1] == "32" and a[a.index("--pretrained_model_name_or_path") + 1]
    steps = {r["variant"]: r for r in numbers["per_step"]}
    assert set(steps) == {"rpo", "dreambooth_prior"} and all(
        math.isfinite(r["s_per_step"]) for r in steps.values()
    )
    printed = capsys.readouterr().out
    for line in (
        "| rpo / peer_prior |",
        "| rpo_fast / peer |",
        "| rpo_fast / rpo |",
        "| rpo / rpo_paper |",
        "RPO",
        "DreamBooth + prior",
    ):
        assert line in printed
