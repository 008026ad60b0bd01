"""Write small tokenizer files (CLIP BPE, BERT WordPiece) so tiny models need no download."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable
from pathlib import Path

DEFAULT_WORDS = (
    "a photo of sks [V] dog cat backpack toy bowl can candle clock sneaker teapot vase boot glasses "
    "stuffed animal cartoon on the in with background moon green red purple blue shiny wet cube shaped "
    "beach snow jungle city mountain house water wooden floor roof statue liberty volcano subway platform "
    "vincent van gogh rendition china great wall top pink fabric rug forest wearing outfit swimming pool is "
    "hat scarf chef yellow shirt wizard black white street cobblestone"
).split()


def _bpe_merges(word: str) -> list[tuple[str, str]]:
    """Merges that build ``word</w>`` left to right: s k -> sk, sk s</w> -> sks</w>."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = symbols[0]
    for sym in symbols[1:]:
        merges.append((current, sym))
        current = current + sym
    return merges


def write_clip_tokenizer(
    directory: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77
) -> Path:
    """Write ``vocab.json``/``merges.txt``/``tokenizer_config.json`` for a CLIP BPE tokenizer.

    Every character and every merge result is in the vocabulary, so any lowercase ASCII text tokenises
    without ``<|endoftext|>`` unknowns; the given words become single tokens.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "[]<>.,'-!?&/"
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for tok in ("<|startoftext|>", "<|endoftext|>"):
        add(tok)
    for c in chars:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in dict.fromkeys(w.lower() for w in words if w):
        for a, b in _bpe_merges(w):
            if (a, b) not in seen:
                seen.add((a, b))
                merges.append((a, b))
            add(a)
            add(b)
            add(a + b)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def write_bert_tokenizer(
    directory: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 64
) -> Path:
    """Write ``vocab.txt``/``tokenizer_config.json`` for a lowercase BERT WordPiece tokenizer (ALIGN's)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.ascii_lowercase + string.digits + "[]<>.,'-!?&/")
    tokens += ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens += [w.lower() for w in dict.fromkeys(words) if w]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": model_max_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out
