"""The toy world's scene generator and scorer: deterministic, one token per word, and readable back."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from textinv_core.toyworld import scene as world
from textinv_core.toyworld.scorer import attribute_accuracy, score_image


def _digest(images) -> str:
    return hashlib.sha256(b"".join(np.asarray(im).tobytes() for im in images)).hexdigest()


def test_generator_is_deterministic_from_its_seed():
    scenes_a, captions_a = world.training_batch(seed=3, count=64)
    scenes_b, captions_b = world.training_batch(seed=3, count=64)
    assert scenes_a == scenes_b and captions_a == captions_b
    assert _digest(map(world.render, scenes_a)) == _digest(map(world.render, scenes_b))
    assert world.training_batch(seed=4, count=64)[0] != scenes_a


def test_every_attribute_word_is_one_clip_token():
    from textinv_core.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    for options in (*world.ATTRIBUTES.values(), [world.BLEND_WORD]):
        for word in options:
            assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_blended_captions_put_only_the_concept_words_in_one_position():
    rng = np.random.default_rng(0)
    _, captions = world.training_batch(seed=0, count=400)
    blended = [(caption, world.blend_concept_words(caption, rng)) for caption in captions]
    changed = [(c, b, words) for c, (b, words) in blended if words]
    assert 0.15 < len(changed) / len(captions) < 0.35  # BLEND_SHARE of the captions with 2+ concept words
    concept_words = {*world.SHAPES, *world.COLOURS, *world.PATTERNS, "object"}
    for caption, text, words in changed:
        assert len(words) >= 2 and set(words) <= concept_words
        assert text.split().count(world.BLEND_WORD) == 1
        assert text.replace(world.BLEND_WORD, " ".join(words)) == caption  # sizes and backgrounds stay words
    assert all(b == c for c, (b, words) in blended if not words)


def test_held_out_concepts_never_appear_in_training_images_or_captions():
    scenes, captions = world.training_batch(seed=0, count=3000)
    seen = {(s.shape, s.colour, s.pattern) for s in scenes}
    assert not seen & set(world.HELD_OUT)
    assert len(seen) == len(world.SHAPES) * len(world.COLOURS) * len(world.PATTERNS) - len(world.HELD_OUT)
    for shape, colour, pattern in world.HELD_OUT:  # every pair inside a held-out triple is still seen
        assert any(s.shape == shape and s.colour == colour for s in scenes)
        assert any(s.shape == shape and s.pattern == pattern for s in scenes)
        assert any(s.colour == colour and s.pattern == pattern for s in scenes)
    assert "" in captions and any("object" in c for c in captions)


def test_concept_images_share_only_the_concept():
    concept = world.parse_concept("shape=circle,colour=red,pattern=striped")
    scenes = world.concept_images(concept, count=5, seed=0)
    assert all((s.shape, s.colour, s.pattern) == ("circle", "red", "striped") for s in scenes)
    assert len({s.background for s in scenes}) == len(world.BACKGROUNDS)


@pytest.mark.parametrize("text", ["shape=circle,colour=red", "shape=hexagon,colour=red,pattern=plain",
                                  "shape=circle,colour=red,pattern=plain,mood=happy"])
def test_bad_concepts_are_refused_with_a_sentence(text):
    with pytest.raises(ValueError, match="concept|Unknown"):
        world.parse_concept(text)


def test_scorer_is_at_least_95_percent_accurate_on_generator_images():
    rng = np.random.default_rng(123)
    scenes = [world.random_scene(rng, allow_held_out=True) for _ in range(400)]
    accuracy = attribute_accuracy([world.render(s) for s in scenes], [s.attributes() for s in scenes])
    assert min(accuracy.values()) >= 0.95, accuracy


def test_scorer_is_deterministic_and_reads_soft_edges():
    from PIL import ImageFilter

    scene = world.Scene("triangle", "blue", "striped", "pink", "big")
    image = world.render(scene)
    assert score_image(image) == score_image(image) == scene.attributes()
    blurred = image.resize((64, 64)).filter(ImageFilter.GaussianBlur(1.5)).resize((16, 16))
    assert score_image(blurred)["shape"] == "triangle"
