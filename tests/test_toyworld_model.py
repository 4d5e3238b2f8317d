"""The committed toy model: intact, loadable through the engine's host, and invertible in seconds."""

from __future__ import annotations

import hashlib

import pytest

from textinv_core.config import default
from textinv_core.toyworld import scene as world
from textinv_core.toyworld.model import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model_index.json").is_file(),
                                reason="the toy model (textinv_core/toyworld/weights) is not in this checkout")


@pytest.fixture(scope="module")
def host():
    from textinv_core.toyworld.model import load_host

    return load_host()


def test_committed_weights_match_their_checksums():
    lines = (DEFAULT_MODEL_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert any(name.endswith(".safetensors") for _, name in entries)
    for digest, name in entries:
        assert hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_model_uses_the_real_clip_vocabulary_in_pixel_space(host):
    assert host.vae is None and host.encoders == {"clip_l": 128}
    assert host.text_encoders[0].tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert host.text_encoders[0].model.get_input_embeddings().weight.shape[0] == 49408


def test_sampling_is_deterministic(host):
    import numpy as np

    from textinv_core.toyworld.sampling import sample

    a = sample(host, "a photo of a big red plain square", count=2, seed=5, steps=8)
    b = sample(host, "a photo of a big red plain square", count=2, seed=5, steps=8)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_short_inversion_improves_reconstruction_over_the_init_word(host):
    from textinv_core.toyworld.bench import QualityConfig, invert
    from textinv_core.toyworld.metrics import reconstruction
    from textinv_core.toyworld.sampling import sample

    concept = world.parse_concept("shape=triangle,colour=green,pattern=striped")  # held out of training
    images = [world.render(s) for s in world.concept_images(concept, count=5, seed=0)]
    cfg = QualityConfig(concept=concept, settings=dict(init_word="triangle", steps=60, batch_size=8,
                                                       learning_rate=2e-2, scale_lr=False, early_stop_patience=0,
                                                       eval_every=25, eval_draws=64))
    placeholder, result = invert(host, images, 0, 1, cfg)
    assert result.best_eval_loss < result.init_eval_loss
    learned = sample(host, f"a photo of a {placeholder}", {placeholder: result.vectors}, count=16, seed=1, steps=15)
    init = sample(host, "a photo of a triangle", count=16, seed=1, steps=15)
    assert reconstruction(learned, concept)["graded"] > reconstruction(init, concept)["graded"] + 0.15


def test_demo_writes_a_word_that_scores_better_than_its_init_word(host, tmp_path):
    from textinv_core.embedding_file import load_embedding
    from textinv_core.toyworld.demo import run_demo

    report = run_demo(tmp_path, samples=16)  # the defaults, as `textinv demo` runs them (minutes on 2 CPU cores)
    assert report["scores"]["after"] > report["scores"]["before"]
    assert load_embedding(report["embedding"]).vectors[""].shape == (default("num_vectors"), 128)
    assert (tmp_path / "before_after.png").is_file() and (tmp_path / "loss.png").is_file()
