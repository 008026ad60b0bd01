"""Prompt lists, identifier handling, and image loading/normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rpo_diffusers import prompts as P
from rpo_diffusers.data import images_to_tensor, load_image_folder, tensor_to_pil, to_pil_images


def test_training_and_evaluation_prompt_counts():
    for cls, kind in (("dog", "live"), ("backpack", "object"), ("stuffed animal", "object"), ("cat", "live")):
        assert P.subject_type_for(cls) == kind
        tr = P.training_prompts(cls)
        ev = P.evaluation_prompts(cls)
        assert len(tr) == 8 and len(set(tr)) == 8
        assert len(ev) == 25 and len(set(ev)) == 25
        assert all(P.has_identifier(p, "sks") and cls in p for p in tr + ev)
    assert "a sks dog on the Moon" in P.training_prompts("dog")
    assert "a green sks backpack" in P.training_prompts("backpack")


def test_evaluation_prompts_match_dreambench_file(dreambench_dir):
    text = (dreambench_dir / "prompts_and_classes.txt").read_text()
    for kind, cls in (("object", "backpack"), ("live", "dog")):
        for p in P.evaluation_prompts(cls, identifier="{0}", subject_type=kind):
            template = "'" + p.replace(cls, "{1}") + "'.format(unique_token, class_token)"
            assert template in text, template
    classes = P.load_dreambench_classes(str(dreambench_dir / "prompts_and_classes.txt"))
    assert len(classes) == 30 and classes["dog8"] == "dog" and classes["bear_plushie"] == "stuffed animal"


@pytest.mark.parametrize(
    ("prompt", "identifier", "expected"),
    [
        ("a sks dog on the Moon", "sks", "a dog on the Moon"),
        ("a [V] dog on the Moon", "[V]", "a dog on the Moon"),
        ("a green sks backpack", "sks", "a green backpack"),
        ("a sksdog by sks", "sks", "a sksdog by"),
        ("asks about a dog", "sks", "asks about a dog"),
    ],
)
def test_strip_identifier(prompt, identifier, expected):
    assert P.strip_identifier(prompt, identifier) == expected


def test_custom_identifier_and_missing_identifier_error():
    assert P.training_prompts("dog", identifier="[V]")[0].startswith("a [V] dog")
    assert P.instance_prompt("dog", "zwx") == "a photo of zwx dog"
    with pytest.raises(ValueError, match="identifier 'sks'"):
        P.check_prompts_have_identifier(["a dog on the beach", "a sks dog"], "sks")
    with pytest.raises(ValueError, match="class_noun"):
        P.subject_type_for("  ")


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_image_modes_are_normalised_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))  # fully transparent red -> white
    out = to_pil_images(rgba)[0]
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "P", "CMYK", "I;16", "LA", "1"):
        im = Image.new(mode, (6, 4))
        assert to_pil_images(im)[0].mode == "RGB"
    # EXIF orientation 6 (rotate 90) turns a 10x4 image into 4x10.
    im = Image.new("RGB", (10, 4), (0, 128, 0))
    exif = im.getexif()
    exif[0x0112] = 6
    _save(im, tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_image_folder(tmp_path)
    assert len(loaded) == 1 and loaded[0].size == (4, 10)


def test_numpy_and_torch_inputs():
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[..., 2] = 255
    assert to_pil_images(arr)[0].getpixel((0, 0)) == (0, 0, 255)
    batch = torch.zeros(2, 3, 5, 7)
    batch[:, 0] = 1.0
    pils = to_pil_images(batch)
    assert len(pils) == 2 and pils[1].getpixel((3, 3)) == (255, 0, 0) and pils[0].size == (7, 5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pil_images(batch * 2 - 1.5)
    with pytest.raises(TypeError):
        to_pil_images("not an image")


def test_tensor_round_trip_and_crop():
    im = Image.new("RGB", (64, 32), (10, 200, 30))
    t = images_to_tensor([im], 16)
    assert t.shape == (1, 3, 16, 16) and t.min() >= -1 and t.max() <= 1
    back = tensor_to_pil(t)[0]
    assert back.size == (16, 16)
    assert np.abs(np.asarray(back, dtype=int) - np.array([10, 200, 30])).max() <= 2


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No images found"):
        load_image_folder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    _save(Image.new("RGB", (8, 8)), bad / "good.png")
    with pytest.raises(ValueError, match="empty"):
        load_image_folder(bad)
    (bad / "zero.png").unlink()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt"):
        load_image_folder(bad)
    assert len(load_image_folder(bad, skip_unreadable=True)) == 1


def test_dreambench_references_load(dreambench_dir):
    classes = P.load_dreambench_classes(str(dreambench_dir / "prompts_and_classes.txt"))
    total = 0
    for name in classes:
        imgs = load_image_folder(dreambench_dir / name)
        assert all(im.mode == "RGB" and im.size == (512, 512) for im in imgs)
        total += len(imgs)
    assert total == 158


def test_broken_and_looping_symlinks_are_named_not_skipped(tmp_path):
    from PIL import Image

    from rpo_diffusers.data import load_image_folder

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 20, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"gone\.png.*broken or looping symlink"):
        load_image_folder(tmp_path)
    (tmp_path / "gone.png").unlink()
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ValueError, match=r"loop\.jpg"):
        load_image_folder(tmp_path)
    assert len(load_image_folder(tmp_path, skip_unreadable=True)) == 3  # skipped only when asked (with a warning)
