"""Where the word starts: the embedding of a word the user gives, or one the engine finds itself.

The paper starts v* at a coarse descriptor ("cat", "sculpture") the user names, and averages a
multi-token descriptor into one vector. Left empty, the engine finds such a start on its own, for any
model and vocabulary, by a greedy search over words and blends of words that the gradient proposes
and the loss decides (AutoPrompt, Shin et al. 2020; GCG, Zou et al. 2023, which search each position
of a prompt). A word of k vectors has k slots, each a word or a blend, read by the text encoder as k
tokens of a phrase ("circle" | "red striped"):
- at the current start (first: the vocabulary's centroid in every slot), one gradient of the objective
  scores every token by g . e, how far putting it in a slot would lower the loss to first order; while
  a slot is empty the next one is filled, with the best few tokens and (after the first round) the
  single words whose own measured loss was lowest; with every slot filled, one slot's words are
  blended with one more: the blends the gradient ranks first and those with the lowest-loss single
  words (a first-order score of a blend misses partners that a measured loss finds). Slots not yet
  filled repeat the filled ones, as an init word of fewer tokens than vectors does. The gradient at
  the centroid is a poor guide to a concept's main word ('circle' ranked 48,834th of ~48,839 for a
  yellow striped circle); next to a word in another slot it often ranks the words that complete it
  near the top (red striped circle: 'circle' 5th next to 'red'; 'red' and 'striped' 1st and 2nd next
  to 'circle'), though not always ('circle' near the bottom next to 'yellow' for the yellow one). Over
  the six held-out concepts and two others, 4 seeds each (benchmarks/start_search.py), the start was
  better in 20 of 32 than the one blended vector copied to every slot that the search found before,
  and at 0.9 of the caption's reconstruction before any training in 5 of 32 (before: 1);
- the candidates' loss on fixed draws decides, in two stages: every candidate on a few draws, the
  round's best few on many (paired draws, so the comparison is of the words, not of the noise; on 24
  draws "red" beat "red circle" for a red circle, on 48 and 96 it did not, and training from "red"
  never found the shape); the search moves while that loss falls.
Both measure at the noisier half of the schedule: there the prompt decides what appears, and the loss
difference between candidate words sits almost all there (yellow plain cross, "caption" against "shape
word": per-draw signal-to-noise 1.5 in the top quarter of t, 0.6 over all t), so a quarter of the draws
tell candidates apart as well; on the toy world this halved the search's cost (~95 passes instead of
~165), and a two-vector word reached 90% of the caption in fewer passes than after the search over all
t (medians of 3 seeds, on each of the three concepts tried).
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
SCREEN_DRAWS = 24    # draws on which the finalists of a round are compared (the first COARSE_DRAWS of them
COARSE_DRAWS = 8     # score every candidate)
NOISIER_SHARE = 0.5  # the search draws t from the noisier half of the run's range (module docstring)
FINALISTS = 2        # candidates of a round scored on all SCREEN_DRAWS
PROPOSED = 4         # candidates proposed per round by the gradient, and after the first round as many by loss
ROUNDS = 3           # at most (one slot filled or blended each): the search stops once no candidate lowers the loss
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


Candidate = tuple[tuple[int, ...], ...]  # the words of each filled slot of the k-vector word, in order


class _Search:
    """The vocabulary, the draws, and the two measurements the search makes: a gradient and a loss."""

    def __init__(self, host, latents, gradient_draws, screen_draws, placeholder, weights, chunk, k=1):
        self.host, self.latents, self.placeholder, self.weights, self.chunk = host, latents, placeholder, weights, chunk
        self.gradient_draws, self.k = gradient_draws, k
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

    def vectors(self, slots: Candidate) -> dict[str, torch.Tensor]:
        """The k start vectors of a candidate, [k, width] per encoder: one row per filled slot, cycled over
        the rest as an init word of fewer tokens is (spread_init); no slot filled: the vocabulary's centroid."""
        if not slots:
            return {key: words.mean(0, keepdim=True).repeat(self.k, 1) for key, words in self.words.items()}
        rows = [self.vector(slot) for slot in slots]
        return {key: spread_init(torch.cat([r[key] for r in rows]), self.k) for key in self.tables}

    def loss(self, vectors: dict[str, torch.Tensor], draws: Draws) -> float:
        self.forwards += len(draws)
        words = {self.placeholder: {k: v.to(self.host.device) for k, v in vectors.items()}}
        return evaluate(self.host, self.latents, draws, words, self.weights, max(self.chunk, 4))

    def gradient(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective's gradient at `vectors`, [k, width] per encoder."""
        probe = {k: v.to(self.host.device).clone().requires_grad_(True) for k, v in vectors.items()}
        draws = self.gradient_draws
        with torch.enable_grad():
            for start in range(0, len(draws), self.chunk):
                part = draws[start:start + self.chunk]
                loss = diffusion_loss(self.host, self.latents, part, {self.placeholder: probe}, self.weights)
                (loss * len(part) / len(draws)).backward()
        self.passes += len(draws)
        return {k: p.grad.float().cpu() for k, p in probe.items()}

    def _ranked(self, grad: dict[str, torch.Tensor], positions: list[int]) -> list[int]:
        """Tokens by how far putting them at `positions` would lower the loss, to first order."""
        gain = sum(self.words[key] @ grad[key][positions].sum(0) for key in grad)
        return [int(self.ids[i]) for i in gain.argsort()]

    def proposals(self, current: Candidate, vectors: dict[str, torch.Tensor],
                  singles_by_loss: list[int]) -> list[Candidate]:
        """While a slot is empty: the next slot's words, those the gradient at `vectors` ranks first (first
        order, where the slot's row would appear) and the single words whose own loss was lowest; then,
        every slot filled, the blends of one slot's words with one more: those the gradient ranks first,
        and those with the words of `singles_by_loss` (a first-order score of a blend misses partners that
        a measured loss finds)."""
        grad = self.gradient(vectors)
        n, used = len(current), {t for slot in current for t in slot}
        if n < self.k:
            order = self._ranked(grad, [p for p in range(self.k) if p % (n + 1) == n])
            fresh = [t for t in order[:PROPOSED + len(used)] if t not in used][:PROPOSED]
            by_loss = [t for t in singles_by_loss if t not in used][:PROPOSED]
            return list(dict.fromkeys((*current, (t,)) for t in fresh + by_loss))
        blends = []
        for j, slot in enumerate(current):
            if len(slot) >= MAX_BLEND:
                continue
            for t in self._ranked(grad, [j])[:PROPOSED * 8]:  # blends are scored exactly to first order
                if t not in used:
                    blend = tuple(sorted((*slot, t)))
                    b = self.vector(blend)
                    gain = sum(float((b[key][0] - vectors[key][j]) @ grad[key][j]) for key in grad)
                    blends.append((gain, (*current[:j], blend, *current[j + 1:])))
        by_gradient = [c for _, c in sorted(blends)[:PROPOSED]]
        by_loss = [(*current[:j], tuple(sorted((*current[j], t))), *current[j + 1:])
                   for t in singles_by_loss for j in range(n) if t not in used and len(current[j]) < MAX_BLEND]
        return list(dict.fromkeys(by_gradient + by_loss[:PROPOSED]))


def find_start(host: Host, latents: torch.Tensor, gradient_draws: Draws, screen_draws: Draws, placeholder: str,
               weights: torch.Tensor | None = None, chunk: int = 4, k: int = 1) -> StartResult:
    """The start of a k-vector word that the search finds for these images (module docstring). Passes run
    `chunk` images at a time, so the search needs no more memory than a training step."""
    search = _Search(host, latents, gradient_draws, screen_draws, placeholder, weights, chunk, k)
    coarse_draws = screen_draws[:COARSE_DRAWS]
    current: Candidate = ()
    vectors = search.vectors(current)
    best = math.inf                    # the centroid is no word to start from: the first round always moves
    coarse: dict[Candidate, float] = {}
    fine: dict[Candidate, float] = {}
    for _ in range(ROUNDS):
        singles = [c[0][0] for c in sorted(coarse, key=coarse.get) if len(c) == 1 and len(c[0]) == 1]
        proposed = [c for c in search.proposals(current, vectors, singles) if c not in coarse]
        if not proposed:
            break
        for c in proposed:
            coarse[c] = search.loss(search.vectors(c), coarse_draws)
        for c in sorted(proposed, key=coarse.get)[:FINALISTS]:
            rest = search.loss(search.vectors(c), screen_draws[COARSE_DRAWS:])
            fine[c] = (coarse[c] * COARSE_DRAWS + rest * (len(screen_draws) - COARSE_DRAWS)) / len(screen_draws)
        loss, candidate = min(((v, c) for c, v in fine.items()), default=(math.inf, current))
        if loss >= best:
            break
        best, current, vectors = loss, candidate, search.vectors(candidate)
    word = " ".join(search.strings[t] for slot in current for t in slot)
    return StartResult(word, vectors, search.passes + math.ceil(search.forwards / 3))
