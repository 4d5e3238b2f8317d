"""`textinv` end to end, and its promise: a bad input is one error line and nothing written."""

from __future__ import annotations

import pytest
import torch

from textinv_core.cli import main
from textinv_core.config import default
from textinv_core.embedding_file import load_embedding

from .conftest import make_images


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(3)):
        image.save(folder / f"{i}.png")
    return folder


def run(model, images, out, *extra):
    return main(["train", "--model", str(model), "--images", str(images), "--name", "my-cat",
                 "--init-word", "cat", "--steps", "6", "--resolution", "32", "--batch", "2", "--lr", "0.05",
                 "--eval-every", "3", "--snapshot-every", "3", "--output", str(out), *extra])


def test_train_writes_a_loadable_embedding_and_info_describes_it(tiny_sd1_folder, image_dir, tmp_path, capsys):
    out = tmp_path / "out" / "my-cat.safetensors"
    assert run(tiny_sd1_folder, image_dir, out) == 0
    assert "eval loss" in capsys.readouterr().out
    emb = load_embedding(out)
    assert emb.vectors[""].shape == (default("num_vectors"), 768) and emb.metadata["textinv.family"] == "sd1"
    assert main(["info", str(out), "--model", str(tiny_sd1_folder)]) == 0
    text = capsys.readouterr().out
    assert "emb_params" not in text and f"vectors: {default('num_vectors')}" in text and "nearest tokens" in text


def test_train_resumes_from_its_snapshots(tiny_sd1_folder, image_dir, tmp_path):
    whole = tmp_path / "whole.safetensors"
    assert run(tiny_sd1_folder, image_dir, whole) == 0
    part = tmp_path / "part.safetensors"
    assert main(["train", "--model", str(tiny_sd1_folder), "--images", str(image_dir), "--name", "my-cat",
                 "--init-word", "cat", "--steps", "3", "--resolution", "32", "--batch", "2", "--lr", "0.05",
                 "--eval-every", "3", "--snapshot-every", "3", "--output", str(part)]) == 0
    resumed = tmp_path / "resumed.safetensors"
    assert run(tiny_sd1_folder, image_dir, resumed, "--resume", str(tmp_path / "part.snapshots")) == 0
    assert torch.equal(load_embedding(whole).vectors[""], load_embedding(resumed).vectors[""])


@pytest.mark.parametrize("case", ["no-images", "zero-byte", "bad-name", "zero-steps", "zero-eval-every"])
def test_bad_inputs_give_one_error_and_write_nothing(tiny_sd1_folder, image_dir, tmp_path, capsys, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = {"images": image_dir, "name": "my-cat", "steps": "6", "init": "cat", "eval": "3"}
    if case == "no-images":
        args["images"] = tmp_path / "empty"
        args["images"].mkdir()
    elif case == "zero-byte":
        (image_dir / "zero.png").write_bytes(b"")
    elif case == "bad-name":
        args["name"] = "../escape"
    elif case == "zero-steps":
        args["steps"] = "0"
    else:
        args["eval"] = "0"
    code = main(["train", "--model", str(tiny_sd1_folder), "--images", str(args["images"]), "--name", args["name"],
                 "--init-word", args["init"], "--steps", args["steps"], "--resolution", "32",
                 "--eval-every", args["eval"], "--output", str(out_dir / "w.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("textinv: error:") == 1 and "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    assert not (tmp_path / "escape.safetensors").exists()


def test_existing_output_is_kept(tiny_sd1_folder, image_dir, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"precious")
    assert run(tiny_sd1_folder, image_dir, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_demo_runs_end_to_end(tmp_path):
    from textinv_core.demo import run_demo

    run_demo(tmp_path / "demo", steps=10)
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"demo-ring.safetensors", "loss.png", "before_after.png"} <= names


@pytest.mark.parametrize("family,encoders", [("sd2", {"": 1024}), ("sdxl", {"clip_l": 768, "clip_g": 1280})])
def test_train_from_sd2_and_sdxl_folders(tmp_path, image_dir, family, encoders, capsys):
    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.tiny_models import save_tiny_pipeline

    folder = tmp_path / f"tiny-{family}"
    save_tiny_pipeline(family, folder)
    host = DiffusersHost.load(folder)
    assert host.family == family
    assert host.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    out = tmp_path / "w.safetensors"
    assert main(["train", "--model", str(folder), "--images", str(image_dir), "--name", "w", "--steps", "2",
                 "--resolution", "32", "--format", "a1111", "--output", str(out)]) == (0 if family == "sdxl" else 2)
    if family == "sdxl":  # A1111 keeps SDXL words in safetensors
        assert {k: v.shape[1] for k, v in load_embedding(out).vectors.items()} == encoders
    else:  # a single-encoder A1111 word is a .pt: the .safetensors name is refused before training
        captured = capsys.readouterr()
        assert "stored as .pt" in captured.err and "eval loss" not in captured.out and not out.exists()


def test_train_from_a_single_file_checkpoint(tmp_path, image_dir, tiny_host):
    """The checkpoints users have: original-layout .safetensors, loaded offline and trained on."""
    from textinv_core.tiny_models import build_tiny_components

    from .ldm_export import export_single_file

    checkpoint = export_single_file(build_tiny_components("sd1"), "sd1", tmp_path / "tiny-sd15.safetensors")
    out = tmp_path / "w.safetensors"
    assert run(checkpoint, image_dir, out) == 0
    assert load_embedding(out).vectors[""].shape == (default("num_vectors"), 768)
    assert main(["info", str(out), "--model", str(checkpoint)]) == 0
