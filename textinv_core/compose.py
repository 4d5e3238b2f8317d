"""New words from learned ones, with no training: a weighted blend, or a concatenation.

A blend is the weighted sum of words with the same vector count (equal weights by default), a
concatenation stacks all their vectors into one multi-vector word. Words must be of one model
family (the same encoder keys). Used by the Compose Concepts node and any other front end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import UserError

MODES = ("blend", "concatenate")


def parse_weights(text: str, count: int) -> list[float]:
    """'0.7, 0.3' -> [0.7, 0.3]; empty -> equal weights summing to 1."""
    if not text.strip():
        return [1.0 / count] * count
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise UserError(f"Weights {text!r} are not numbers: write them like '0.7, 0.3'.") from None
    if len(values) != count:
        raise UserError(f"{len(values)} weights for {count} connected words: give one weight per word.")
    if not all(torch.isfinite(torch.tensor(values))):
        raise UserError(f"Weights {text!r} must be finite numbers.")
    return values


def compose_vectors(words: Sequence[tuple[str, dict[str, torch.Tensor]]], mode: str,
                    weights: str = "") -> dict[str, torch.Tensor]:
    """The vectors of the composed word per encoder key, from (name, vectors) pairs, fp32."""
    if mode not in MODES:
        raise UserError(f"Unknown mode {mode!r}: choose one of {', '.join(MODES)}.")
    if not words:
        raise UserError("Connect at least one word to compose.")
    first_name, first = words[0]
    keys = set(first)
    for name, vectors in words[1:]:
        if set(vectors) != keys:
            raise UserError(f"Words <{first_name}> and <{name}> are for different model families "
                            f"({', '.join(sorted(first))} vs {', '.join(sorted(vectors))}).")
    if mode == "concatenate":
        return {k: torch.cat([v[k].float() for _, v in words]) for k in sorted(keys)}
    counts = [next(iter(v.values())).shape[0] for _, v in words]
    if len(set(counts)) != 1:
        raise UserError("Blending needs words with the same number of vectors "
                        f"(got {', '.join(map(str, counts))}); use concatenate instead.")
    factors = parse_weights(weights, len(words))
    return {k: sum(f * v[k].float() for f, (_, v) in zip(factors, words)) for k in sorted(keys)}
