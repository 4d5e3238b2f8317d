"""Training images in, [-1, 1] pixel tensors out: every photo a user has must simply work.

Handles folders and file lists, EXIF rotation, RGBA/LA/P (composited on white), grayscale,
16-bit and float images, mixed sizes (shorter side resized, then centre crop), and ComfyUI IMAGE
tensors [B, H, W, C] in [0, 1]. Unreadable inputs fail with one error that names the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class DataError(UserError):
    """A problem with the training images that the user can fix."""


def find_image_files(sources: Iterable[str | Path]) -> list[Path]:
    """Expand folders (sorted, images only) and check that files exist; no images is an error."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"Image path {path} does not exist: give a folder of images or image files.")
    if not files:
        raise DataError("No training images found: give a folder with .png/.jpg/.webp images, or image files.")
    return files


def open_image(path: Path) -> Image.Image:
    """Open, apply EXIF orientation, and convert to 8-bit RGB."""
    if path.stat().st_size == 0:
        raise DataError(f"Image {path} is empty (0 bytes): remove it or replace it with a real image.")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Image {path} cannot be read ({error}): remove it or re-save it as PNG/JPEG.") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_images(sources: Iterable[str | Path]) -> list[Image.Image]:
    return [open_image(path) for path in find_image_files(sources)]


def as_pil_list(images) -> list[Image.Image]:
    """Accept PIL images, a ComfyUI IMAGE tensor [B,H,W,C] in [0,1], or a list of such tensors."""
    if isinstance(images, torch.Tensor):
        images = [images]
    out: list[Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(to_rgb(item))
            continue
        if not isinstance(item, torch.Tensor):
            raise DataError(f"Unsupported image input of type {type(item).__name__}.")
        batch = item if item.dim() == 4 else item.unsqueeze(0)
        for frame in batch:
            array = (frame[..., :3].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            if array.shape[-1] == 1:
                array = np.repeat(array, 3, axis=-1)
            out.append(Image.fromarray(array, mode="RGB"))
    if not out:
        raise DataError("No training images were given.")
    return out


def resize_and_crop(image: Image.Image, resolution: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Shorter side to `resolution`, then the centre square."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=resample)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pixels_from_images(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """[N, 3, R, R] in [-1, 1]."""
    arrays = [np.asarray(resize_and_crop(img, resolution), dtype=np.float32) for img in images]
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return stacked / 127.5 - 1.0


def masks_to_tensor(masks, count: int, resolution: int) -> torch.Tensor:
    """Loss weights [N, 1, R, R] in [0, 1] from a MASK tensor [B,H,W] or PIL images (one per image)."""
    if isinstance(masks, torch.Tensor):
        frames = [m for m in (masks if masks.dim() == 3 else masks.unsqueeze(0))]
        pil = [Image.fromarray((f.float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8), mode="L") for f in frames]
    else:
        pil = [m.convert("L") for m in masks]
    if len(pil) == 1 and count > 1:
        pil = pil * count
    if len(pil) != count:
        raise DataError(f"Got {len(pil)} masks for {count} images: give one mask per image, or a single mask.")
    arrays = [np.asarray(resize_and_crop(m, resolution, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
              for m in pil]
    weights = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    if float(weights.sum()) == 0.0:
        raise DataError("Every mask is empty (all zero): the loss would ignore every pixel. Paint the subject white.")
    return weights


def images_fingerprint(pixels: torch.Tensor) -> str:
    """A short hash of the prepared pixels, so a resume cannot silently switch datasets."""
    import hashlib

    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()[:16]
