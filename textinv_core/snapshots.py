"""Snapshots of a run: a loadable embedding of the vectors so far, and the state to resume from.

Both files are written atomically into the snapshot folder (`<name>-stepNNNNNN.safetensors` and
`<name>.resume.safetensors`); a resumed run with the same images and settings retraces the
uninterrupted one exactly. Only settings that cannot change the trajectory may differ on resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .config import TrainConfig, TrainingError
from .embedding_file import save_embedding
from .metadata import snapshot_metadata

MAY_CHANGE_ON_RESUME = ("steps", "snapshot_every", "preview_every", "preview_prompt", "memory")


def resume_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}.resume.safetensors"


def write_snapshot(folder: Path, name: str, step: int, vectors: dict[str, torch.Tensor], family: str,
                   state: dict[str, torch.Tensor], meta: dict) -> Path:
    """The embedding of `vectors` at `step` and the resume state; returns the embedding's path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    embedding = folder / f"{name}-step{step:06d}.safetensors"
    save_embedding(embedding, vectors, name, metadata=snapshot_metadata(family, step), overwrite=True)
    target = resume_path(folder, name)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(state, str(tmp), metadata={"textinv.resume": json.dumps(meta)})
    tmp.replace(target)
    return embedding


def read_resume(path: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the resume state in a snapshot folder, or named by any file in that folder."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_file() and not path.name.endswith(".resume.safetensors"):
        path = path.parent
    if path.is_dir():
        path = resume_path(path, name)
    if not path.is_file():
        raise TrainingError(f"No resume state at {path}: point to the snapshot folder of an earlier run.")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["textinv.resume"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return meta, tensors


def check_resumable(meta: dict, config: TrainConfig, fingerprint: str) -> None:
    """Refuse a resume whose settings or images differ from the saved run's (it would not retrace it)."""
    saved = meta["config"]
    mine = asdict(config)
    defaults = asdict(TrainConfig(name=config.name))  # settings added since a file was written
    differing = [k for k in mine if k not in MAY_CHANGE_ON_RESUME
                 and json.dumps(saved.get(k, defaults[k])) != json.dumps(mine[k])]
    if differing:
        raise TrainingError(f"Cannot resume: settings differ from the saved run ({', '.join(differing)}).")
    if meta["fingerprint"] != fingerprint:
        raise TrainingError("Cannot resume: the training images differ from the saved run's.")
