"""Read and write pseudo-word files in every layout users meet; never run pickled code.

Written: SD1/SD2 `{"emb_params": [k, d]}` safetensors, SDXL `{"clip_l", "clip_g"}` safetensors,
A1111 `.pt` (`string_to_param`) and diffusers `{token: tensor}` on request.
Read: all of those plus OneTrainer's `emp_params`; a file whose vectors are not all finite is refused.
Writes are atomic (temporary file in the same folder, created with the user's umask, then rename), never
replace an existing file unless asked, and a write the disk refuses (full, read-only) is one
`OutputWriteError` that leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import OutputExistsError, UserError
from .families import describe_width

FORMATS = ("textinv", "a1111", "diffusers")
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$")


class EmbeddingFileError(UserError):
    """A pseudo-word file that cannot be read, or cannot be used with the model at hand."""


class OutputWriteError(EmbeddingFileError):
    """A file could not be written (disk full, read-only or missing folder); nothing was left behind."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"Could not write {path}: {reason}. Nothing was written; free some space or choose a "
                         "writable folder, then try again.")


@dataclass
class EmbeddingFile:
    """Vectors of one pseudo-word: encoder key -> [k, width] (key '' when the file does not say)."""

    vectors: dict[str, torch.Tensor]
    name: str
    format: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def validate_name(name: str) -> str:
    """A pseudo-word name is also a file name in every OS: refuse what would break or escape."""
    stripped = name.strip()
    if not stripped:
        raise EmbeddingFileError("The embedding name is empty: give a name such as 'my-cat'.")
    if "/" in stripped or "\\" in stripped or ".." in stripped:
        raise EmbeddingFileError(
            f"The embedding name {name!r} contains '/', '\\' or '..': use a plain name such as 'my-cat'."
        )
    if not _NAME_RE.match(stripped) or stripped.endswith((".", " ")):
        raise EmbeddingFileError(
            f"The embedding name {name!r} has characters that are not allowed in file names: "
            "use letters, digits, '-', '_' and '.', starting with a letter or digit."
        )
    if stripped.split(".")[0].upper() in _RESERVED_NAMES:
        raise EmbeddingFileError(f"The embedding name {name!r} is reserved on Windows: pick another name.")
    return stripped


def vectors_hash(vectors: dict[str, torch.Tensor]) -> str:
    """A short content hash of the vectors, stored in metadata to tell files apart."""
    digest = hashlib.sha256()
    for key in sorted(vectors):
        digest.update(key.encode())
        digest.update(vectors[key].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_layout(vectors: dict[str, torch.Tensor], fmt: str, name: str, metadata: dict[str, str]) -> dict:
    """The tensors dict a given format stores, in that format's key names."""
    check_format(fmt, len(vectors))
    multi = len(vectors) > 1
    if fmt == "textinv" or (multi and fmt == "a1111"):
        # SDXL in A1111 is the same clip_l/clip_g safetensors layout.
        if multi:
            return {key: t for key, t in vectors.items()}
        return {"emb_params": next(iter(vectors.values()))}
    tensor = next(iter(vectors.values()))
    if fmt == "a1111":
        return {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": tensor},
            "name": name,
            "step": int(metadata.get("textinv.steps", "0") or 0),
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
    return {f"<{name}>": tensor}


def check_format(fmt: str, encoder_count: int, path: Path | None = None) -> None:
    """Refuse, before any training, a format (or file suffix) that cannot hold this model's word."""
    if fmt not in FORMATS:
        raise EmbeddingFileError(f"Unknown embedding format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if fmt == "diffusers" and encoder_count > 1:
        raise EmbeddingFileError(
            "The diffusers {token: tensor} form holds one encoder; SDXL words are saved as "
            "clip_l/clip_g (format 'textinv'), which diffusers' SDXL pipeline loads per encoder."
        )
    if path is not None:
        want = default_suffix(fmt, encoder_count)
        if (want == ".pt") != (Path(path).suffix.lower() in (".pt", ".bin")):
            raise EmbeddingFileError(f"{Path(path).name}: this format is stored as {want}; name the file with {want}.")


def default_suffix(fmt: str, encoder_count: int = 1) -> str:
    """A1111 stores single-encoder words as .pt and SDXL words as safetensors."""
    return ".pt" if fmt == "a1111" and encoder_count == 1 else ".safetensors"


def save_embedding(
    path: str | os.PathLike,
    vectors: dict[str, torch.Tensor],
    name: str,
    fmt: str = "textinv",
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write atomically; refuse to replace an existing file unless `overwrite`."""
    path = Path(path)
    name = validate_name(name)
    if not overwrite and path.exists():
        raise OutputExistsError(
            f"{path} already exists: choose another name or output path, or allow overwriting."
        )
    meta = {"textinv.name": name, "textinv.vectors": str(next(iter(vectors.values())).shape[0])}
    meta.update(metadata or {})
    clean = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in vectors.items()}
    if not all(torch.isfinite(v).all() for v in clean.values()):
        raise EmbeddingFileError(f"The vectors of '{name}' hold non-finite values (NaN or infinity): {path} was "
                                 "not written, as no model could use it.")
    meta["textinv.hash"] = vectors_hash(clean)
    check_format(fmt, len(vectors), path)
    layout = file_layout(clean, fmt, name, meta)
    pickled = "string_to_param" in layout

    def write(tmp: str) -> None:
        if pickled:
            torch.save(layout, tmp)
        else:
            from safetensors.torch import save_file

            save_file(layout, tmp, metadata=meta)

    atomic_write(path, write, overwrite)
    return path


def atomic_write(path: Path, write: Callable[[str], None], overwrite: bool) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed into place.

    The file gets mode 0666 minus the umask, as an ordinary file would (mkstemp, and safetensors' own
    atomic write, would give 0600). Whatever fails, no temporary file stays; a failure of the disk or the folder
    (full, read-only, gone) is one OutputWriteError naming the file and the reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_file(path)
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as the kernel applied it
        write(str(tmp))
        os.chmod(tmp, mode)  # writers that replace the file themselves (safetensors >= 0.7) leave it 0600
        _commit(tmp, path, overwrite)
    except UserError:
        raise
    except Exception as error:
        reason = write_failure(error, path.parent)
        if reason is None:
            raise
        raise OutputWriteError(path, reason) from error
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def _new_temp_file(path: Path) -> Path:
    """An empty, new file `.<name>.<random>.tmp` beside `path`, created with the umask's mode."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_failure(error: BaseException, folder: Path) -> str | None:
    """Why writing into `folder` failed, in words, when the disk or folder is to blame; None for anything else.

    Writers report a full disk differently: OSError (errno), safetensors' SafetensorError ('os error 28')
    and torch.save's RuntimeError ('unexpected pos'), which names no cause, so the free space decides.
    """
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    if found:
        return os.strerror(int(found.group(1)))
    if type(error).__name__ == "SafetensorError" or "inline_container" in text or "PytorchStreamWriter" in text:
        try:
            if shutil.disk_usage(folder).free < 1 << 20:
                return os.strerror(errno.ENOSPC)
        except OSError:
            pass
        return f"the writer failed ({text.splitlines()[0] if text else type(error).__name__})"
    return None


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename into place; without overwrite, a hard link fails if a file appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} already exists: choose another name or allow overwriting.") from None
    except OSError as error:  # file systems without hard links
        if path.exists():
            raise OutputExistsError(f"{path} already exists: choose another name or allow overwriting.") from None
        if error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        os.replace(tmp, path)


def load_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """Read any supported layout; `.pt`/`.bin` only through torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"No embedding file at {path}.")
    if path.stat().st_size == 0:
        raise EmbeddingFileError(f"{path} is empty (0 bytes): it is not an embedding file.")
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                data = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises several types for a damaged header
            raise EmbeddingFileError(f"{path} is not a readable safetensors file ({error}).") from error
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise EmbeddingFileError(
                f"{path} contains pickled Python objects beyond plain tensors; it was refused "
                "without running them. Use a .safetensors file, or re-save it from a trusted source."
            ) from error
        except Exception as error:
            raise EmbeddingFileError(f"{path} is not a readable embedding file ({error}).") from error
    vectors, fmt = _vectors_from_layout(data, path)
    for key, tensor in vectors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            where = f" ({key})" if key else ""
            raise EmbeddingFileError(f"{path} holds non-finite values (NaN or infinity: {bad} of {tensor.numel()} "
                                     f"numbers{where}): the word is unusable; use an earlier snapshot of its run.")
    stored_name = data.get("name") if isinstance(data, dict) else None
    name = metadata.get("textinv.name") or (stored_name if isinstance(stored_name, str) else path.stem)
    return EmbeddingFile(vectors=vectors, name=name, format=fmt, metadata=metadata)


def _vectors_from_layout(data: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(data, dict) or not data:
        raise EmbeddingFileError(f"{path} holds no tensors that look like an embedding.")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingFileError(f"{path}: 'string_to_param' is empty.")
        return {"": _as_matrix(next(iter(params.values())), path)}, "a1111"
    for key, fmt in (("emb_params", "textinv"), ("emp_params", "onetrainer")):
        if key in data:
            return {"": _as_matrix(data[key], path)}, fmt
    per_encoder = {k: data[k] for k in ("clip_l", "clip_g", "clip_h") if k in data}
    if per_encoder:
        return {k: _as_matrix(v, path) for k, v in per_encoder.items()}, "textinv"
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        return {"": _as_matrix(next(iter(tensors.values())), path)}, "diffusers"
    raise EmbeddingFileError(
        f"{path} does not look like an embedding: keys {sorted(map(str, data))[:6]}; expected "
        "emb_params, string_to_param, clip_l/clip_g, or a single {token: tensor}."
    )


def _as_matrix(value: object, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise EmbeddingFileError(f"{path}: the embedding is not a [vectors, width] tensor.")
    tensor = value.detach().to(torch.float32)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def vectors_for_encoders(embedding: EmbeddingFile, encoders: dict[str, int]) -> dict[str, torch.Tensor]:
    """Match a file's vectors to a model's encoders, or say clearly why they do not fit."""
    source = embedding.vectors
    if "" in source:
        if len(encoders) != 1:
            keys = ", ".join(f"{k} {describe_width(w)}" for k, w in encoders.items())
            raise EmbeddingFileError(
                f"Embedding '{embedding.name}' has one set of vectors, {describe_width(source[''].shape[1])}; "
                f"this model needs one per text encoder ({keys}): it was trained for another model family."
            )
        source = {next(iter(encoders)): source[""]}
    missing = [key for key in encoders if key not in source]
    if missing:
        have = ", ".join(f"{k} {describe_width(v.shape[1])}" for k, v in source.items())
        raise EmbeddingFileError(
            f"Embedding '{embedding.name}' has {have} but this model needs {', '.join(missing)}: "
            "it was trained for another model family."
        )
    out = {}
    for key, width in encoders.items():
        got = source[key].shape[1]
        if got != width:
            raise EmbeddingFileError(
                f"Embedding '{embedding.name}' is {describe_width(got)} but this model's text encoder "
                f"'{key}' is {describe_width(width)}: it was trained for another model family."
            )
        out[key] = source[key]
    counts = {t.shape[0] for t in out.values()}
    if len(counts) != 1:
        raise EmbeddingFileError(f"Embedding '{embedding.name}' has different vector counts per encoder.")
    return out
