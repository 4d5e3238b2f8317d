"""Every photo a user has loads; unusable ones fail with one error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from textinv_core.data import DataError, as_pil_list, find_image_files, load_images, pixels_from_images


def write_odd_images(folder):
    folder.mkdir(exist_ok=True)
    Image.new("RGBA", (50, 30), (255, 0, 0, 0)).save(folder / "transparent.png")
    Image.new("L", (33, 64), 128).save(folder / "gray.png")
    Image.fromarray(np.full((20, 40), 65535, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (16, 16), 0)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    rotated = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes())


def test_mixed_sizes_and_modes_simply_work(tmp_path):
    write_odd_images(tmp_path)
    files = find_image_files([tmp_path])
    images = {p.name: img for p, img in zip(files, load_images([tmp_path]))}
    assert all(img.mode == "RGB" for img in images.values())
    assert images["rotated.jpg"].size == (20, 60)  # EXIF orientation applied
    assert images["transparent.png"].getpixel((0, 0)) == (255, 255, 255)  # transparency on white
    assert images["sixteen.png"].getpixel((0, 0)) == (255, 255, 255)  # 16-bit scaled, not clipped
    pixels = pixels_from_images(list(images.values()), 32)
    assert pixels.shape == (6, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1


def test_no_images_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="No training images"):
        find_image_files([tmp_path])
    with pytest.raises(DataError, match="does not exist"):
        find_image_files([tmp_path / "missing"])


def test_zero_byte_and_unreadable_images_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png.*0 bytes"):
        load_images([tmp_path / "empty.png"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg.*cannot be read"):
        load_images([tmp_path / "broken.jpg"])


def test_comfyui_image_tensor_is_accepted():
    batch = torch.rand(2, 24, 36, 3)
    images = as_pil_list(batch)
    assert len(images) == 2 and images[0].size == (36, 24)
    assert as_pil_list([batch[:1], batch[1:]])[1].size == (36, 24)
