"""Every written layout reads back the same; foreign and hostile files fail clearly."""

from __future__ import annotations

import pickle

import pytest
import torch

from textinv_core.embedding_file import (
    EmbeddingFile,
    EmbeddingFileError,
    load_embedding,
    save_embedding,
    validate_name,
    vectors_for_encoders,
)

SD1 = {"clip_l": torch.randn(2, 768)}
SDXL = {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}


@pytest.mark.parametrize("fmt,suffix", [("textinv", ".safetensors"), ("a1111", ".pt"), ("diffusers", ".safetensors")])
def test_single_encoder_formats_round_trip(tmp_path, fmt, suffix):
    path = save_embedding(tmp_path / f"word{suffix}", SD1, "my-cat", fmt=fmt)
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors[""], SD1["clip_l"])
    assert vectors_for_encoders(loaded, {"clip_l": 768})["clip_l"].shape == (2, 768)


@pytest.mark.parametrize("fmt", ["textinv", "a1111"])
def test_sdxl_round_trips_as_clip_l_and_clip_g(tmp_path, fmt):
    from safetensors.torch import load_file

    path = save_embedding(tmp_path / "xl.safetensors", SDXL, "xl-word", fmt=fmt)
    assert set(load_file(path)) == {"clip_l", "clip_g"}
    loaded = load_embedding(path)
    for key in SDXL:
        assert torch.equal(loaded.vectors[key], SDXL[key])


def test_sd1_file_has_emb_params_and_metadata(tmp_path):
    from safetensors import safe_open

    path = save_embedding(tmp_path / "w.safetensors", SD1, "w", metadata={"textinv.family": "sd1"})
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        meta = handle.metadata()
    assert meta["textinv.family"] == "sd1" and meta["textinv.name"] == "w" and len(meta["textinv.hash"]) == 16


def test_a1111_pt_has_string_to_param(tmp_path):
    path = save_embedding(tmp_path / "w.pt", SD1, "w", fmt="a1111", metadata={"textinv.steps": "42"})
    data = torch.load(path, weights_only=True)
    assert torch.equal(data["string_to_param"]["*"], SD1["clip_l"])
    assert data["name"] == "w" and data["step"] == 42


def test_onetrainer_emp_params_is_read(tmp_path):
    from safetensors.torch import save_file

    save_file({"emp_params": SD1["clip_l"]}, str(tmp_path / "ot.safetensors"))
    assert torch.equal(load_embedding(tmp_path / "ot.safetensors").vectors[""], SD1["clip_l"])


def test_pickled_object_in_pt_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"string_to_param": {"*": Payload()}}, handle)
    with pytest.raises(EmbeddingFileError, match="refused without running"):
        load_embedding(path)
    assert not marker.exists()


def test_wrong_width_names_both_widths():
    sd1 = EmbeddingFile(vectors={"": torch.zeros(1, 768)}, name="cat", format="textinv")
    with pytest.raises(EmbeddingFileError, match="768.*1024"):
        vectors_for_encoders(sd1, {"clip_h": 1024})
    with pytest.raises(EmbeddingFileError, match="768.*clip_l.*clip_g"):
        vectors_for_encoders(sd1, {"clip_l": 768, "clip_g": 1280})
    xl = EmbeddingFile(vectors=dict(SDXL), name="xl", format="textinv")
    with pytest.raises(EmbeddingFileError, match="clip_h"):
        vectors_for_encoders(xl, {"clip_h": 1024})


def test_existing_file_is_never_overwritten_unless_asked(tmp_path):
    path = save_embedding(tmp_path / "w.safetensors", SD1, "w")
    original = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_embedding(path, {"clip_l": torch.ones(2, 768)}, "w")
    assert path.read_bytes() == original
    save_embedding(path, {"clip_l": torch.ones(2, 768)}, "w", overwrite=True)
    assert torch.equal(load_embedding(path).vectors[""], torch.ones(2, 768))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temporary files left


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(EmbeddingFileError):
        save_embedding(tmp_path / "x.safetensors", SDXL, "x", fmt="diffusers")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "x\\y", "con", "LPT1.txt", "what?", "a:b", "", "  ", "-dash"])
def test_bad_names_are_refused(name):
    with pytest.raises(EmbeddingFileError):
        validate_name(name)


def test_empty_and_garbage_files_are_refused(tmp_path):
    (tmp_path / "zero.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(EmbeddingFileError, match="empty"):
        load_embedding(tmp_path / "zero.safetensors")
    with pytest.raises(EmbeddingFileError, match="not a readable"):
        load_embedding(tmp_path / "junk.safetensors")


def _pipeline(family_components):
    from diffusers import StableDiffusionPipeline

    parts = dict(family_components)
    parts.pop("family")
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_diffusers_form_loads_through_diffusers_and_matches_our_conditioning(tmp_path, tiny_host):
    from textinv_core.tiny_models import build_tiny_components

    host = tiny_host("sd1")
    vectors = {"clip_l": torch.randn(1, 768) * 0.5}
    path = save_embedding(tmp_path / "learned_embeds.safetensors", vectors, "toy-word", fmt="diffusers")
    pipe = _pipeline(build_tiny_components("sd1"))  # its own copy: diffusers resizes the token table
    plain = pipe.encode_prompt("a photo of <toy-word>", "cpu", 1, False)[0]
    pipe.load_textual_inversion(str(path))
    learned = pipe.encode_prompt("a photo of <toy-word>", "cpu", 1, False)[0]
    assert not torch.allclose(plain, learned)
    ours = host.encode_text(["a photo of <toy-word>"], {"<toy-word>": vectors}).hidden
    torch.testing.assert_close(ours, learned, rtol=1e-4, atol=1e-5)


def test_sd1_emb_params_file_loads_through_diffusers_with_a_token(tmp_path, tiny_host):
    from safetensors.torch import load_file

    from textinv_core.tiny_models import build_tiny_components

    vectors = {"clip_l": torch.randn(2, 768) * 0.5}
    path = save_embedding(tmp_path / "w.safetensors", vectors, "w")
    pipe = _pipeline(build_tiny_components("sd1"))
    pipe.load_textual_inversion(load_file(str(path)), token="<w>")
    learned = pipe.encode_prompt("a photo of <w>", "cpu", 1, False)[0]
    ours = tiny_host("sd1").encode_text(["a photo of <w>"], {"<w>": vectors}).hidden
    torch.testing.assert_close(ours, learned, rtol=1e-4, atol=1e-5)


def test_container_follows_layout_not_wishes(tmp_path):
    from textinv_core.embedding_file import check_format, default_suffix

    assert default_suffix("a1111", 1) == ".pt" and default_suffix("a1111", 2) == ".safetensors"
    with pytest.raises(EmbeddingFileError, match="clip_l/clip_g"):
        check_format("diffusers", 2)
    with pytest.raises(EmbeddingFileError, match="stored as .safetensors"):
        save_embedding(tmp_path / "xl.pt", SDXL, "xl", fmt="a1111")
    with pytest.raises(EmbeddingFileError, match="stored as .pt"):
        save_embedding(tmp_path / "w.safetensors", SD1, "w", fmt="a1111")
    with pytest.raises(EmbeddingFileError, match="stored as .pt"):
        check_format("a1111", 1, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
