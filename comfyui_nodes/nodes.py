"""RPO nodes for ComfyUI (V3 API): thin wrappers; the work is done by ``rpo_diffusers``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io, ui
from PIL import Image

from rpo_diffusers.config import FAST_VALIDATION
from rpo_diffusers.objectives import METHODS
from rpo_diffusers.prompts import DEFAULT_IDENTIFIER, check_prompts_have_identifier, training_prompts
from rpo_diffusers.rewards import check_lambda

from .conversions import (
    comfy_image_to_pil,
    image_batches_to_pil,
    parse_prompt_lines,
    pil_to_comfy_image,
    safe_output_name,
)

# validation_sampler choices -> the diffusers scheduler the trainer's validation uses (None: DDIM, the paper's);
# the default, dpmpp_2m at 20 steps, is the trainer's own default validation (RPOConfig, FAST_VALIDATION)
VALIDATION_SAMPLERS = {"ddim": None, "dpmpp_2m": "DPMSolverMultistepScheduler"}

SCORER_FOLDER = "rpo_scorers"
Scorer = io.Custom("RPO_SCORER")
Scores = io.Custom("RPO_SCORES")


def register_folders() -> None:
    """``models/rpo_scorers``: one sub-folder per dual encoder saved with ``save_pretrained``."""
    import folder_paths

    if SCORER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SCORER_FOLDER] = (
            [os.path.join(folder_paths.models_dir, SCORER_FOLDER)],
            {""},
        )


def list_scorers() -> list[str]:
    import folder_paths

    register_folders()
    names = []
    for root in folder_paths.get_folder_paths(SCORER_FOLDER):
        if os.path.isdir(root):
            names += sorted(
                d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json"))
            )
    return names


def scorer_path(name: str) -> str:
    import folder_paths

    register_folders()
    for root in folder_paths.get_folder_paths(SCORER_FOLDER):
        candidate = os.path.join(root, name)
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(
        f"Scorer {name!r} not found in models/{SCORER_FOLDER}: put an ALIGN/CLIP/SigLIP folder there."
    )


def more_reference_inputs() -> list:
    """Optional extra reference batches: photos of other sizes from separate Load Image nodes, no resizing.

    One IMAGE batch must share a size (ComfyUI's Batch Images node stretches to make it so); these inputs let
    references of different sizes reach the library as they are, where they are centre-cropped like in the script.
    """
    return [
        io.Image.Input(name, optional=True, tooltip="more reference photos, any size")
        for name in ("reference_images_2", "reference_images_3")
    ]


class RPOScorerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RPOScorerLoader",
            display_name="RPO Scorer Loader",
            category="RPO",
            description="Loads an ALIGN / CLIP / SigLIP dual encoder from models/rpo_scorers for the λ-harmonic reward.",
            inputs=[
                io.Combo.Input("scorer_name", options=list_scorers()),
                io.String.Input(
                    "identifier",
                    default=DEFAULT_IDENTIFIER,
                    tooltip="removed from prompts before the text tower",
                ),
            ],
            outputs=[Scorer.Output(display_name="scorer")],
        )

    @classmethod
    def execute(cls, scorer_name: str, identifier: str) -> io.NodeOutput:
        import comfy.model_management

        from rpo_diffusers.rewards import LambdaHarmonicScorer

        scorer = LambdaHarmonicScorer.from_pretrained(
            scorer_path(scorer_name),
            device=comfy.model_management.get_torch_device(),
            identifier=identifier.strip(),
        )
        return io.NodeOutput(scorer)


class RPOScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RPOScore",
            display_name="RPO Score",
            category="RPO",
            description="λ-harmonic reward of each image: harmonic mean of similarity to the references (ALIGN-I) "
            "and agreement with the prompt (ALIGN-T).",
            inputs=[
                Scorer.Input("scorer"),
                io.Image.Input("images"),
                io.Image.Input("reference_images"),
                io.String.Input("prompt", default="a sks dog on the beach", multiline=False),
                io.Float.Input("lambda_", display_name="λ", default=0.5, min=0.0, max=1.0, step=0.05),
                *more_reference_inputs(),
            ],
            outputs=[
                Scores.Output(display_name="scores"),
                io.Float.Output(display_name="rewards", is_output_list=True),
                io.Float.Output(display_name="align_i", is_output_list=True),
                io.Float.Output(display_name="align_t", is_output_list=True),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, prompt: str = "", lambda_: float = 0.5, **kwargs) -> bool | str:
        if not isinstance(prompt, str) or not prompt.strip():
            return (
                "prompt is empty: write the prompt the images were made from, e.g. 'a sks dog on the beach'."
            )
        try:
            check_lambda(lambda_, "λ")
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        scorer,
        images: torch.Tensor,
        reference_images: torch.Tensor,
        prompt: str,
        lambda_: float,
        reference_images_2: torch.Tensor | None = None,
        reference_images_3: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        refs = image_batches_to_pil(reference_images, reference_images_2, reference_images_3)
        result = scorer.score(comfy_image_to_pil(images), prompt, reference_images=refs, lambda_=lambda_)
        rows = result.to_rows()
        text = "\n".join(
            f"#{i}: reward {r['reward']:.4f}  (ALIGN-I {r['align_i']:.4f}, ALIGN-T {r['align_t']:.4f})"
            for i, r in enumerate(rows)
        )
        return io.NodeOutput(
            result.reward.tolist(),
            result.reward.tolist(),
            result.image_alignment.tolist(),
            result.text_alignment.tolist(),
            ui=ui.PreviewText(text),
        )


def top_k(images: torch.Tensor, scores: list[float], k: int) -> tuple[torch.Tensor, list[int]]:
    """The k best images (highest score first) and their indices in the batch."""
    if len(scores) != images.shape[0]:
        raise ValueError(
            f"Got {images.shape[0]} images but {len(scores)} scores: score the same batch you select from."
        )
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[: max(1, min(k, len(scores)))]
    return images[order], order


class RPOSelectBest(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RPOSelectBest",
            display_name="RPO Select Best",
            category="RPO",
            description="Keeps the k images with the highest scores.",
            inputs=[
                io.Image.Input("images"),
                Scores.Input("scores"),
                io.Int.Input("k", default=1, min=1, max=4096),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Int.Output(display_name="indices", is_output_list=True),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, scores: list[float], k: int) -> io.NodeOutput:
        best, order = top_k(images, list(scores), k)
        return io.NodeOutput(best, order)


def model_folder(kind: str) -> Path:
    """Where a trained file goes: ``models/<kind>`` (ComfyUI lists legacy folders such as ``models/unet`` first)."""
    import folder_paths

    paths = folder_paths.get_folder_paths(kind)
    return Path(next((p for p in paths if Path(p).name == kind), paths[0]))


def load_trained_model(model, target: Path, use_lora: bool):
    """The MODEL KSampler gets, read back from the saved file by ComfyUI's own loaders (LoraLoader / UNETLoader)."""
    import comfy.sd
    import comfy.utils

    if use_lora:
        lora = comfy.utils.load_torch_file(str(target), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        return patched
    return comfy.sd.load_diffusion_model(str(target))


def _default_prompts_text() -> str:
    return "\n".join(training_prompts("dog", DEFAULT_IDENTIFIER))


def check_train_inputs(
    identifier: str, class_noun: str, prompts_text: str, output_name: str
) -> list[str] | None:
    """Shared by validate_inputs and execute: returns the prompts, or None for RPO's prompts for the class.

    The widget shows RPO's list for a 'dog' as its default; left unchanged (or emptied) it means "RPO's prompts
    for my class noun and identifier", so changing the class to 'backpack' never trains on dog prompts.
    """
    if not identifier or not identifier.strip() or " " in identifier.strip():
        raise ValueError("identifier must be one token such as 'sks'.")
    if not class_noun or not class_noun.strip():
        raise ValueError("class_noun is empty: name the subject's class, e.g. 'dog' or 'backpack'.")
    safe_output_name(output_name)
    prompts = parse_prompt_lines(prompts_text)
    if prompts == parse_prompt_lines(_default_prompts_text()):
        return None
    if prompts:
        check_prompts_have_identifier(prompts, identifier.strip(), "training prompt")
    return prompts or None


def preview_grid(work_dir: Path, best_step: int, references) -> Image.Image:
    """What the node shows: the labelled before/after grid (step 0 vs the chosen step), else the chosen
    step's validation grid, else the references with a header saying there was no validation."""
    from rpo_diffusers.plots import labeled_grid

    for path in (work_dir / "before_after.png", work_dir / "validation" / f"step_{best_step:05d}.png"):
        if path.exists():
            return Image.open(path).convert("RGB")
    return labeled_grid(
        [list(references)],
        col_labels=[f"reference {i + 1}" for i in range(len(references))],
        title="reference photos (no validation images were written)",
    )


class RPOTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RPOTrain",
            display_name="RPO Train (personalize)",
            category="RPO",
            description="Personalize an SD 1.x / 2.x or SDXL checkpoint on 3-6 photos of a subject with RPO (default), "
            "DreamBooth or DPG; validation "
            "with the scorer picks the best step. Saves a LoRA to models/loras "
            "(or a UNet to models/diffusion_models) and returns the personalized MODEL.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input(
                    "reference_images", tooltip="3-6 photos of the subject, one batch (same size)"
                ),
                Scorer.Input("scorer"),
                io.String.Input("identifier", default=DEFAULT_IDENTIFIER),
                io.String.Input("class_noun", default="dog"),
                io.String.Input(
                    "training_prompts",
                    multiline=True,
                    default=_default_prompts_text(),
                    tooltip="one per line, each with the identifier; left as is or empty = RPO's prompts for "
                    "the class noun",
                ),
                io.Int.Input("steps", default=400, min=1, max=100000),
                io.Int.Input("validation_interval", default=40, min=1, max=100000),
                io.Float.Input("lambda_val", default=0.5, min=0.0, max=1.0, step=0.05),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6),
                io.Int.Input("lora_rank", default=4, min=0, max=256, tooltip="0 trains the full UNet"),
                io.Int.Input("images_per_prompt", default=4, min=1, max=64),
                io.Int.Input("sampling_steps", default=30, min=1, max=200),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8,
                             tooltip="training size; 0: the model's own (512 for SD 1.x / 2.x, 1024 for SDXL). 768 "
                             "for SD 2.x-768; a multiple of 32 for SDXL"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("output_name", default="rpo_subject"),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="rpo",
                    optional=True,
                    tooltip="rpo: reward preference optimization; dreambooth: the denoising loss on the photos; "
                    "dpg: DreamBooth + a look-forward reward learned by a critic",
                ),
                io.Combo.Input(
                    "dpg_reward",
                    options=["latent", "lambda_harmonic"],
                    default="latent",
                    optional=True,
                    tooltip="dpg only: the look-forward reward (latent reconstruction, or the scorer's λ-harmonic "
                    "reward on the decoded image)",
                ),
                io.Int.Input(
                    "validation_images", default=1, min=1, max=64, optional=True,
                    tooltip="images per training prompt at each validation (the paper uses 4: a steadier choice "
                    "of step, 4x the validation time)",
                ),
                io.Combo.Input(
                    "validation_sampler", options=list(VALIDATION_SAMPLERS), default="dpmpp_2m", optional=True,
                    tooltip="sampler of the validation images: dpmpp_2m at 20 steps picks the checkpoint that the "
                    "paper's ddim at 50 steps picks, in 40% of the time (README, Benchmarks)",
                ),
                io.Int.Input(
                    "validation_sampling_steps", default=FAST_VALIDATION["validation_num_inference_steps"], min=0,
                    max=200, optional=True, tooltip="sampling steps of the validation images; 0: sampling_steps",
                ),
                *more_reference_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.String.Output(display_name="filename"),
                io.Image.Output(display_name="validation_images"),
                io.Image.Output(display_name="reward_plot"),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(
        cls,
        identifier: str = DEFAULT_IDENTIFIER,
        class_noun: str = "dog",
        training_prompts: str = "",
        output_name: str = "rpo_subject",
        **kwargs,
    ) -> bool | str:
        try:
            check_train_inputs(identifier, class_noun, training_prompts, output_name)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        reference_images,
        scorer,
        identifier,
        class_noun,
        training_prompts,
        steps,
        validation_interval,
        lambda_val,
        learning_rate,
        lora_rank,
        images_per_prompt,
        sampling_steps,
        resolution,
        seed,
        output_name,
        method="rpo",
        dpg_reward="latent",
        validation_images=1,
        validation_sampler="dpmpp_2m",
        validation_sampling_steps=FAST_VALIDATION["validation_num_inference_steps"],
        reference_images_2=None,
        reference_images_3=None,
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths

        from rpo_diffusers.config import RPOConfig
        from rpo_diffusers.trainer import RPOTrainer

        from .adapter import comfy_components, training_resolution

        prompts = check_train_inputs(identifier, class_noun, training_prompts, output_name)
        resolution = training_resolution(model, resolution)
        refs = image_batches_to_pil(reference_images, reference_images_2, reference_images_3)
        use_lora = lora_rank > 0
        file_name = safe_output_name(output_name)
        target = model_folder("loras" if use_lora else "diffusion_models") / file_name
        work_dir = Path(folder_paths.get_output_directory()) / "rpo" / Path(file_name).stem
        config = RPOConfig(
            method=method,
            dpg_reward=dpg_reward,
            class_noun=class_noun.strip(),
            identifier=identifier.strip(),
            train_prompts=prompts,
            max_train_steps=steps,
            validation_steps=validation_interval,
            lambda_val=lambda_val,
            learning_rate=learning_rate,
            use_lora=use_lora,
            rank=max(lora_rank, 1),
            images_per_prompt=images_per_prompt,
            num_inference_steps=sampling_steps,
            resolution=resolution,
            seed=seed,
            output_dir=str(work_dir),
            report_to="none",
            num_validation_images=validation_images,
            validation_sampling_scheduler=VALIDATION_SAMPLERS[validation_sampler],
            validation_num_inference_steps=validation_sampling_steps or None,
        )
        bar = comfy.utils.ProgressBar(steps)

        def on_sampling_step(step: int, total: int) -> None:  # while images are drawn
            bar.update_absolute(step, total)

        def on_event(event: str, payload: dict) -> None:
            if event == "step":
                bar.update_absolute(payload["step"], payload["total"])

        with torch.inference_mode(False):
            components = comfy_components(
                model,
                clip,
                vae,
                output_file=target,
                resolution=resolution,
                on_sampling_step=on_sampling_step,
                # Interrupt: checked before every UNet call; RPOTrainer then saves the best model so far.
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            )
            trainer = RPOTrainer(config, components, scorer, refs, callbacks=[on_event])
            result = trainer.train()
        patched = load_trained_model(model, target, use_lora)
        grid = preview_grid(work_dir, result.best_step, refs)
        plot = Image.open(work_dir / "reward_plot.png").convert("RGB")
        text = f"saved {file_name} (best step {result.best_step}, validation reward {result.best_reward:.4f})"
        return io.NodeOutput(
            patched,
            file_name,
            pil_to_comfy_image([grid]),
            pil_to_comfy_image([plot]),
            ui=ui.PreviewText(text),
        )


NODES = [RPOScorerLoader, RPOScore, RPOSelectBest, RPOTrain]
