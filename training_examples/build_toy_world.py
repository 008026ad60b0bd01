#!/usr/bin/env python
"""Train the toy world's models from scratch (seeded), in stages, on a CPU.

    python training_examples/build_toy_world.py --output rpo_diffusers/toy/assets          # full build
    python training_examples/build_toy_world.py --output /tmp/toy --quick                   # smoke test (minutes)
    python training_examples/build_toy_world.py --output ... --stages classifier scorer     # only some stages

Stages (each saved with ``save_pretrained`` as soon as it is done, and skipped when already there):
  vae         AutoencoderKL, 32 px -> 4x8x8 latents, on base-distribution renders
  sd          CLIPTextModel + UNet2DConditionModel (ε-prediction) on (latent, caption) pairs -> a
              StableDiffusionPipeline folder that ``from_pretrained`` loads
  scorer      CLIPModel trained contrastively on (image, caption): the ALIGN stand-in for the λ-harmonic reward
  clip_eval   a second, differently seeded and shaped CLIPModel: the CLIP-I / CLIP-T stand-in for evaluation
  dino_eval   ViTModel trained to put the same object (shape, colours, pattern) together across contexts: DINO stand-in
  classifier  ground-truth attribute classifier (ViTForImageClassification with one label group per attribute)

Every stage writes its losses and timings to ``build_report.json`` next to the models.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rpo_diffusers.testing.tokenizers import write_clip_tokenizer
from rpo_diffusers.toy.subjects import SUBJECTS
from rpo_diffusers.toy.world import (
    ACCESSORIES,
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    SHAPES,
    SPLIT,
    STYLES,
    Scene,
    random_scene,
    render,
)

SIZE = 32
WORDS = sorted(
    {"a", "sks", "and", "on", "the", "in", "with", "at", "wearing", "hat", "van", "gogh", "style", "volcano", "background"}
    | set(SHAPES) | set(COLORS) | set(PATTERNS) | {"beach", "snow", "moon", "city", "water", "night", "forest"}
)  # fmt: skip
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "color2": tuple(COLORS),
    "pattern": (*PATTERNS, SPLIT),
    "background": BACKGROUNDS,
    "accessory": ACCESSORIES,
    "style": STYLES,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def classifier_scene(rng: np.random.Generator) -> Scene:
    """The classifier and the DINO stand-in also see the held-out split pattern (they are the judges)."""
    scene = random_scene(rng)
    if rng.random() < 0.25:
        from dataclasses import replace

        scene = replace(scene, pattern=SPLIT)
    return scene


def make_dataset(n: int, seed: int, sampler=random_scene) -> tuple[torch.Tensor, list[Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [sampler(rng) for _ in range(n)]
    arr = np.stack(
        [np.asarray(render(s, size=SIZE, seed=seed * 1_000_003 + i)) for i, s in enumerate(scenes)]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0, scenes


def batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------


def build_vae(out: Path, data: torch.Tensor, steps: int, report: dict) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=SIZE,
    )  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    losses = []
    for i, idx in enumerate(batches(len(data), 64, steps, 1)):
        x = data[idx]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i % 500 == 0:
            log(f"vae step {i}: {np.mean(losses[-100:]):.4f}")
    with torch.no_grad():
        z = vae.encode(data[:512]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out / "sd" / "vae")
    report["vae"] = {
        "steps": steps,
        "final_mse": float(np.mean(losses[-100:])),
        "scaling_factor": vae.config.scaling_factor,
    }


def build_sd(out: Path, data: torch.Tensor, scenes: list[Scene], steps: int, report: dict) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_clip_tokenizer(out / "_tok", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=24)
    vae = AutoencoderKL.from_pretrained(out / "sd" / "vae").eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(data[i : i + 256]).latent_dist.mean for i in range(0, len(data), 256)]
        )
        latents = latents * vae.config.scaling_factor
    captions = [s.caption() for s in scenes]
    ids = tokenizer(
        captions + [""], padding="max_length", max_length=24, truncation=True, return_tensors="pt"
    ).input_ids
    empty = ids[-1:]
    ids = ids[:-1]
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, steps_offset=1)  # fmt: skip
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(2)
    losses = []
    for i, idx in enumerate(batches(len(latents), 64, steps, 3)):
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < 0.1  # caption dropout for classifier-free guidance
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(
            sched.add_noise(x0, noise, t), t, encoder_hidden_states=text(tokens).last_hidden_state
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        losses.append(loss.item())
        if i % 500 == 0:
            log(f"sd step {i}: {np.mean(losses[-100:]):.4f}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(out / "sd", safe_serialization=True)
    report["sd"] = {
        "steps": steps,
        "final_loss": float(np.mean(losses[-200:])),
        "unet_params": sum(p.numel() for p in unet.parameters()),
    }


def _clip(out_dir: Path, data, scenes, steps, seed, hidden, layers, report_key, report):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out_dir.parent / f"_tok_{report_key}", WORDS), model_max_length=24
    )
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=SIZE, patch_size=4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4),
        projection_dim=hidden,
    )  # fmt: skip
    model = CLIPModel(cfg)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        tokenizer=tokenizer,
    )  # fmt: skip
    ids = tokenizer(
        [s.caption() for s in scenes],
        padding="max_length",
        max_length=24,
        truncation=True,
        return_tensors="pt",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    losses = []
    for i, idx in enumerate(batches(len(data), 128, steps, seed)):
        out = model(
            input_ids=ids.input_ids[idx],
            attention_mask=ids.attention_mask[idx],
            pixel_values=data[idx],
            return_loss=True,
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if i % 500 == 0:
            log(f"{report_key} step {i}: {np.mean(losses[-100:]):.4f}")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    report[report_key] = {"steps": steps, "final_loss": float(np.mean(losses[-100:]))}


def _labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {
        g: torch.tensor([values.index(getattr(s, g)) for s in scenes])
        for g, values in ATTRIBUTE_GROUPS.items()
    }


def build_classifier(out: Path, data, scenes, steps: int, report: dict) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = [f"{g}:{v}" for g, values in ATTRIBUTE_GROUPS.items() for v in values]
    torch.manual_seed(5)
    model = ViTForImageClassification(ViTConfig(image_size=SIZE, patch_size=4, hidden_size=96, intermediate_size=192,
                                                num_hidden_layers=4, num_attention_heads=4, num_labels=len(labels),
                                                id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)}))  # fmt: skip
    y = _labels(scenes)
    offsets, start = {}, 0
    for g, values in ATTRIBUTE_GROUPS.items():
        offsets[g] = (start, start + len(values))
        start += len(values)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    losses = []
    for i, idx in enumerate(batches(len(data), 128, steps, 6)):
        logits = model(pixel_values=data[idx]).logits
        loss = sum(
            F.cross_entropy(logits[:, a:b], y[g][idx]) for g, (a, b) in offsets.items() if g != "color2"
        )
        # color2 only matters for patterned objects
        patterned = torch.tensor([scenes[j].pattern != "plain" for j in idx.tolist()])
        if patterned.any():
            a, b = offsets["color2"]
            loss = loss + F.cross_entropy(logits[patterned, a:b], y["color2"][idx][patterned])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i % 500 == 0:
            log(f"classifier step {i}: {np.mean(losses[-100:]):.4f}")
    model.save_pretrained(out / "classifier")
    ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out / "classifier")
    report["classifier"] = {"steps": steps, "final_loss": float(np.mean(losses[-100:]))}


def build_dino(out: Path, data, scenes, steps: int, report: dict) -> None:
    """A ViT whose CLS feature clusters by object identity (shape, colours, pattern), whatever the context."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    identity = [f"{s.shape}|{s.color}|{s.color2 if s.pattern != 'plain' else ''}|{s.pattern}" for s in scenes]
    ids = {k: i for i, k in enumerate(sorted(set(identity)))}
    y = torch.tensor([ids[k] for k in identity])
    torch.manual_seed(7)
    model = ViTModel(ViTConfig(image_size=SIZE, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4), add_pooling_layer=False)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses = []
    for i, idx in enumerate(batches(len(data), 128, steps, 8)):
        f = F.normalize(model(pixel_values=data[idx]).last_hidden_state[:, 0], dim=-1)
        sim = f @ f.T / 0.1
        same = (y[idx][:, None] == y[idx][None]).float() - torch.eye(len(idx))
        log_prob = sim - torch.logsumexp(sim - 1e9 * torch.eye(len(idx)), dim=1, keepdim=True)
        has = same.sum(1) > 0
        loss = -((same * log_prob).sum(1)[has] / same.sum(1)[has]).mean()  # supervised contrastive
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i % 500 == 0:
            log(f"dino step {i}: {np.mean(losses[-100:]):.4f}")
    model.save_pretrained(out / "dino_eval")
    ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out / "dino_eval")
    report["dino_eval"] = {"steps": steps, "final_loss": float(np.mean(losses[-100:]))}


STAGES = ("vae", "sd", "scorer", "clip_eval", "dino_eval", "classifier")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="rpo_diffusers/toy/assets")
    parser.add_argument("--quick", action="store_true", help="tiny data and step counts: a smoke test")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    scale = 0.01 if args.quick else 1.0
    n = max(int(20000 * scale), 256)

    def steps(k: int) -> int:
        return max(int(k * scale), 20)

    t0 = time.perf_counter()
    data, scenes = make_dataset(n, seed=0)
    judge_data, judge_scenes = make_dataset(n, seed=1, sampler=classifier_scene)
    log(f"rendered {2 * n} images in {time.perf_counter() - t0:.0f}s")
    jobs = {
        "vae": (lambda: build_vae(out, data, steps(3000), report), out / "sd" / "vae" / "config.json"),
        "sd": (lambda: build_sd(out, data, scenes, steps(12000), report), out / "sd" / "model_index.json"),
        "scorer": (lambda: _clip(out / "scorer", data, scenes, steps(3000), 11, 64, 3, "scorer", report), out / "scorer" / "config.json"),
        "clip_eval": (lambda: _clip(out / "clip_eval", judge_data, judge_scenes, steps(3000), 12, 96, 2, "clip_eval", report),
                      out / "clip_eval" / "config.json"),
        "dino_eval": (lambda: build_dino(out, judge_data, judge_scenes, steps(2000), report), out / "dino_eval" / "config.json"),
        "classifier": (lambda: build_classifier(out, judge_data, judge_scenes, steps(3000), report), out / "classifier" / "config.json"),
    }  # fmt: skip
    for stage in args.stages:
        fn, done = jobs[stage]
        if done.exists():
            log(f"{stage}: already built, skipping")
            continue
        t = time.perf_counter()
        fn()
        report.setdefault(stage, {})["seconds"] = round(time.perf_counter() - t, 1)
        report_path.write_text(json.dumps(report, indent=2))
        log(f"{stage}: done in {report[stage]['seconds']}s")
    for tmp in out.glob("_tok*"):
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report["total_mb"] = round(size / 2**20, 2)
    report_path.write_text(json.dumps(report, indent=2))
    log(
        f"total size {report['total_mb']} MB; subjects: {list(SUBJECTS)}; {math.ceil(time.perf_counter() - t0)}s"
    )


if __name__ == "__main__":
    main()
