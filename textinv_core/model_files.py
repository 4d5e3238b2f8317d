"""Cheap checks that a model path is a complete, readable model, made before anything loads it.

A diffusers folder needs a valid `model_index.json`, every component it lists that training uses
(unet, scheduler, text encoders, vae) with a readable config, and complete weight files; a single-file
checkpoint must be a complete `.safetensors` file in a Stable Diffusion layout, or a complete `.ckpt`
zip. Truncation is found from sizes alone: a safetensors header declares where every tensor ends, a
zip keeps its directory at the very end. Each problem is one `ModelFileError` naming the file. Reads
headers only: never loads a tensor, never writes; torch-free.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingFileError, UserError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# Components of a diffusers folder that training loads, with the config file each must have.
_COMPONENTS = {"unet": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json",
               "text_encoder_2": "config.json", "vae": "config.json"}
_WEIGHTED = ("unet", "text_encoder", "text_encoder_2", "vae")
_INCOMPLETE = "the download may be incomplete, so download it again"


class ModelFileError(UserError):
    """A model path that is not a complete, readable model; the message names the file."""


@dataclass
class ModelInfo:
    """What a model path is, known without loading it."""

    path: Path
    kind: str                          # "diffusers" | "single_file"
    encoders: int | None = None        # text encoders (2 for SDXL), when the layout says so
    pixel_multiple: int | None = None  # image sizes must be a multiple of this, when the configs say so


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file, after checking that the file holds every byte it declares."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if len(head) < 8 or length < 2 or length > _MAX_HEADER or 8 + length > size:
            raise ModelFileError(f"{path} is not a complete safetensors file ({size} bytes; its header is "
                                 f"missing or cut off): {_INCOMPLETE}.")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        end = max(ends, default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelFileError(f"{path} has a damaged safetensors header: {_INCOMPLETE}.") from None
    if 8 + length + end > size:
        raise ModelFileError(f"{path} is truncated: it declares {8 + length + end:,} bytes but holds {size:,}; "
                             f"{_INCOMPLETE}.")
    return header


def layout_summary(keys: Iterable[str]) -> str:
    """'prefix (count), ...' of the first two key components: what an error message should show."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n})" for h, n in sorted(counts.items())[:12]) or "no tensors"


def check_zip(path: Path) -> None:
    """A torch zip archive (.ckpt/.bin/.pt since torch 1.6) whose directory is intact; older files pass."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":  # a pickle of the legacy format: checked when it is read
            return
        raise ModelFileError(f"{path} is not a checkpoint (neither a safetensors file nor a torch archive): "
                             "give a .safetensors checkpoint or a diffusers folder.")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise ModelFileError(f"{path} is truncated or damaged (its zip directory cannot be read): "
                             f"{_INCOMPLETE}.") from None


def check_model_path(path: str | Path, label: str = "--model") -> ModelInfo:
    """A diffusers folder or a single-file checkpoint, checked as far as headers allow."""
    path = Path(path)
    if path.is_dir():
        return _check_folder(path)
    if path.is_file():
        return _check_single_file(path)
    raise MissingFileError(f"{label} {path} does not exist: give a diffusers folder or a .safetensors/.ckpt "
                           "checkpoint.")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: {what}; {_INCOMPLETE}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(f"{path} is not UTF-8 text: {_INCOMPLETE}.") from None
    except ValueError as error:
        raise ModelFileError(f"{path} is not valid JSON ({error}): {_INCOMPLETE}.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} does not hold a JSON object: {_INCOMPLETE}.")
    return data


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _check_folder(folder: Path) -> ModelInfo:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFileError(f"{folder} has no model_index.json: it is not a diffusers model folder (give the folder "
                             "that holds model_index.json, or a .safetensors checkpoint).")
    index = _read_json(index_file, "it describes the model")
    configs = {}
    for name, config_name in _COMPONENTS.items():
        needed = name in ("unet", "scheduler", "text_encoder") or _listed(index, name)
        sub = folder / name
        if not needed and not sub.is_dir():
            continue
        if not sub.is_dir():
            raise ModelFileError(f"{sub} is missing: model_index.json lists '{name}', which training needs; "
                                 f"{_INCOMPLETE}.")
        configs[name] = _read_json(sub / config_name, f"the {name} needs it")
        if name in _WEIGHTED:
            _check_weights(sub)
    for suffix in ("", "_2"):
        tokenizer = folder / f"tokenizer{suffix}"
        if f"text_encoder{suffix}" in configs and tokenizer.is_dir():
            if not (tokenizer / "tokenizer.json").is_file():
                for part in ("vocab.json", "merges.txt"):
                    if not (tokenizer / part).is_file():
                        raise ModelFileError(f"{tokenizer / part} is missing (and there is no tokenizer.json): the "
                                             f"tokenizer needs it; {_INCOMPLETE}.")
    multiple = None
    try:
        levels = len(configs["unet"]["block_out_channels"])
        vae = len(configs["vae"]["block_out_channels"]) if "vae" in configs else 1
        multiple = 2 ** (vae - 1) * 2 ** (levels - 1)
    except (KeyError, TypeError):
        pass
    return ModelInfo(folder, "diffusers", 2 if "text_encoder_2" in configs else 1, multiple)


def _check_weights(folder: Path) -> None:
    """At least one weight file (or a shard index) in a component folder, and every one complete."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin")]
    indexes = [p for p in files if p.name.endswith(".index.json")]
    if not weights and not indexes:
        raise ModelFileError(f"{folder} has no weight file (diffusion_pytorch_model.safetensors or model.safetensors): "
                             f"{_INCOMPLETE}.")
    for index in indexes:
        shards = set(_read_json(index, "it lists the weight shards").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFileError(f"{folder / missing[0]} is missing: {index.name} lists it; {_INCOMPLETE}.")
    for path in weights:
        if path.stat().st_size == 0:
            raise ModelFileError(f"{path} is empty (0 bytes): {_INCOMPLETE}.")
        if path.suffix == ".safetensors":
            read_safetensors_header(path)
        else:
            check_zip(path)


def _check_single_file(path: Path) -> ModelInfo:
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelFileError(f"{path.name}: unsupported checkpoint type {suffix or '(no suffix)'!r}. Give a "
                             ".safetensors file (preferred), a .ckpt file or a diffusers folder.")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): {_INCOMPLETE}.")
    if suffix != ".safetensors":
        check_zip(path)
        return ModelInfo(path, "single_file")
    keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
    if not any(k.startswith("model.diffusion_model.") for k in keys) or \
            not any(k.startswith("first_stage_model.") for k in keys):
        what = "an embedding" if any(k in ("emb_params", "clip_l", "string_to_param") for k in keys) else \
            "not a full Stable Diffusion checkpoint"
        raise ModelFileError(f"{path} is {what}: a checkpoint needs the UNet (model.diffusion_model.*) and the VAE "
                             f"(first_stage_model.*) in one file. Found: {layout_summary(keys)}")
    two = any(k.startswith("conditioner.embedders.1.") for k in keys)
    return ModelInfo(path, "single_file", 2 if two else 1)
