"""Tiny, randomly initialised image-text dual encoders (ALIGN, CLIP, SigLIP) and a ViT (DINO stand-in).

Each builder saves a model and its processor to a folder that loads back with ``from_pretrained``, the
same code path real checkpoints such as ``kakaobrain/align-base`` take.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .tokenizers import DEFAULT_WORDS, write_bert_tokenizer, write_clip_tokenizer

FAMILIES = ("align", "clip", "siglip")


def _write_sentencepiece(directory: Path, words: Iterable[str]) -> Path:
    """Train a tiny SentencePiece model (SigLIP's tokenizer format) on sentences made of ``words``."""
    import io

    import sentencepiece as spm

    words = list(words)
    sentences = [" ".join(words[i : i + 8]) for i in range(0, len(words), 3)] + [
        "a photo of a dog on the moon",
        "a green backpack with a city in the background",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_writer=model,
        vocab_size=100,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path = directory / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def _image_processor(family: str, image_size: int):
    from transformers import CLIPImageProcessor, EfficientNetImageProcessor, SiglipImageProcessor

    if family == "clip":
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    if family == "siglip":
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return EfficientNetImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        rescale_offset=False,
        include_top=False,
    )


def build_tiny_scorer(
    directory: str | os.PathLike,
    family: str = "align",
    image_size: int = 32,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
) -> Path:
    """Save a tiny random ``AlignModel``/``CLIPModel``/``SiglipModel`` with its processor; return the folder."""
    from transformers import (
        AlignConfig,
        AlignModel,
        AlignProcessor,
        BertTokenizer,
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        SiglipConfig,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "_tokenizer_src"
    torch.manual_seed(seed)
    image_processor = _image_processor(family, image_size)
    vision = dict(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    if family == "clip":
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(src, words))
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    elif family == "siglip":
        src.mkdir(parents=True, exist_ok=True)
        tokenizer = SiglipTokenizer(str(_write_sentencepiece(src, words)), model_max_length=16)
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    else:
        tokenizer = BertTokenizer.from_pretrained(write_bert_tokenizer(src, words))
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        vis = dict(
            image_size=image_size,
            width_coefficient=0.25,
            depth_coefficient=0.25,
            hidden_dim=32,
            num_hidden_layers=4,
            drop_connect_rate=0.0,
        )
        # ALIGN has no image projection: the text projection must match the vision tower's pooled width.
        probe = AlignModel(AlignConfig(text_config=text, vision_config=vis, projection_dim=32))
        pixel = torch.zeros(1, 3, image_size, image_size)
        width = int(probe.eval().vision_model(pixel_values=pixel).pooler_output.shape[-1])
        torch.manual_seed(seed)
        model = AlignModel(AlignConfig(text_config=text, vision_config=vis, projection_dim=width))
        # ALIGN's default init (std 0.02 convs) makes a tiny EfficientNet output ~1e-29: use He init.
        for module in model.vision_model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
        processor = AlignProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for f in sorted(src.glob("*")):
        f.unlink()
    if src.exists():
        src.rmdir()
    return out


def build_tiny_vit(directory: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random ``ViTModel`` + image processor (the DINO stand-in); return the folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = Path(directory)
    torch.manual_seed(seed)
    model = ViTModel(
        ViTConfig(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out
