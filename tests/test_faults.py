"""Bad inputs against `textinv train`: one clear line, nothing existing changed, nothing half-written.

Each case builds a workspace (images, an existing word, the tiny model linked in, damaged copies of its
files where the case needs them), records every file's bytes and mode, runs the command, and asserts:
exit status 2 with exactly one line on stderr that names the problem; the tree is exactly as before (so
no output, no temporary, no zero-byte file was left). All of these fail before any model loads, so the
matrix takes seconds. Mid-run faults are in test_faults_runs.py, engine calls in test_faults_engine.py.
The helpers here are shared with both.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from textinv_core.cli import main
from textinv_core.config import TrainConfig
from textinv_core.embedding_file import save_embedding

from .conftest import make_images

# -- shared helpers -----------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: files by content hash and mode, links by target, folders by name."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o777)
    return out


def one_error_line(code: int, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one non-empty line on stderr, the error, naming every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("textinv: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def no_partial_files(root: Path, before: dict[str, tuple] | None = None) -> None:
    """No temporary file anywhere under root, and no zero-byte file that was not there before."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert not path.name.endswith(".tmp"), path
            assert path.stat().st_size > 0 or str(path.relative_to(root)) in (before or {}), f"zero-byte file {path}"


def run_cli(argv: list[str]) -> int:
    """`textinv ...` in this process; the exit status a shell would see (argparse exits on usage mistakes)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


@dataclasses.dataclass
class QuickConfig(TrainConfig):
    eval_draws: int = 4  # the CLI has no flag for it; 16 draws would only cost CPU here


@dataclass
class Workspace:
    root: Path
    images: Path
    model: Path
    out: Path           # the --output file (its folder exists, empty)
    existing: Path      # a word written before, which nothing may change
    host: object = None  # the session's tiny SD1 host, for runs that need a model in memory

    def args(self, *extra: str, **options: str) -> list[str]:
        """`train` arguments for a short run; options replace --model/--images/--name/--output."""
        chosen = {"model": str(self.model), "images": str(self.images), "name": "w", "output": str(self.out)}
        chosen.update(options)
        argv = ["train"]
        for key, value in chosen.items():
            if value is not None:
                argv += [f"--{key}", value]
        return argv + ["--init-word", "cat", "--steps", "4", "--resolution", "32", "--batch", "2", "--lr", "0.05",
                       "--eval-every", "2", "--snapshot-every", "2", "--preview-every", "0", "--memory", "fast",
                       *extra]

    def use_host(self, monkeypatch, host=None) -> None:
        """The CLI trains on `host` (default: the tiny model already in memory) instead of loading --model,
        and evaluates on 4 draws: the code under test is the same, the CPU time a fraction."""
        import textinv_core.config as config_module
        from textinv_core.hosts.diffusers_host import DiffusersHost

        chosen = host or self.host
        monkeypatch.setattr(DiffusersHost, "load", classmethod(lambda cls, *a, **k: chosen))
        monkeypatch.setattr(config_module, "TrainConfig", QuickConfig)


def make_workspace(root: Path, model_folder: Path, host=None) -> Workspace:
    images = root / "images"
    images.mkdir()
    for i, image in enumerate(make_images(3)):
        image.save(images / f"{i}.png")
    (root / "out").mkdir()
    model = root / "model"
    model.symlink_to(model_folder, target_is_directory=True)
    existing = save_embedding(root / "old.safetensors", {"clip_l": torch.randn(1, 768)}, "old")
    return Workspace(root, images, model, root / "out" / "w.safetensors", existing, host)


def damaged_model(ws: Workspace, relpath: str, how: str) -> Path:
    """A copy of the tiny model folder (files linked, not copied) with one file removed, cut or replaced."""
    source = ws.model.resolve()
    copy = ws.root / "damaged"
    for folder, _dirs, files in os.walk(source):
        target = copy / Path(folder).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).symlink_to(Path(folder) / name)
    victim = copy / relpath
    if how == "remove-folder":
        shutil.rmtree(victim)
        return copy
    data = (source / relpath).read_bytes() if (source / relpath).exists() else b""
    victim.unlink(missing_ok=True)
    if how == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        victim.write_bytes(b"{ this is not json")
    elif how != "remove":
        victim.write_bytes(how.encode())
    return copy


@pytest.fixture
def ws(tmp_path, tiny_sd1_folder, tiny_host) -> Workspace:
    return make_workspace(tmp_path, tiny_sd1_folder, tiny_host("sd1"))


# -- the matrix: (case id, setup(ws, monkeypatch) -> argv, words the one line must contain) ---------------


def _png(path: Path, size=(40, 48)) -> None:
    make_images(1, seed=7, size=size)[0].save(path)


def _bad_image(ws, mp, name: str, data: bytes):
    (ws.images / name).write_bytes(data)
    return ws.args()


def _truncated_png(ws, mp):
    _png(ws.root / "full.png")
    data = (ws.root / "full.png").read_bytes()
    (ws.root / "full.png").unlink()
    (ws.images / "cut.png").write_bytes(data[: len(data) // 2])
    return ws.args()


def _bomb(limit: int):
    def setup(ws, mp):
        mp.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 40 x 48 = 1920 pixels
        return ws.args()
    return setup


def _captions(ws, mp, text: bytes | None):
    for i in range(3):
        if text is not None or i < 2:
            (ws.images / f"{i}.txt").write_bytes(b"a photo of {}" if i < 2 or text is None else text)
    return ws.args("--templates", "captions")


def _broken_link(ws, mp):
    (ws.images / "gone.png").symlink_to(ws.root / "nowhere.png")
    return ws.args()


def _readonly(ws, mp, code: int):
    import textinv_core.inputs as inputs

    def refuse(fd, size):
        raise OSError(code, os.strerror(code))
    mp.setattr(inputs, "_probe_write", refuse)
    return ws.args()


def _disk_full_by_usage(ws, mp):
    import textinv_core.inputs as inputs

    real = shutil.disk_usage
    mp.setattr(inputs.shutil, "disk_usage", lambda path: real(path)._replace(free=4096))
    return ws.args()


def _resume_state(ws, how: str):
    """A snapshot folder of an earlier short run of 'w' (made by the engine), damaged as `how` says."""
    from textinv_core.trainer import TrainConfig, train

    folder = ws.root / "earlier.snapshots"
    config = TrainConfig(name="w", init_word="cat", steps=2, learning_rate=0.05, batch_size=2, resolution=32,
                         eval_every=2, eval_draws=4, snapshot_every=2, preview_every=0, memory="fast")
    train(ws.host, [Image.open(p) for p in sorted(ws.images.glob("*.png"))], config, snapshot_dir=folder)
    state = folder / "w.resume.safetensors"
    if how == "truncate":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) - 100])
    elif how == "rename":
        state.rename(folder / "other.resume.safetensors")
    return folder


def _single_file(ws, content: bytes | str, suffix: str = ".safetensors"):
    path = ws.root / f"checkpoint{suffix}"
    if isinstance(content, str) and content == "embedding":
        save_embedding(path, {"clip_l": torch.zeros(1, 768)}, "emb")
    elif isinstance(content, str) and content == "truncated":
        from safetensors.torch import save_file

        save_file({"model.diffusion_model.x": torch.zeros(1000), "first_stage_model.y": torch.zeros(1000)}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[:-500])
    else:
        path.write_bytes(content)
    return ws.args(model=str(path))


CASES = {
    # images: every one is used or the run is refused with its name; nothing is skipped without a word
    "images-folder-empty": (lambda ws, mp: ws.args(images=str(_mkdir(ws.root / "empty"))), ["No training images"]),
    "images-path-missing": (lambda ws, mp: ws.args(images=str(ws.root / "nope")), ["nope", "does not exist"]),
    "image-zero-bytes": (lambda ws, mp: _bad_image(ws, mp, "zero.png", b""), ["zero.png", "0 bytes"]),
    "image-garbage-among-good": (lambda ws, mp: _bad_image(ws, mp, "bad.jpg", b"\xff\xd8\xffjunk"),
                                 ["bad.jpg", "cannot be read"]),
    "image-unreadable-format-among-good": (lambda ws, mp: _bad_image(ws, mp, "IMG_1.heic", b"\0\0\0 ftypheic"),
                                           ["IMG_1.heic", "not an image"]),
    "image-no-suffix-not-image": (lambda ws, mp: _bad_image(ws, mp, "notes", b"hello"), ["notes", "not an image"]),
    "image-truncated-png": (_truncated_png, ["cut.png", "cannot be read"]),
    "image-broken-link": (_broken_link, ["gone.png", "broken link"]),
    "image-decompression-bomb-warning": (_bomb(1000), ["0.png", "1,000 pixels", "decompression bomb"]),
    "image-decompression-bomb-error": (_bomb(500), ["0.png", "500 pixels", "decompression bomb"]),
    "captions-missing-file": (lambda ws, mp: _captions(ws, mp, None), ["2.txt", "beside 2.png"]),
    "captions-not-utf8": (lambda ws, mp: _captions(ws, mp, "caf\xe9 {}".encode("latin-1")), ["2.txt", "UTF-8"]),
    # names
    "name-dotdot": (lambda ws, mp: ws.args(name="../escape"), ["'../escape'", ".."]),
    "name-slash": (lambda ws, mp: ws.args(name="a/b"), ["'a/b'"]),
    "name-empty": (lambda ws, mp: ws.args(name=" "), ["name is empty"]),
    "name-reserved": (lambda ws, mp: ws.args(name="CON"), ["reserved"]),
    "name-colon": (lambda ws, mp: ws.args(name="a:b"), ["not allowed"]),
    # settings: each message names the flag
    "steps-zero": (lambda ws, mp: ws.args("--steps", "0"), ["--steps", "at least 1"]),
    "steps-negative": (lambda ws, mp: ws.args("--steps", "-5"), ["--steps"]),
    "lr-negative": (lambda ws, mp: ws.args("--lr", "-1"), ["--lr"]),
    "lr-nan": (lambda ws, mp: ws.args("--lr", "nan"), ["--lr"]),
    "lr-overflows-adamw": (lambda ws, mp: ws.args("--lr", "1e38"), ["--lr", "up to 100"]),
    "eval-every-zero": (lambda ws, mp: ws.args("--eval-every", "0"), ["--eval-every", "at least 1"]),
    "batch-zero": (lambda ws, mp: ws.args("--batch", "0"), ["--batch"]),
    "resolution-zero": (lambda ws, mp: ws.args("--resolution", "0"), ["--resolution"]),
    "resolution-not-a-multiple": (lambda ws, mp: ws.args("--resolution", "36"), ["--resolution 36", "multiple of 8"]),
    "vectors-zero": (lambda ws, mp: ws.args("--vectors", "0"), ["--vectors", "between 1 and 75"]),
    "vectors-over-75": (lambda ws, mp: ws.args("--vectors", "80"), ["--vectors"]),
    "vectors-more-than-prompt-holds": (lambda ws, mp: ws.args("--vectors", "70"), ["--vectors 70", "68 or less"]),
    "vectors-captions-too-long": (lambda ws, mp: _long_caption(ws), ["--vectors", "room for"]),
    "caption-longer-than-a-prompt": (lambda ws, mp: _long_caption(ws, 30), ["caption", "shorten it"]),
    "resume-state-of-another-family": (lambda ws, mp: _other_family(ws, mp), ["clip_l 768", "clip_h 1024"]),
    "progressive-not-numbers": (lambda ws, mp: ws.args("--progressive", "2,x", "--vectors", "2"), ["--progressive"]),
    "progressive-without-vectors": (lambda ws, mp: ws.args("--progressive", "2", "--vectors", "1"),
                                    ["--progressive", "--vectors"]),
    "snapshot-every-negative": (lambda ws, mp: ws.args("--snapshot-every", "-1"), ["--snapshot-every"]),
    "max-norm-negative": (lambda ws, mp: ws.args("--max-norm", "-1"), ["--max-norm"]),
    "seed-too-large": (lambda ws, mp: ws.args("--seed", str(2 ** 64)), ["--seed"]),
    "vectors-not-a-number": (lambda ws, mp: ws.args("--vectors", "abc"), ["--vectors", "invalid int"]),
    "templates-unknown": (lambda ws, mp: ws.args("--templates", "poem"), ["--templates", "invalid choice"]),
    "name-missing": (lambda ws, mp: ws.args(name=None), ["--name"]),
    "device-not-a-device": (lambda ws, mp: ws.args("--device", "gpu0"), ["--device", "not a device"]),
    # output
    "output-exists": (lambda ws, mp: ws.args(output=str(ws.existing)), ["already exists", "--overwrite"]),
    "output-is-a-folder": (lambda ws, mp: ws.args(output=str(ws.images)), ["is a folder"]),
    "output-bad-suffix": (lambda ws, mp: ws.args(output=str(ws.root / "out" / "w.png")), ["w.png", ".safetensors"]),
    "output-format-suffix-mismatch": (lambda ws, mp: ws.args("--format", "a1111"), ["stored as .pt"]),
    "output-parent-is-a-file": (lambda ws, mp: ws.args(output=str(ws.existing / "w.safetensors")),
                                ["cannot be created", "is a file"]),
    "output-folder-read-only": (lambda ws, mp: _readonly(ws, mp, errno.EROFS), ["not writable", "Read-only"]),
    "output-folder-no-permission": (lambda ws, mp: _readonly(ws, mp, errno.EACCES), ["not writable",
                                                                                      "Permission denied"]),
    "output-disk-full-by-free-space": (_disk_full_by_usage, ["free", "needs about"]),
    "output-disk-full-at-test-write": (lambda ws, mp: _readonly(ws, mp, errno.ENOSPC), ["No space left"]),
    "snapshot-folder-is-a-file": (lambda ws, mp: _snapshot_file(ws), ["w.snapshots", "is a file"]),
    # resume
    "resume-missing": (lambda ws, mp: ws.args("--resume", str(ws.root / "nope.snapshots")), ["--resume", "nope"]),
    "resume-folder-without-state": (lambda ws, mp: ws.args("--resume", str(ws.images)), ["no resume state"]),
    "resume-state-of-another-word": (lambda ws, mp: ws.args("--resume", str(_resume_state(ws, "rename"))),
                                     ["resume state of other"]),
    "resume-state-truncated": (lambda ws, mp: ws.args("--resume", str(_resume_state(ws, "truncate"))),
                               ["w.resume.safetensors", "damaged"]),
    "resume-settings-differ": (lambda ws, mp: ws.args("--seed", "5", "--resume", str(_resume_state(ws, ""))),
                               ["Cannot resume", "seed"]),
    # model paths: damaged downloads are named, found from headers before any loading
    "model-missing": (lambda ws, mp: ws.args(model=str(ws.root / "no-model")), ["--model", "no-model"]),
    "model-folder-not-diffusers": (lambda ws, mp: ws.args(model=str(ws.images)), ["model_index.json"]),
    "model-index-corrupt": (lambda ws, mp: ws.args(model=str(damaged_model(ws, "model_index.json", "garbage"))),
                            ["model_index.json", "not valid JSON"]),
    "model-component-missing": (lambda ws, mp: ws.args(model=str(damaged_model(ws, "unet", "remove-folder"))),
                                ["unet", "missing"]),
    "model-vae-listed-but-missing": (lambda ws, mp: ws.args(model=str(damaged_model(ws, "vae", "remove-folder"))),
                                     ["vae", "missing"]),
    "model-unet-weights-truncated": (
        lambda ws, mp: ws.args(model=str(damaged_model(ws, "unet/diffusion_pytorch_model.safetensors", "truncate"))),
        ["diffusion_pytorch_model.safetensors", "truncated"]),
    "model-text-encoder-weights-missing": (
        lambda ws, mp: ws.args(model=str(damaged_model(ws, "text_encoder/model.safetensors", "remove"))),
        ["text_encoder", "no weight file"]),
    "model-unet-config-corrupt": (lambda ws, mp: ws.args(model=str(damaged_model(ws, "unet/config.json", "garbage"))),
                                  ["unet/config.json", "not valid JSON"]),
    "model-scheduler-config-missing": (
        lambda ws, mp: ws.args(model=str(damaged_model(ws, "scheduler/scheduler_config.json", "remove"))),
        ["scheduler_config.json", "missing"]),
    "checkpoint-truncated": (lambda ws, mp: _single_file(ws, "truncated"), ["checkpoint.safetensors", "truncated"]),
    "checkpoint-is-an-embedding": (lambda ws, mp: _single_file(ws, "embedding"), ["is an embedding"]),
    "checkpoint-zero-bytes": (lambda ws, mp: _single_file(ws, b""), ["0 bytes"]),
    "checkpoint-garbage-safetensors": (lambda ws, mp: _single_file(ws, b"\x10\0\0\0\0\0\0\0{not json}......"),
                                       ["damaged safetensors header"]),
    "checkpoint-ckpt-truncated-zip": (lambda ws, mp: _single_file(ws, b"PK\x03\x04" + b"\0" * 200, ".ckpt"),
                                      ["checkpoint.ckpt", "truncated or damaged"]),
    "checkpoint-ckpt-not-a-checkpoint": (lambda ws, mp: _single_file(ws, b"hello world", ".ckpt"),
                                         ["not a checkpoint"]),
    "checkpoint-unsupported-suffix": (lambda ws, mp: _single_file(ws, b"x", ".gguf"), ["unsupported checkpoint"]),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _long_caption(ws, repeats: int = 10):
    for i in range(3):
        (ws.images / f"{i}.txt").write_text("a photo of {} " + "on a very long and winding road " * repeats,
                                            encoding="utf-8")
    return ws.args("--templates", "captions", "--vectors", "20")


def _other_family(ws, mp):
    """An SD1 run's snapshot resumed on an SD2 model: refused once the model is known, before any step."""
    from types import SimpleNamespace

    folder = _resume_state(ws, "")
    ws.use_host(mp, SimpleNamespace(encoders={"clip_h": 1024}, family="sd2"))
    return ws.args("--steps", "2", "--resume", str(folder))


def _snapshot_file(ws):
    (ws.root / "out" / "w.snapshots").write_text("not a folder")
    return ws.args()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_line_and_changes_nothing(case, ws, monkeypatch, capsys):
    setup, needles = CASES[case]
    argv = setup(ws, monkeypatch)
    capsys.readouterr()
    before = tree(ws.root)
    code = run_cli(argv)
    one_error_line(code, capsys.readouterr().err, *needles)
    assert tree(ws.root) == before
    no_partial_files(ws.root, before)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_training(ws, capsys):
    ws.out.parent.chmod(0o555)
    try:
        before = tree(ws.root)
        one_error_line(run_cli(ws.args()), capsys.readouterr().err, "not writable")
        assert tree(ws.root) == before
    finally:
        ws.out.parent.chmod(0o755)


def test_a_folder_of_images_with_captions_hidden_files_and_subfolders_trains(ws, monkeypatch, capsys):
    """What may sit beside images is passed over without a word; a clean success writes the word only."""
    ws.use_host(monkeypatch)
    (ws.images / "0.txt").write_text("a caption", encoding="utf-8")
    (ws.images / ".DS_Store").write_bytes(b"\0\1")
    (ws.images / "rejects").mkdir()
    _png(ws.images / "photo.jfif")
    assert run_cli(ws.args("--steps", "2")) == 0
    assert ws.out.is_file() and "wrote" in capsys.readouterr().out
    no_partial_files(ws.root)
