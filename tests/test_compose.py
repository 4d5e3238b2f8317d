"""Composing words needs no ComfyUI: blends and concatenations are the engine's arithmetic."""

from __future__ import annotations

import pytest
import torch

from textinv_core.compose import compose_vectors, parse_weights
from textinv_core.errors import UserError


def word(seed: int, k: int = 1, keys=("clip_l", "clip_g")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(k, 4, generator=g) for key in keys}


def test_blend_is_the_weighted_sum_per_encoder():
    a, b = word(1), word(2)
    equal = compose_vectors([("a", a), ("b", b)], "blend")
    weighted = compose_vectors([("a", a), ("b", b)], "blend", "0.7, 0.3")
    for key in a:
        torch.testing.assert_close(equal[key], 0.5 * a[key] + 0.5 * b[key])
        torch.testing.assert_close(weighted[key], 0.7 * a[key] + 0.3 * b[key])


def test_concatenate_stacks_every_vector_in_order():
    a, b = word(1, k=2), word(2, k=3)
    out = compose_vectors([("a", a), ("b", b)], "concatenate")
    for key in a:
        assert torch.equal(out[key], torch.cat([a[key], b[key]]))


def test_weights_parse_commas_and_semicolons_and_default_to_equal():
    assert parse_weights("", 4) == [0.25] * 4
    assert parse_weights("1; 2,3", 3) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("words", "mode", "weights", "message"), [
    ([("a", word(1)), ("b", word(2, keys=("clip_l",)))], "blend", "", "different model families"),
    ([("a", word(1, k=1)), ("b", word(2, k=2))], "blend", "", "same number of vectors"),
    ([("a", word(1)), ("b", word(2))], "blend", "0.5", "one weight per word"),
    ([("a", word(1)), ("b", word(2))], "blend", "half, half", "not numbers"),
    ([("a", word(1)), ("b", word(2))], "blend", "nan, 1", "finite"),
    ([("a", word(1))], "average", "", "Unknown mode"),
    ([], "blend", "", "at least one word"),
])
def test_words_that_cannot_be_composed_are_refused_with_the_reason(words, mode, weights, message):
    with pytest.raises(UserError, match=message):
        compose_vectors(words, mode, weights)
