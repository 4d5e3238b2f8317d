"""One training job inside an Automatic1111-family web UI, shared by the HTTP route and the tab.

A request (a dict: the route's JSON body, or the tab's fields) becomes a TrainConfig whose unset
fields keep TrainConfig's own defaults; the images come as base64 data or from a folder. The host
is picked for the stack the web UI runs (a1111.py for A1111's ldm/sgm models, forge.py for Forge's
backend); progress, the live preview and the Interrupt button are the web UI's own `shared.state`;
the finished word is written atomically to the web UI's embeddings folder in the layout it loads
and registered at once, so the next txt2img can use it. Snapshots go beside the embeddings folder
(`<data dir>/textinv/snapshots/<name>`), never inside it, where the web UI would load them as words.

Web-UI modules are imported only inside functions; importing this module imports no web UI.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import TrainConfig, TrainingError
from ..errors import UserError
from ..observer import TrainingObserver

log = logging.getLogger(__name__)
# Request keys that are not TrainConfig fields.
REQUEST_ONLY = ("images", "folder", "overwrite", "resume")
_status_lock = threading.Lock()
_status: dict[str, Any] = {"running": False, "job": None}


def status() -> dict[str, Any]:
    """The current (or last) job: name, step, total, losses, evaluations, preview (PNG base64), result."""
    with _status_lock:
        job = dict(_status["job"]) if _status["job"] else None
        return {"running": _status["running"], "job": job}


def _update(**values) -> None:
    with _status_lock:
        if _status["job"] is not None:
            _status["job"].update(values)


# -- which host -------------------------------------------------------------------------------
def stack_of(model) -> str:
    """'forge' (Forge's backend), 'reforge' (A1111 shell over ldm_patched) or 'a1111' (ldm/sgm)."""
    if hasattr(model, "text_processing_engine") or hasattr(model, "text_processing_engine_l"):
        return "forge"
    if hasattr(model, "forge_objects"):
        return "reforge"
    return "a1111"


def host_for_loaded_model():
    from modules import sd_models, shared

    from ..host import HostError

    if hasattr(sd_models, "forge_model_reload"):
        sd_models.forge_model_reload()  # Forge loads the selected checkpoint lazily, at the first job
    model = shared.sd_model
    if model is None:
        raise HostError("No checkpoint is loaded in the web UI: load one, then train.")
    stack = stack_of(model)
    if stack == "forge":
        from .forge import ForgeHost

        return ForgeHost(model)
    if stack == "reforge":
        from .reforge import ReForgeHost

        return ReForgeHost(model)
    from .a1111 import A1111Host

    return A1111Host(model)


def reload_words_after_model_load(sd_model) -> None:
    """reForge's model loader leaves out A1111's reload of the embeddings after a checkpoint loads
    (sd_models.load_model), so words read while another family was loaded stay skipped: after a
    switch from SD1.5 to SDXL, an SDXL word (textinv's or any other) silently does nothing until the
    folder changes. This puts A1111's reload back, on reForge only (A1111 does it itself, Forge
    keeps a database per text encoder)."""
    if stack_of(sd_model) != "reforge":
        return
    from modules import sd_hijack

    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


# -- folders ----------------------------------------------------------------------------------
def embeddings_dir() -> Path:
    from modules import shared

    folder = getattr(shared.cmd_opts, "embeddings_dir", None)
    if not folder:
        from modules import paths_internal

        folder = str(Path(paths_internal.data_path) / "embeddings")
    return Path(folder)


def snapshots_dir(name: str) -> Path:
    from modules import paths_internal

    return Path(paths_internal.data_path) / "textinv" / "snapshots" / name


# -- requests ---------------------------------------------------------------------------------
def config_from_request(request: dict, image_count: int, captions: list[str] | None) -> TrainConfig:
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(request) - set(known) - set(REQUEST_ONLY))
    if unknown:
        raise TrainingError(f"Unknown training settings: {', '.join(unknown)}.")
    values = {k: v for k, v in request.items() if k in known and v is not None}
    if "name" not in values:
        raise TrainingError("Give the word a name, e.g. 'my-cat'.")
    for key in ("progressive_steps", "timestep_range"):
        if key in values:
            values[key] = tuple(values[key])
    if captions is not None and "captions" not in values:
        values["captions"] = captions
    return TrainConfig(**values)


def images_from_request(request: dict) -> tuple[list, list[str] | None]:
    """(PIL images, captions from <image>.txt files or None) from base64 'images' or a 'folder'."""
    from PIL import Image

    from ..data import DataError, find_image_files, open_image, to_rgb

    if request.get("images"):
        images = []
        for i, item in enumerate(request["images"]):
            data = item.split(",", 1)[1] if isinstance(item, str) and item.startswith("data:") else item
            try:
                image = Image.open(io.BytesIO(base64.b64decode(data)))
                image.load()
            except Exception as error:  # noqa: BLE001 - any undecodable upload is the user's to fix
                raise DataError(f"Image {i + 1} of the request cannot be read ({error}): send PNG or JPEG.") from error
            images.append(to_rgb(image))
        return images, None
    if request.get("folder"):
        files = find_image_files([request["folder"]])
        captions = None
        if request.get("templates") == "captions" and not request.get("captions"):
            captions = []
            for path in files:
                text = path.with_suffix(".txt")
                if not text.is_file():
                    raise DataError(f"templates=captions needs {text.name} beside {path.name}.")
                captions.append(text.read_text(encoding="utf-8").strip())
        return [open_image(path) for path in files], captions
    raise DataError("No training images: upload images or give a folder of images.")


# -- progress through the web UI's own job state ----------------------------------------------
class WebUIObserver(TrainingObserver):
    """Reports to `shared.state` (progress bar, live preview, Interrupt) and to `status()`."""

    def __init__(self, state):
        self.state = state

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.state.sampling_step = step
        self.state.sampling_steps = total
        self.state.textinfo = f"textinv: step {step}/{total}, loss {loss:.4f}"
        with _status_lock:
            job = _status["job"]
            if job is not None:
                job["step"], job["total"] = step, total
                job["losses"].append(loss)

    def on_eval(self, step: int, eval_loss: float) -> None:
        with _status_lock:
            if _status["job"] is not None:
                _status["job"]["evals"].append([step, eval_loss])

    def on_snapshot(self, step: int, path: Path) -> None:
        _update(snapshot=str(path))

    def on_preview(self, step: int, image: Any) -> None:
        try:
            self.state.assign_current_image(image)
        except Exception:  # noqa: BLE001 - the live preview is a view, not the work
            log.debug("textinv: the web UI did not take the preview", exc_info=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _update(preview=base64.b64encode(buffer.getvalue()).decode(), preview_step=step)

    def should_stop(self) -> bool:
        return bool(self.state.interrupted or getattr(self.state, "stopping_generation", False))


def train_request(request: dict, manage_state: bool = True) -> dict:
    """Train one word as `request` asks; the caller holds the web UI's queue lock. The tab's job
    wrapper begins and ends the web UI's job itself (manage_state=False)."""
    from modules import shared

    from ..embedding_file import save_embedding, validate_name
    from ..metadata import training_metadata
    from ..trainer import train

    name = validate_name(str(request.get("name") or ""))
    images, captions = images_from_request(request)
    config = config_from_request(dict(request, name=name), len(images), captions)
    config.validate(len(images))
    target = embeddings_dir() / f"{name}.safetensors"
    overwrite = bool(request.get("overwrite"))
    if target.exists() and not overwrite:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{target} already exists: choose another name, or allow overwriting.")
    host = host_for_loaded_model()
    snapshot_dir = snapshots_dir(name)
    resume = snapshot_dir if request.get("resume") else None
    state = shared.state
    with _status_lock:
        _status["running"] = True
        _status["job"] = {"name": name, "family": host.family, "step": 0, "total": config.steps, "losses": [],
                          "evals": [], "preview": None, "snapshot": None, "result": None, "error": None,
                          "started": time.time()}
    if manage_state:
        state.begin(job="textinv")
    state.job_count = 1
    state.sampling_steps = config.steps
    state.textinfo = f"textinv: training {name}"
    try:
        with host.training():
            result = train(host, images, config, observer=WebUIObserver(state), snapshot_dir=snapshot_dir,
                           resume_from=resume)
        out = {"name": name, "family": host.family, "steps_run": result.steps_run,
               "stopped_reason": result.stopped_reason, "init_eval_loss": result.init_eval_loss,
               "best_eval_loss": result.best_eval_loss, "best_step": result.best_step,
               "train_losses": result.train_losses, "eval_losses": result.eval_losses,
               "snapshot": str(result.snapshot_path) if result.snapshot_path else None, "path": None}
        if result.stopped_reason != "cancelled":
            metadata = training_metadata(host.family, config, result)
            saved = save_embedding(target, result.vectors, name, metadata=metadata, overwrite=overwrite)
            host.register_word(saved)
            out["path"] = str(saved)
        _update(result=out)
        return out
    except UserError as error:
        _update(error=str(error))
        raise
    finally:
        if manage_state:
            state.end()
        with _status_lock:
            _status["running"] = False


def load_word(path: str, overwrite: bool = False) -> dict:
    """Check a word file against the loaded model (one clear error for another family), copy it into
    the embeddings folder and register it."""
    import shutil

    from ..embedding_file import EmbeddingFileError, load_embedding, validate_name, vectors_for_encoders
    from ..families import FAMILY_NAMES, family_of_encoders

    source = Path(path)
    embedding = load_embedding(source)
    host = host_for_loaded_model()
    keys = set(embedding.vectors) - {""}
    if keys and keys != set(host.encoders):
        # The web UIs skip such a file (a file's clip_l alone is not an SDXL word, nor is an SDXL word's
        # clip_l an SD1 word), so it is refused here rather than registered to no effect.
        theirs = FAMILY_NAMES.get(family_of_encoders(keys) or "", "+".join(sorted(keys)))
        raise EmbeddingFileError(
            f"Embedding '{embedding.name}' is a {theirs} word ({', '.join(sorted(keys))}) but the loaded model is "
            f"{FAMILY_NAMES[host.family]} ({', '.join(host.encoders)}): it was trained for another model family.")
    vectors = vectors_for_encoders(embedding, host.encoders)
    name = validate_name(source.stem)
    target = embeddings_dir() / f"{name}{source.suffix}"
    if target.resolve() != source.resolve():
        if target.exists() and not overwrite:
            raise EmbeddingFileError(f"{target} already exists: allow overwriting, or rename the file.")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    host.register_word(target)
    return {"name": name, "family": host.family, "path": str(target),
            "vectors": int(next(iter(vectors.values())).shape[0])}
