"""Prompt lists and identifier handling.

Prompts are written as templates with ``{identifier}`` and ``{class_noun}`` placeholders so that the
identifier stays a setting ("sks" by default, "[V]" in the official RPO code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

SubjectType = Literal["live", "object"]

DEFAULT_IDENTIFIER = "sks"

#: Class nouns treated as live subjects (DreamBench: dogs and cats). Everything else is an object.
LIVE_CLASS_NOUNS = frozenset({"dog", "cat", "puppy", "kitten"})

# RPO training prompts (8 per subject type), in the paper's order.
_TRAINING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a {identifier} {class_noun} in Vincent Van Gogh rendition",
        "a {identifier} {class_noun} on the Moon",
        "a green {identifier} {class_noun}",
        "a {identifier} {class_noun} with a China Great Wall in the background",
        "a {identifier} {class_noun} on top of wooden roof",
        "a {identifier} {class_noun} with the Statue of Liberty in the background",
        "a {identifier} {class_noun} with a volcano in the background",
        "a {identifier} {class_noun} on a subway platform",
    ),
    "live": (
        "a {identifier} {class_noun} wearing a green outfit",
        "a {identifier} {class_noun} in Vincent Van Gogh rendition",
        "a {identifier} {class_noun} with a China Great Wall in the background",
        "a {identifier} {class_noun} is swimming in a pool",
        "a {identifier} {class_noun} on a subway platform",
        "a {identifier} {class_noun} with the Statue of Liberty in the background",
        "a {identifier} {class_noun} on the Moon",
        "a green {identifier} {class_noun}",
    ),
}

_EVAL_COMMON = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
)
_EVAL_TAIL = (
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)

# DreamBench evaluation prompts (25 per subject type), as in the DreamBooth paper.
_EVALUATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": _EVAL_COMMON
    + (
        "a {identifier} {class_noun} with a wheat field in the background",
        "a {identifier} {class_noun} with a tree and autumn leaves in the background",
        "a {identifier} {class_noun} with the Eiffel Tower in the background",
        "a {identifier} {class_noun} floating on top of water",
        "a {identifier} {class_noun} floating in an ocean of milk",
        "a {identifier} {class_noun} on top of green grass with sunflowers around it",
        "a {identifier} {class_noun} on top of a mirror",
        "a {identifier} {class_noun} on top of the sidewalk in a crowded street",
        "a {identifier} {class_noun} on top of a dirt road",
        "a {identifier} {class_noun} on top of a white rug",
    )
    + _EVAL_TAIL,
    "live": _EVAL_COMMON
    + (
        "a {identifier} {class_noun} wearing a red hat",
        "a {identifier} {class_noun} wearing a santa hat",
        "a {identifier} {class_noun} wearing a rainbow scarf",
        "a {identifier} {class_noun} wearing a black top hat and a monocle",
        "a {identifier} {class_noun} in a chef outfit",
        "a {identifier} {class_noun} in a firefighter outfit",
        "a {identifier} {class_noun} in a police outfit",
        "a {identifier} {class_noun} wearing pink glasses",
        "a {identifier} {class_noun} wearing a yellow shirt",
        "a {identifier} {class_noun} in a purple wizard outfit",
    )
    + _EVAL_TAIL,
}

INSTANCE_PROMPT_TEMPLATE = "a photo of {identifier} {class_noun}"


def subject_type_for(class_noun: str) -> SubjectType:
    """Return ``"live"`` for animals (dog, cat) and ``"object"`` otherwise, as DreamBench splits them."""
    if not class_noun or not class_noun.strip():
        raise ValueError("class_noun is empty: pass the subject's class, e.g. 'dog' or 'backpack'.")
    last = class_noun.strip().lower().split()[-1]
    return "live" if last in LIVE_CLASS_NOUNS or last.rstrip("s") in LIVE_CLASS_NOUNS else "object"


def _check_type(subject_type: str) -> str:
    if subject_type not in _TRAINING_TEMPLATES:
        raise ValueError(f"subject_type must be 'live' or 'object', got {subject_type!r}.")
    return subject_type


def fill(template: str, identifier: str, class_noun: str) -> str:
    """Fill a ``{identifier}``/``{class_noun}`` template."""
    return template.format(identifier=identifier, class_noun=class_noun)


def training_prompts(
    class_noun: str, identifier: str = DEFAULT_IDENTIFIER, subject_type: SubjectType | None = None
) -> list[str]:
    """The 8 RPO training prompts for a subject, e.g. ``"a sks dog on the Moon"``."""
    kind = _check_type(subject_type or subject_type_for(class_noun))
    return [fill(t, identifier, class_noun) for t in _TRAINING_TEMPLATES[kind]]


def evaluation_prompts(
    class_noun: str, identifier: str = DEFAULT_IDENTIFIER, subject_type: SubjectType | None = None
) -> list[str]:
    """The 25 DreamBench evaluation prompts for a subject."""
    kind = _check_type(subject_type or subject_type_for(class_noun))
    return [fill(t, identifier, class_noun) for t in _EVALUATION_TEMPLATES[kind]]


def instance_prompt(class_noun: str, identifier: str = DEFAULT_IDENTIFIER) -> str:
    """The prompt the reference images are conditioned on: ``"a photo of sks dog"``."""
    return fill(INSTANCE_PROMPT_TEMPLATE, identifier, class_noun)


def _identifier_pattern(identifier: str) -> re.Pattern[str]:
    # Whitespace boundaries instead of \b so identifiers such as "[V]" or "<sks>" work too.
    return re.compile(r"(?<!\S)" + re.escape(identifier) + r"(?!\S)")


def has_identifier(prompt: str, identifier: str = DEFAULT_IDENTIFIER) -> bool:
    """True when ``identifier`` appears in ``prompt`` as a whole word."""
    return bool(_identifier_pattern(identifier).search(prompt))


def strip_identifier(prompt: str, identifier: str = DEFAULT_IDENTIFIER) -> str:
    """Remove the identifier: ``"a sks dog on the Moon"`` -> ``"a dog on the Moon"``.

    The text tower must judge the *context* of the prompt, not a token it has never seen.
    """
    if not identifier:
        return prompt
    out = _identifier_pattern(identifier).sub(" ", prompt)
    return re.sub(r"\s+", " ", out).strip()


def strip_identifiers(prompts: Iterable[str], identifier: str = DEFAULT_IDENTIFIER) -> list[str]:
    return [strip_identifier(p, identifier) for p in prompts]


def check_prompts_have_identifier(prompts: Sequence[str], identifier: str, what: str = "prompt") -> None:
    """Raise a clear error naming every prompt that lacks the identifier."""
    missing = [p for p in prompts if not has_identifier(p, identifier)]
    if missing:
        raise ValueError(
            f"{len(missing)} {what}(s) do not contain the identifier {identifier!r}: {missing}. "
            f"Write the identifier before the class noun, e.g. 'a {identifier} dog on the beach'."
        )


def load_dreambench_classes(path: str) -> dict[str, str]:
    """Read ``subject_name,class`` pairs from DreamBench's ``prompts_and_classes.txt``."""
    classes: dict[str, str] = {}
    in_table = False
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if line == "subject_name,class":
                in_table = True
                continue
            if in_table:
                if not line or "," not in line:
                    if classes:
                        break
                    continue
                name, cls = line.split(",", 1)
                classes[name.strip()] = cls.strip()
    if not classes:
        raise ValueError(f"No 'subject_name,class' table found in {path}.")
    return classes
