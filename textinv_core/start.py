"""Where the word starts: the embedding of a word the user gives, or one the engine finds itself.

The paper starts v* at a coarse descriptor ("cat", "sculpture") the user names, and averages a
multi-token descriptor into one vector. Left empty, the engine finds such a start on its own, for any
model and vocabulary, by a greedy search over words and blends of words that the gradient proposes
and the loss decides (AutoPrompt, Shin et al. 2020; GCG, Zou et al. 2023):
- at the current start (first: the centroid of the vocabulary), one gradient of the objective scores
  every token by g . (e - v), how far moving there would lower the loss to first order; in the first
  round the best few tokens are proposed, in later ones the blends of the current words with one
  more: the words the gradient ranks first, and the single words whose own loss was lowest (a
  first-order score of a blend misses partners that a measured loss finds);
- the candidates' loss on fixed draws decides, in two stages: every candidate on a few draws, the
  round's best few on many (paired draws, so the comparison is of the words, not of the noise; on 24
  draws "red" beat "red circle" for a red circle, on 48 and 96 it did not, and training from "red"
  never found the shape); the search moves while that loss falls.
Both measure at the noisier half of the run's range of t (of the defaults' (0.25, 1): t from 0.625 to 1):
there the prompt decides what appears, and the loss difference between candidate words sits almost all
there (yellow plain cross, "caption" against "shape word": per-draw signal-to-noise 1.5 in the top
quarter of t, 0.6 over all t), so a quarter of the draws tell candidates apart as well; on the toy world
this halved the search's cost (~95 passes instead of ~165), and a two-vector word reached 90% of the
caption in fewer passes than after the search over all t (medians of 3 seeds, on each of the three
concepts tried). Halving the draws again (SCREEN_DRAWS, COARSE_DRAWS) cut it to 30-52 passes and brought
the word to the mark sooner on the triangles, for a noisier choice: one yellow striped circle seed started
with neither its shape nor its colour and never reached the mark (docs/toyworld/README.md, "Half the draws").
The same proposals serve training later: before the first step and at a plateau the trainer tries the word
with one vector swapped for a vocabulary row (`swap_candidates`), judged by a short training from it.
A blend is the paper's multi-token average, rescaled to its words' mean norm, so it stays word-sized.
The cost is a few gradients and forward passes, a small fraction of training; `StartResult.passes`
counts them as image-passes: a gradient's draw as one pass (forward and backward), a forward-only draw
as a third of one (the backward costs about two forwards).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainingError
from .evaluation import evaluate
from .host import Host, WordVectors
from .objective import Draws, diffusion_loss

GRADIENT_DRAWS = 4   # draws of the gradient that proposes candidates
SCREEN_DRAWS = 12    # draws on which the finalists of a round are compared (the first COARSE_DRAWS of them
COARSE_DRAWS = 4     # score every candidate); half of 24 and 8: the search costs 30-52 passes, not 56-90,
#                      and the start's swap screen about 9, not 15 (docs/toyworld/README.md, "Half the draws")
NOISIER_SHARE = 0.5  # the search draws t from the noisier half of the run's range (module docstring)
FINALISTS = 2        # candidates of a round scored on all SCREEN_DRAWS
PROPOSED = 4         # words proposed in the first round; blends proposed per round by gradient and by loss (each)
ROUNDS = 3           # at most: the search stops as soon as no candidate lowers the loss
MAX_BLEND = 3        # words in a blend


@dataclass
class StartResult:
    word: str             # the chosen word(s), as the tokenizer spells them ("red striped" for a blend)
    vectors: WordVectors  # one start vector per encoder, [1, width]
    passes: int           # image-passes spent choosing it


def spread_init(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """k vectors from an init word of n tokens: equal -> as is; more -> averaged groups; fewer -> cycled."""
    n = tokens.shape[0]
    if n == k:
        return tokens.clone()
    if n > k:
        groups = np.array_split(np.arange(n), k)
        return torch.stack([tokens[list(g)].mean(0) for g in groups])
    return torch.stack([tokens[i % n] for i in range(k)])


def word_start(host: Host, init_word: str, k: int) -> WordVectors:
    """The paper's start: the embedding of a coarse descriptor word, spread over k vectors."""
    tokens = host.word_vectors(init_word)
    if any(t.shape[0] == 0 for t in tokens.values()):
        raise TrainingError(f"The init word {init_word!r} tokenizes to nothing: give a real word such as 'cat', "
                            "or leave it empty to let textinv find a start.")
    return {key: spread_init(t, k) for key, t in tokens.items()}


def candidate_ids(strings: list[str], prompt_text: str = "") -> torch.Tensor:
    """Tokens that are words (their text has a letter; special and punctuation tokens have none) and
    not words of the prompts the word is trained in: "a photo of a [a photo]" lowers the loss by
    echoing the template, and names nothing."""
    prompt_words = set(re.findall(r"[a-z0-9]+", prompt_text.lower()))

    def word(text: str) -> str:
        return text.removesuffix("</w>").lower()

    return torch.tensor([i for i, text in enumerate(strings)
                         if any(c.isalpha() for c in text) and word(text) not in prompt_words], dtype=torch.long)


class _Search:
    """The vocabulary, the draws, and the two measurements the search makes: a gradient and a loss."""

    def __init__(self, host, latents, gradient_draws, screen_draws, placeholder, weights, chunk):
        self.host, self.latents, self.placeholder, self.weights, self.chunk = host, latents, placeholder, weights, chunk
        self.gradient_draws = gradient_draws
        self.strings = host.token_strings()
        prompts = " ".join(p.replace(placeholder, " ") for p in [*gradient_draws.prompts, *screen_draws.prompts])
        self.ids = candidate_ids(self.strings, prompts)
        self.tables = {key: host.token_table(key).detach().float().cpu() for key in host.encoders}
        self.words = {key: table[self.ids] for key, table in self.tables.items()}
        self.passes = 0    # draws through forward and backward
        self.forwards = 0  # draws through a forward only

    def vector(self, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """One word's row, or a blend: the rows' sum rescaled to their mean norm, [1, width] per encoder."""
        out = {}
        for key, table in self.tables.items():
            rows = table[list(tokens)]
            total = rows.sum(0, keepdim=True)
            out[key] = total / total.norm().clamp_min(1e-12) * rows.norm(dim=1).mean()
        return out

    def loss(self, vectors: dict[str, torch.Tensor], draws: Draws) -> float:
        self.forwards += len(draws)
        words = {self.placeholder: {k: v.to(self.host.device) for k, v in vectors.items()}}
        return evaluate(self.host, self.latents, draws, words, self.weights, max(self.chunk, 4))

    def gradient(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probe = {k: v.to(self.host.device).clone().requires_grad_(True) for k, v in vectors.items()}
        draws = self.gradient_draws
        with torch.enable_grad():
            for start in range(0, len(draws), self.chunk):
                part = draws[start:start + self.chunk]
                loss = diffusion_loss(self.host, self.latents, part, {self.placeholder: probe}, self.weights)
                (loss * len(part) / len(draws)).backward()
        self.passes += len(draws)
        return {k: p.grad.float().cpu() for k, p in probe.items()}  # [rows, width]: one gradient per slot

    def image_passes(self) -> int:
        return self.passes + math.ceil(self.forwards / 3)  # a forward is about a third of a forward and backward

    def proposals(self, current: tuple[int, ...], vectors: dict[str, torch.Tensor],
                  singles_by_loss: list[int]) -> list[tuple[int, ...]]:
        """With no current word, the words that the gradient at `vectors` says would lower the loss most
        (first order); then the blends of `current` with one more word: those the gradient ranks first,
        and those with the words of `singles_by_loss` (lowest measured loss first)."""
        grad = {k: g[0] for k, g in self.gradient(vectors).items()}
        gain = sum(self.words[k] @ grad[k] for k in grad) - sum(float(vectors[k][0] @ grad[k]) for k in grad)
        order = [int(self.ids[i]) for i in gain.argsort()]
        if not current:
            return [(t,) for t in order[:PROPOSED]]
        blends, seen = [], set(current)
        for t in order[:PROPOSED * 8]:  # blends are scored exactly to first order, then the best kept
            if t not in seen:
                blend = tuple(sorted((*current, t)))
                b = self.vector(blend)
                blends.append((sum(float((b[k][0] - vectors[k][0]) @ grad[k]) for k in grad), blend))
        by_gradient = [blend for _, blend in sorted(blends)[:PROPOSED]]
        by_loss = [tuple(sorted((*current, t))) for t in singles_by_loss if t not in seen][:PROPOSED]
        return list(dict.fromkeys(by_gradient + by_loss))


def find_start(host: Host, latents: torch.Tensor, gradient_draws: Draws, screen_draws: Draws, placeholder: str,
               weights: torch.Tensor | None = None, chunk: int = 4) -> StartResult:
    """The start the search finds for these images (module docstring). Passes run `chunk` images at a
    time, so the search needs no more memory than a training step."""
    search = _Search(host, latents, gradient_draws, screen_draws, placeholder, weights, chunk)
    coarse_draws = screen_draws[:COARSE_DRAWS]
    current: tuple[int, ...] = ()
    vectors = {key: words.mean(0, keepdim=True) for key, words in search.words.items()}
    best = math.inf                    # the centroid is no word to start from: the first round always moves
    coarse: dict[tuple[int, ...], float] = {}
    fine: dict[tuple[int, ...], float] = {}
    for _ in range(ROUNDS):
        singles = [c[0] for c in sorted(coarse, key=coarse.get) if len(c) == 1]
        proposed = [c for c in search.proposals(current, vectors, singles) if c not in coarse]
        for c in proposed:
            coarse[c] = search.loss(search.vector(c), coarse_draws)
        for c in sorted(proposed, key=coarse.get)[:FINALISTS]:
            rest = search.loss(search.vector(c), screen_draws[COARSE_DRAWS:])
            fine[c] = (coarse[c] * COARSE_DRAWS + rest * (len(screen_draws) - COARSE_DRAWS)) / len(screen_draws)
        loss, candidate = min(((v, c) for c, v in fine.items()), default=(math.inf, current))
        if loss >= best:
            break
        best, current, vectors = loss, candidate, search.vector(candidate)
        if len(current) >= MAX_BLEND:
            break
    word = " ".join(search.strings[t] for t in current)
    return StartResult(word, vectors, search.image_passes())


@dataclass
class SwapCandidates:
    swaps: list[tuple[str, WordVectors]]  # (which slot took which word, the word), lowest screening loss first
    passes: int                           # image-passes spent proposing and screening them


def swap_candidates(host: Host, latents: torch.Tensor, vectors: WordVectors, gradient_draws: Draws,
                    screen_draws: Draws, placeholder: str, weights: torch.Tensor | None = None,
                    chunk: int = 4) -> SwapCandidates:
    """The best few words that differ from a trained word in one slot, a vocabulary row there: GCG's token
    swap (Zou et al. 2023) at the trained vectors. The gradient proposes, for each slot, the rows that would
    lower the loss most to first order; the loss on the first of the search's draws keeps the FINALISTS.

    Why: gradient steps from a start without the concept's shape can settle where the word has the colour
    and the pattern but no shape (toy world, blue plain square from 'plain': 0.73x and 0.77x of the caption
    on two of three seeds). There the gradient ranks 'square' among the first for both slots. The swapped
    word's own loss is no better than the trained word's, but 25 steps from it beat the caption's
    (docs/toyworld/README.md), so the caller judges a swap by a short training from it."""
    search = _Search(host, latents, gradient_draws, screen_draws, placeholder, weights, chunk)
    current = {k: v.detach().float().cpu() for k, v in vectors.items()}
    grad = search.gradient(current)
    proposed: list[tuple[str, dict[str, torch.Tensor]]] = []
    for slot in range(next(iter(current.values())).shape[0]):
        if any(all(torch.equal(v[slot], v[other]) for v in current.values()) for other in range(slot)):
            continue  # a copy of an earlier slot (a found start): the same swaps, proposed already
        gain = sum(search.words[k] @ grad[k][slot] for k in grad)  # g . (e - v) up to a constant per slot
        for index in gain.argsort()[:PROPOSED].tolist():
            token = int(search.ids[index])
            swapped = {k: v.clone() for k, v in current.items()}
            for k, table in search.tables.items():
                swapped[k][slot] = table[token]
            proposed.append((f"vector {slot + 1} -> {search.strings[token]!r}", swapped))
    coarse = [search.loss(swapped, screen_draws[:COARSE_DRAWS]) for _, swapped in proposed]
    order = sorted(range(len(proposed)), key=coarse.__getitem__)[:FINALISTS]
    return SwapCandidates([proposed[i] for i in order], search.image_passes())
