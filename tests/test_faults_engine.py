"""The same promises one layer down, for front ends that call the engine (nodes, web UI, scripts).

Each engine call given a bad input or a fault raises the specific UserError with a one-line message that
names the file or setting, leaves every existing file byte-identical and no temporary file behind; out of
memory keeps its own exception and gains a note.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from textinv_core.config import TrainConfig, TrainingError
from textinv_core.data import DataError
from textinv_core.embedding_file import EmbeddingFileError, OutputWriteError, load_embedding, save_embedding
from textinv_core.errors import UserError
from textinv_core.host import HostError
from textinv_core.inputs import (
    InputError,
    check_images,
    check_number,
    check_resume,
    check_settings,
    check_training,
    check_word_file,
    prompt_room,
)
from textinv_core.model_files import ModelFileError, read_safetensors_header
from textinv_core.snapshots import SnapshotWriteError, read_resume
from textinv_core.trainer import train

from .conftest import make_images
from .test_faults import damaged_model, make_workspace, no_partial_files, tree
from .test_faults_runs import FaultyHost, failing_save_file


def config(**overrides) -> TrainConfig:
    values = dict(name="w", init_word="cat", steps=4, learning_rate=0.05, batch_size=2, resolution=32,
                  eval_every=2, eval_draws=4, snapshot_every=2, preview_every=0, memory="fast")
    values.update(overrides)
    return TrainConfig(**values)


def one_line(error: BaseException, *needles: str) -> str:
    text = str(error)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


@pytest.fixture
def ws(tmp_path, tiny_sd1_folder, tiny_host):
    return make_workspace(tmp_path, tiny_sd1_folder, tiny_host("sd1"))


def _unchanged(ws, before):
    assert tree(ws.root) == before
    no_partial_files(ws.root, before)


# -- files the engine writes ------------------------------------------------------------------------------

def test_a_full_disk_while_replacing_a_word_keeps_the_old_one(ws, monkeypatch):
    failing_save_file(monkeypatch, ws.existing.parent, 1)
    before = tree(ws.root)
    with pytest.raises(OutputWriteError) as info:
        save_embedding(ws.existing, {"clip_l": torch.ones(1, 768)}, "old", overwrite=True)
    one_line(info.value, str(ws.existing), "No space left on device")
    _unchanged(ws, before)


def test_torch_saves_cryptic_full_disk_error_is_named(ws, monkeypatch):
    def full(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    before = tree(ws.root)
    with pytest.raises(OutputWriteError) as info:
        save_embedding(ws.root / "w.pt", {"clip_l": torch.ones(1, 768)}, "w", fmt="a1111")
    one_line(info.value, "w.pt", "No space left on device")
    _unchanged(ws, before)


def test_a_word_with_nan_is_refused_when_read(ws):
    from safetensors.torch import save_file

    path = ws.root / "nan.safetensors"
    save_file({"clip_l": torch.full((1, 768), math.nan), "clip_g": torch.zeros(1, 1280)}, str(path))
    before = tree(ws.root)
    with pytest.raises(EmbeddingFileError) as info:
        load_embedding(path)
    one_line(info.value, "nan.safetensors", "non-finite", "clip_l")
    with pytest.raises(EmbeddingFileError):
        check_word_file(path)
    _unchanged(ws, before)


def test_a_missing_word_file_is_named(ws):
    with pytest.raises(UserError) as info:
        check_word_file(ws.root / "gone.safetensors", "embedding_file")
    one_line(info.value, "embedding_file", "gone.safetensors")


@pytest.mark.parametrize("value", [math.nan, math.inf, 11.0, "1", True])
def test_a_strength_that_is_no_finite_number_in_range_is_refused(value):
    with pytest.raises(InputError) as info:
        check_number(value, "strength", -10, 10)
    one_line(info.value, "strength")


# -- training through the engine ---------------------------------------------------------------------------

def test_a_snapshot_the_disk_refuses_stops_training_and_names_the_last_one(ws, monkeypatch):
    folder = ws.root / "snaps"
    failing_save_file(monkeypatch, folder, 3)  # the second snapshot's state
    before = tree(ws.root)
    with pytest.raises(SnapshotWriteError) as info:
        train(ws.host, make_images(3), config(steps=6), snapshot_dir=folder)
    one_line(info.value, "step 4", "No space left on device", str(folder / "w-step000002.safetensors"))
    assert sorted(p.name for p in folder.iterdir()) == ["w-step000002.safetensors", "w.resume.safetensors"]
    assert read_resume(folder, "w")[0]["step"] == 2
    assert {k: v for k, v in tree(ws.root).items() if k in before} == before
    no_partial_files(ws.root, before)


def test_a_nan_whose_snapshot_cannot_be_written_says_both(ws, monkeypatch):
    folder = ws.root / "snaps"
    failing_save_file(monkeypatch, folder, 3)
    with pytest.raises(SnapshotWriteError) as info:
        train(FaultyHost(ws.host, "nan", 4), make_images(3), config(steps=6), snapshot_dir=folder)
    one_line(info.value, "after the NaN loss", "lower learning rate", "w-step000002.safetensors")


def test_out_of_memory_keeps_its_exception_with_a_note(ws):
    from .test_faults_runs import OOM

    with pytest.raises(OOM) as info:
        train(FaultyHost(ws.host, "oom", 1), make_images(3), config())
    assert "memory" in " ".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("overrides,needles", [
    (dict(eval_every=0), ["eval every", "at least 1"]),
    (dict(eval_draws=0), ["eval draws"]),
    (dict(steps="10"), ["steps", "whole number"]),
    (dict(learning_rate=math.inf), ["learning rate"]),
    (dict(init_pull=-1.0), ["init pull"]),
    (dict(weight_decay=math.nan), ["weight decay"]),
    (dict(preview_every=-1), ["preview every"]),
    (dict(progressive_steps=(3, 2), num_vectors=3), ["progressive steps", "increasing"]),
    (dict(templates="captions", captions=["a {}"]), ["one caption per image", "3 images, 1 captions"]),
    (dict(memory="huge"), ["memory"]),
    (dict(timestep_range=(0.5, 0.2)), ["timestep range"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_settings_are_refused_before_anything_runs(ws, overrides, needles):
    before = tree(ws.root)
    with pytest.raises(TrainingError) as info:
        train(ws.host, make_images(3), config(**overrides), snapshot_dir=ws.root / "snaps")
    one_line(info.value, *needles)
    _unchanged(ws, before)


def test_the_prompt_room_follows_the_templates_and_captions():
    assert prompt_room(config())[0] == 68  # 'a close-up photo of a {}': 7 words
    assert prompt_room(config(per_image_tokens=True))[0] < 68  # and the image's own token
    two = config(templates="captions", captions=["{} and {} on a table"] * 3)
    room, prompt = prompt_room(two)
    assert room == (75 - 5) // 2 and prompt.count("<w>") == 2
    with pytest.raises(TrainingError) as info:
        check_settings(config(templates="captions", captions=["{} and {} on a table"] * 3, num_vectors=40), 3,
                       {"num_vectors": "vectors"})
    one_line(info.value, "vectors 40", "35 or less")


def test_image_inputs_from_a_graph_are_checked(ws):
    with pytest.raises(DataError) as info:
        check_images(torch.rand(2, 3, 32, 32))  # channels first: not a ComfyUI IMAGE
    one_line(info.value, "[B, H, W, C]")
    with pytest.raises(DataError) as info:
        check_images(torch.rand(3, 32, 32, 3), masks=torch.ones(2, 32, 32))
    one_line(info.value, "2 masks for 3 images")
    with pytest.raises(DataError):
        check_images([])


def test_the_resume_source_may_be_the_folder_or_any_file_in_it(ws):
    folder = ws.root / "snaps"
    images = make_images(3)
    train(ws.host, images, config(steps=2), snapshot_dir=folder)
    pil = check_images(images)
    for source in (folder, folder / "w-step000002.safetensors", folder / "w.resume.safetensors"):
        assert check_resume(source, config(), pil) == folder / "w.resume.safetensors"
    with pytest.raises(TrainingError) as info:
        check_resume(folder, config(), check_images(make_images(3, seed=9)))
    one_line(info.value, "images differ")


def test_a_snapshot_folder_that_is_a_file_is_refused(ws):
    (ws.root / "snaps").write_text("x")
    before = tree(ws.root)
    with pytest.raises(InputError) as info:
        check_training(config(), make_images(3), snapshot_dir=ws.root / "snaps")
    one_line(info.value, "is a file")
    _unchanged(ws, before)


# -- models ------------------------------------------------------------------------------------------------

def test_a_damaged_diffusers_folder_is_named_by_the_engine_loader(ws):
    from textinv_core.hosts.diffusers_host import DiffusersHost

    damaged = damaged_model(ws, "vae/diffusion_pytorch_model.safetensors", "truncate")
    before = tree(ws.root)
    with pytest.raises(ModelFileError) as info:
        DiffusersHost.load(damaged)
    one_line(info.value, "vae/diffusion_pytorch_model.safetensors", "truncated")
    _unchanged(ws, before)


def test_weights_that_do_not_fit_their_config_are_one_error_naming_the_part(ws):
    """A complete file with the wrong tensors passes the header check; the loader's own error is converted."""
    from safetensors.torch import save_file

    from textinv_core.hosts.diffusers_host import DiffusersHost

    damaged = damaged_model(ws, "unet/diffusion_pytorch_model.safetensors", "remove")
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(damaged / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(HostError) as info:
        DiffusersHost.load(damaged)
    one_line(info.value, "unet", "cannot be loaded", "download the model again")


def test_single_files_cut_short_are_named(ws):
    from safetensors.torch import save_file

    from textinv_core.hosts.single_file import load_single_file

    cut = ws.root / "cut.safetensors"
    save_file({"model.diffusion_model.a": torch.zeros(100), "first_stage_model.b": torch.zeros(100)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(ModelFileError) as info:
        load_single_file(cut)
    one_line(info.value, "cut.safetensors", "truncated")
    ckpt = ws.root / "cut.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.a": torch.zeros(100)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-40])
    with pytest.raises(HostError) as info:
        load_single_file(ckpt)
    one_line(info.value, "cut.ckpt", "cannot be read as a checkpoint")


def test_a_complete_header_is_read():
    from safetensors.torch import save_file

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"textinv-header-{os.getpid()}.safetensors"
    try:
        save_file({"x": torch.zeros(2, 3)}, str(path), metadata={"k": "v"})
        header = read_safetensors_header(path)
        assert header["x"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}
    finally:
        path.unlink(missing_ok=True)


def test_an_unreadable_image_is_never_skipped(ws):
    from textinv_core.inputs import load_image_files

    os.symlink(ws.root / "nowhere.png", ws.images / "b.png")
    with pytest.raises(DataError) as info:
        load_image_files([ws.images])
    one_line(info.value, "b.png")
    (ws.images / "b.png").unlink()
    Image.new("RGB", (8, 8)).save(ws.images / "plain", format="PNG")  # an image without a suffix is used
    files, images = load_image_files([ws.images])
    assert [p.name for p in files] == ["0.png", "1.png", "2.png", "plain"] and len(images) == 4


@pytest.mark.skipif(os.name != "posix", reason="errno names")
def test_a_write_refused_by_permissions_is_one_line(ws, monkeypatch):
    failing_save_file(monkeypatch, ws.root, 1, errno.EACCES)
    with pytest.raises(OutputWriteError) as info:
        save_embedding(ws.root / "new.safetensors", {"clip_l": torch.ones(1, 768)}, "new")
    one_line(info.value, "Permission denied")
    assert not (ws.root / "new.safetensors").exists()


def test_a_strip_of_an_image_trains_without_a_memory_bomb():
    """1 x 4000 px would scale to 512 x 2 million: its middle is cut first, the result is the centre square."""
    from textinv_core.data import pixels_from_images

    strip = Image.new("RGB", (1, 4000), (200, 10, 10))
    pixels = pixels_from_images([strip, Image.new("RGB", (4000, 2), (0, 0, 0))], 64)
    assert pixels.shape == (2, 3, 64, 64) and torch.allclose(pixels[0, 0], torch.full((64, 64), 200 / 127.5 - 1))
