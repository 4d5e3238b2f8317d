"""Training images in, [-1, 1] pixel tensors out: every photo a user has must simply work.

Handles folders and file lists, EXIF rotation, RGBA/LA/P (composited on white), grayscale,
16-bit and float images, mixed sizes (shorter side resized, then centre crop), and ComfyUI IMAGE
tensors [B, H, W, C] in [0, 1]. Nothing is skipped without a word: an unreadable image, a file in an
image folder that is no image, or one past PIL's decompression-bomb limit fails with one error that
names the file. Caption files (`<image>.txt`) are read here too, as UTF-8.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Files that may sit beside images in a folder and are not meant as images (captions, tool metadata).
COMPANION_SUFFIXES = {".txt", ".caption", ".json", ".yaml", ".yml", ".toml", ".md", ".csv", ".ini", ".npz", ".npy",
                      ".safetensors", ".pt", ".db"}


class DataError(UserError):
    """A problem with the training images that the user can fix."""


def find_image_files(sources: Iterable[str | Path]) -> list[Path]:
    """Expand folders (sorted) and check that files exist; no images is an error.

    In a folder, sub-folders, hidden files and caption/metadata files are passed over; any other file
    must be an image PIL can identify, or it is an error naming it (never silently skipped).
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(_folder_images(path))
        elif path.is_file():
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"Image path {path} is a link to a file that does not exist: fix or remove the link.")
        else:
            raise DataError(f"Image path {path} does not exist: give a folder of images or image files.")
    if not files:
        raise DataError("No training images found: give a folder with .png/.jpg/.webp images, or image files.")
    return files


def _folder_images(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise DataError(f"Image folder {folder} cannot be listed ({error.strerror or error}).") from error
    found = []
    for path in entries:
        if path.name.startswith(".") or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in COMPANION_SUFFIXES:
            continue
        if not path.is_file():
            raise DataError(f"{path} in the image folder is a broken link or not a regular file: remove it.")
        if suffix in IMAGE_SUFFIXES or _is_image(path):
            found.append(path)
            continue
        raise DataError(f"{path} in the image folder is not an image that can be read: convert it to PNG or "
                        "JPEG, or move it out of the folder.")
    return found


def _is_image(path: Path) -> bool:
    """Whether PIL recognises the file's header (any format PIL reads, whatever its suffix)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True  # an image: open_image names the limit
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def open_image(path: Path) -> Image.Image:
    """Open, apply EXIF orientation, and convert to 8-bit RGB."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"Image {path} cannot be read ({error.strerror or error}).") from error
    if size == 0:
        raise DataError(f"Image {path} is empty (0 bytes): remove it or replace it with a real image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not half-loaded
            with Image.open(path) as handle:
                handle.load()
                image = ImageOps.exif_transpose(handle)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        limit = f"{Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "PIL's"
        raise DataError(f"Image {path} is larger than the limit of {limit} pixels that guards against "
                        f"decompression bombs ({error}): scale it down before training.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Image {path} cannot be read ({error}): remove it or re-save it as PNG/JPEG.") from error
    return to_rgb(image)


def read_caption(image_path: Path) -> str:
    """The caption of one image from `<image>.txt` beside it, which must exist and be UTF-8 text."""
    caption = Path(image_path).with_suffix(".txt")
    if not caption.is_file():
        raise DataError(f"Captions need {caption} beside {Path(image_path).name}: write one caption per image, "
                        "with {} where the word goes.")
    try:
        return caption.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise DataError(f"Caption file {caption} is not UTF-8 text (byte {error.start}): re-save it as UTF-8."
                        ) from error
    except OSError as error:
        raise DataError(f"Caption file {caption} cannot be read ({error.strerror or error}).") from error


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
    short, long = min(image.size), max(image.size)
    if long > 8 * short:  # a strip (1 x 1000 px would scale to 512 x 512000): only its middle is kept, so cut
        keep = 3 * short  # it first, with a square of margin on each side, before scaling
        left, top = ((image.width - keep) // 2, 0) if image.width > image.height else (0, (image.height - keep) // 2)
        image = image.crop((left, top, left + min(keep, image.width), top + min(keep, image.height)))
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
