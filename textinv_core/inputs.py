"""The one place a front end checks what the user gave, before any model loads.

The CLI (`train`, `info`), the nodes (Train Embedding, Load Pseudo-word, Compose Concepts) and the web-UI
tab call these: images (every one readable, none a decompression bomb, none skipped), names, settings
(with whether the word fits the prompts it is trained in), the output file and its folders (writable and
with room, proven by a real test write), the resume source and the model path. Each problem is one
`UserError` whose message names the file, or the setting as that front end shows it (`labels`).
`check_training` runs them all in order. Never loads a model, never leaves a file behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

from .config import TrainConfig, TrainingError
from .errors import MissingFileError, OutputExistsError, UserError
from .model_files import ModelFileError, ModelInfo, check_model_path, read_safetensors_header

__all__ = ["CLI_LABELS", "NODE_LABELS", "InputError", "ModelFileError", "ModelInfo", "check_folder_writable",
           "check_images", "check_model_path", "check_number", "check_output_file", "check_resume",
           "check_resume_fits", "check_settings", "check_training", "check_word_file", "check_word_output",
           "load_image_files", "prompt_room", "read_captions", "space_needed"]

PROMPT_TOKENS = 75  # a CLIP prompt: 77 positions less the start and end tokens
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".bin")

# How each front end names a setting, so a message points at what the user typed.
CLI_LABELS = {
    "name": "--name", "init_word": "--init-word", "num_vectors": "--vectors", "steps": "--steps",
    "learning_rate": "--lr", "batch_size": "--batch", "resolution": "--resolution", "templates": "--templates",
    "seed": "--seed", "eval_every": "--eval-every", "snapshot_every": "--snapshot-every",
    "preview_every": "--preview-every", "early_stop_patience": "--early-stop", "lr_drops": "--lr-drops",
    "word_swaps": "--word-swaps", "max_norm_ratio": "--max-norm",
    "init_pull": "--init-pull", "progressive_steps": "--progressive", "memory": "--memory", "output": "--output",
    "resume": "--resume", "model": "--model", "images": "--images", "overwrite": "pass --overwrite",
}
NODE_LABELS = {
    "name": "name", "init_word": "init_word", "num_vectors": "vectors", "steps": "steps",
    "learning_rate": "learning_rate", "batch_size": "batch_size", "resolution": "resolution",
    "templates": "templates", "seed": "seed", "eval_every": "eval_every", "eval_draws": "eval_draws",
    "snapshot_every": "save_every", "preview_every": "preview_every", "early_stop_patience": "early_stop",
    "memory": "memory", "output": "the embedding file", "overwrite": "switch on overwrite",
}


class InputError(UserError):
    """Something the user gave cannot be used; the message names it and says what to do."""


def _say(labels: Mapping[str, str] | None, field: str, default: str) -> str:
    return (labels or {}).get(field) or default


# -- settings ---------------------------------------------------------------------------------------
def check_settings(config: TrainConfig, image_count: int, labels: Mapping[str, str] | None = None) -> None:
    """TrainConfig.validate, then whether k vectors fit every prompt the word is trained in."""
    config.validate(image_count, labels)
    room, prompt = prompt_room(config)
    if room < 1:
        raise TrainingError(f"The caption {prompt!r} is longer than the {PROMPT_TOKENS} tokens a prompt holds with "
                            "the word in it: shorten it.")
    if config.num_vectors > room:
        label = _say(labels, "num_vectors", "vectors")
        raise TrainingError(
            f"{label} {config.num_vectors} is more than a prompt can hold: {prompt!r} leaves room for {room} "
            f"of the {PROMPT_TOKENS} tokens a prompt holds, so set {label} to {max(room, 1)} or less.")


def prompt_room(config: TrainConfig) -> tuple[int, str]:
    """(the most vectors every training prompt can hold, the prompt that allows the fewest)."""
    from .templates import IMAGE_TOKEN_SETS, TEMPLATE_SETS, fill_caption
    from .tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    word = config.placeholder
    if config.templates == "captions":
        prompts = [fill_caption(c, word, config.name) for c in (config.captions or [])]
        extra = 0
    elif config.per_image_tokens:
        prompts = [t.format(word, "") for t in IMAGE_TOKEN_SETS.get(config.templates, ())]
        extra = 1  # the image's own token
    else:
        prompts = [t.format(word) for t in TEMPLATE_SETS.get(config.templates, ())]
        extra = 0
    best = (PROMPT_TOKENS, "")
    for prompt in prompts:
        pieces = prompt.split(word)
        words = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in pieces if p.strip())
        room = (PROMPT_TOKENS - words - extra) // max(1, len(pieces) - 1)
        best = min(best, (room, prompt))
    return best


# -- images -----------------------------------------------------------------------------------------
def load_image_files(sources) -> tuple[list[Path], list]:
    """(files, PIL images) of folders and files: every image is opened now, and any that cannot be used
    (unreadable, empty, a decompression bomb, a non-image in an image folder) is an error naming it."""
    from .data import find_image_files, open_image

    files = find_image_files(sources)
    return files, [open_image(path) for path in files]


def read_captions(files) -> list[str]:
    """One caption per image from `<image>.txt` beside it (UTF-8)."""
    from .data import read_caption

    return [read_caption(path) for path in files]


def check_images(images, masks=None) -> list:
    """PIL images from PIL images or ComfyUI IMAGE tensors, with the masks' count checked against them."""
    from .data import DataError, as_pil_list

    if hasattr(images, "dim") and (images.dim() not in (3, 4) or images.shape[-1] not in (1, 3, 4)):
        raise DataError(f"The images input has shape {tuple(images.shape)}: connect an IMAGE batch [B, H, W, C].")
    pil = as_pil_list(images)
    if masks is not None:
        count = (masks.shape[0] if masks.dim() == 3 else 1) if hasattr(masks, "dim") else len(masks)
        if count not in (1, len(pil)):
            raise DataError(f"Got {count} masks for {len(pil)} images: give one mask per image, or a single mask.")
    return pil


# -- output -----------------------------------------------------------------------------------------
def check_output_file(path: Path, overwrite: bool, name: str = "word",
                      labels: Mapping[str, str] | None = None) -> None:
    """The file a word is written to: not a folder, not an existing file unless `overwrite`, a known suffix."""
    label = _say(labels, "output", "output")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label} {path} is a folder: give a file name such as {path / name}.safetensors.")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{label} {path} must end in .safetensors (or .pt for the A1111 format).")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{path} already exists: choose another name or output file, or "
                                f"{_say(labels, 'overwrite', 'allow overwriting')}.")


def check_folder_writable(folder: Path, needed: int, what: str = "output folder") -> None:
    """A folder that exists or can be created, is writable and has room for `needed` bytes: proven with
    shutil.disk_usage and a real test write (a temporary file, deleted at once). Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"The {what} {folder} cannot be created: {existing} is a file, not a folder.")
    try:
        free = shutil.disk_usage(existing).free
    except OSError as error:
        raise InputError(f"The {what} {folder} cannot be used ({error.strerror or error}).") from error
    if free < needed:
        raise InputError(f"The {what} {folder} is on a disk with {_size(free)} free, and this run needs about "
                         f"{_size(needed)}: free some space or choose another folder.")
    probe = existing / f".textinv-write-test-{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _probe_write(fd, min(needed, 1 << 20))
        finally:
            os.close(fd)
    except OSError as error:
        reason = error.strerror or str(error)
        raise InputError(f"The {what} {folder} is not writable ({reason}): choose a folder you can write to, or "
                         "free some space.") from error
    finally:
        if os.path.lexists(probe):
            os.unlink(probe)


def _probe_write(fd: int, size: int) -> None:
    """Write and flush `size` bytes: a full disk or a read-only folder fails here, not after training."""
    block = b"\0" * min(size, 1 << 16)
    left = size
    while left > 0:
        left -= os.write(fd, block[:left])
    os.fsync(fd)


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} bytes"


def space_needed(config: TrainConfig, width: int = 2048, snapshots: bool = False) -> int:
    """Bytes a run writes, generously: the word, and with `snapshots` every snapshot, resume state and preview.
    `width` is the sum of the model's text-encoder widths (SDXL's 2048 when not known)."""
    word = config.num_vectors * width * 4 + 8192
    if not snapshots:
        return word + (1 << 20)
    count = (config.steps // config.snapshot_every if config.snapshot_every else 0) + 2
    state = 5 * word + 16384
    previews = (config.steps // config.preview_every if config.preview_every else 0) * config.resolution ** 2 * 3 // 2
    return count * word + 2 * state + previews + (1 << 20)


def check_word_output(path: Path, overwrite: bool, name: str, labels: Mapping[str, str] | None = None) -> None:
    """A word file about to be written (Compose Concepts' save, a copy into the embeddings folder)."""
    check_output_file(path, overwrite, name, labels)
    check_folder_writable(Path(path).parent, 1 << 20, "embeddings folder")


def check_word_file(path: str | Path | None, label: str = "embedding file"):
    """A word file to load (an EmbeddingFile): it exists, is an embedding, and every value is finite."""
    from .embedding_file import load_embedding

    if not path or not Path(path).is_file():
        raise MissingFileError(f"The {label} {path or '(none)'} does not exist: choose an embedding file that is "
                               "there, or connect an embedding.")
    return load_embedding(path)


def check_number(value, label: str, low: float, high: float) -> float:
    """A finite number within [low, high] (a node's FLOAT input reached through the API may be anything)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InputError(f"{label} must be a number from {low:g} to {high:g} (got {value!r}).")
    return float(value)


# -- resume -----------------------------------------------------------------------------------------
def check_resume(source: str | Path, config: TrainConfig, images, labels: Mapping[str, str] | None = None) -> Path:
    """The resume state a run continues from (given as its snapshot folder or any file in it), whole, of this
    word, and of a run with these settings and images; returns the state file."""
    import json

    from .data import images_fingerprint, pixels_from_images
    from .snapshots import check_resumable

    label = _say(labels, "resume", "resume")
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"{label} {path} does not exist: give the snapshot folder of the earlier run, or "
                               "any file in it.")
    state = _state_file(path, config.name)
    folder = state.parent
    if not state.is_file():
        others = sorted(p.name[: -len(".resume.safetensors")] for p in folder.glob("*.resume.safetensors"))
        hint = (f"it holds the resume state of {', '.join(others)}: use the same name as that run" if others
                else "give the snapshot folder of an earlier run with the same name")
        raise InputError(f"{label} {folder} has no resume state for '{config.name}': {hint}.")
    try:
        header = read_safetensors_header(state)
        meta = json.loads(header["__metadata__"]["textinv.resume"])
        if not isinstance(meta, dict) or not {"step", "config", "fingerprint"} <= set(meta):
            raise ValueError("incomplete")
    except ModelFileError as error:
        raise InputError(f"The resume state {state} is damaged ({error}); resume from an older copy, or start "
                         "again.") from None
    except (KeyError, TypeError, ValueError):
        raise InputError(f"The resume state {state} is damaged (its textinv.resume record is missing or "
                         "unreadable): start the run again.") from None
    check_resumable(meta, config, images_fingerprint(pixels_from_images(images, config.resolution)))
    return state


def _state_file(path: Path, name: str) -> Path:
    from .snapshots import resume_path

    if path.is_file() and path.name.endswith(".resume.safetensors"):
        return path
    return resume_path(path if path.is_dir() else path.parent, name)


def check_resume_fits(source: str | Path, name: str, encoders: Mapping[str, int]) -> None:
    """Once the model is loaded: the saved vectors are for its text encoders (a run of another family
    cannot go on with this model)."""
    state = _state_file(Path(source), name)
    header = read_safetensors_header(state)
    saved = {k.split(".", 1)[1]: v["shape"][-1] for k, v in header.items() if k.startswith("vectors.")}
    if saved != dict(encoders):
        def show(widths):
            return ", ".join(f"{k} {w}" for k, w in sorted(widths.items()))
        raise InputError(f"The resume state {state} holds vectors for {show(saved)}, but this model's text encoders "
                         f"are {show(dict(encoders))}: resume with the model the run started with.")


# -- all of one training request --------------------------------------------------------------------
def check_training(config: TrainConfig, images, *, output: Path | None = None, overwrite: bool = False,
                   snapshot_dir: Path | None = None, resume: str | Path | None = None, masks=None,
                   labels: Mapping[str, str] | None = None, model: ModelInfo | None = None,
                   encoder_width: int | None = None) -> list:
    """Every check of one training request, in the order a user would fix them, before the model loads.
    `images`: PIL images or a ComfyUI IMAGE tensor; returns them as PIL images."""
    pil = check_images(images, masks)
    check_settings(config, len(pil), labels)
    multiple = model.pixel_multiple if model is not None else None
    if multiple and config.resolution % multiple:
        label = _say(labels, "resolution", "resolution")
        raise TrainingError(f"{label} {config.resolution} does not fit this model: use a multiple of {multiple} "
                            f"(e.g. {max(multiple, round(config.resolution / multiple) * multiple)}).")
    width = encoder_width or 2048
    if output is not None:
        check_output_file(Path(output), overwrite, config.name, labels)
        check_folder_writable(Path(output).parent, space_needed(config, width))
    if snapshot_dir is not None:
        snapshot_dir = Path(snapshot_dir)
        if snapshot_dir.exists() and not snapshot_dir.is_dir():
            raise InputError(f"The snapshot folder {snapshot_dir} is a file: move it away or choose another output.")
        check_folder_writable(snapshot_dir, space_needed(config, width, snapshots=True), "snapshot folder")
    if resume:
        check_resume(resume, config, pil, labels)
    return pil
