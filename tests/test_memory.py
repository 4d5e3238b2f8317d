"""memory=low recomputes activations without changing a gradient; memory=auto picks it only when needed."""

from __future__ import annotations

import weakref

import pytest
import torch

from textinv_core.memory import SavedBytes, extrapolate
from textinv_core.objective import diffusion_loss
from textinv_core.recompute import recomputed
from textinv_core.trainer import TrainConfig, Trainer, train

# Recomputing a block repeats its exact ops on CPU, so the gradients are the same numbers; the
# tolerance only allows a library to reorder a sum between the two forwards.
EXACT = dict(rtol=0.0, atol=1e-6)


def config(**overrides) -> TrainConfig:
    values = dict(name="probe", init_word="cat", steps=6, learning_rate=0.05, batch_size=2, resolution=32,
                  eval_every=3, eval_draws=4, seed=5, memory="fast")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vectors_trained_with_recomputation_equal_those_trained_without(tiny_host, images, family):
    host = tiny_host(family)
    fast = train(host, images, config(memory="fast"))
    low = train(host, images, config(memory="low"))
    assert fast.memory.startswith("memory fast") and low.memory.startswith("memory low")
    for key in host.encoders:
        torch.testing.assert_close(low.final_vectors[key], fast.final_vectors[key], **EXACT)
    assert [s for s, _ in low.eval_losses] == [s for s, _ in fast.eval_losses]
    assert [v for _, v in low.eval_losses] == pytest.approx([v for _, v in fast.eval_losses], rel=1e-6)


def test_recomputation_keeps_less_for_the_backward_pass_and_restores_every_block(tiny_host, images):
    host = tiny_host("sd1")
    trainer = Trainer(host, images, config())
    draws = trainer.eval_set[:2]
    blocks = host.recompute_blocks()
    assert blocks
    saved = {}
    for low in (False, True):
        with SavedBytes() as counter, recomputed(blocks, enabled=low):
            loss = diffusion_loss(host, trainer.latents, draws, trainer.words(0))
        loss.backward()
        saved[low] = counter.bytes
    assert saved[True] < 0.9 * saved[False]  # tiny UNet: 0.81x; the text encoder's share is not recomputed
    assert all("forward" not in block.__dict__ for block in blocks)


def test_the_probe_counts_what_autograd_keeps_but_not_the_weights_and_keeps_nothing_itself():
    """A linear layer saves its weight (transposed, a view): not new memory. exp saves its output: new
    memory, counted, and gone once the probe's graph is dropped (no cycle through autograd's graph)."""
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)
    with SavedBytes() as counter:
        out = layer(x).exp()
    assert counter.bytes == out.untyped_storage().nbytes()
    gone = weakref.ref(out)
    del out
    assert gone() is None, "the probe kept its graph alive: each probe would leak what the step keeps"


class SmallCard:
    """A real host on a device that reports `free` bytes."""

    def __init__(self, host, free):
        self._host, self.free = host, free

    def __getattr__(self, name):
        return getattr(self._host, name)

    def free_memory(self):
        return self.free


def test_auto_recomputes_exactly_when_a_fast_step_would_not_fit(tiny_host, images):
    from textinv_core.memory import HEADROOM

    roomy = Trainer(SmallCard(tiny_host("sd1"), 1 << 40), images, config(memory="auto")).memory
    assert roomy.mode == "fast" and roomy.low_bytes < roomy.fast_bytes
    between = int(HEADROOM * (roomy.low_bytes + roomy.fast_bytes) / 2)  # a card with room for low only
    trainer = Trainer(SmallCard(tiny_host("sd1"), between), images, config(memory="auto"))
    plan = trainer.memory
    assert plan.mode == "low" and "free" in plan.reason and plan.summary().startswith("memory low: auto")
    result = trainer.run()
    assert result.memory == plan.summary()


def test_a_step_that_would_not_fit_even_with_recomputation_stops_before_it_starts(tiny_host, images):
    from textinv_core.memory import MemoryShortError

    with pytest.raises(MemoryShortError, match="single image even with memory=low.*lower the batch size"):
        train(SmallCard(tiny_host("sd1"), 1 << 10), images, config(memory="auto"))


@pytest.mark.parametrize("masked", [False, True])
def test_a_batch_too_big_for_low_runs_in_parts_and_takes_the_same_step(tiny_host, images, masked):
    """Room for one image of a low step but not four: the batch runs in parts whose gradients add up to
    the whole batch's (with masks too, whose weighted mean is not a mean of equal parts)."""
    from textinv_core.memory import HEADROOM

    host = tiny_host("sd1")
    masks = None
    if masked:
        masks = torch.zeros(len(images), 32, 32)
        for i in range(len(images)):
            masks[i, : 8 + 6 * i] = 1.0  # unequal weight per image
    settings = dict(batch_size=4, steps=3, eval_every=3)
    low = Trainer(SmallCard(host, 1 << 40), images, config(memory="low", **settings)).memory
    per_image = low.low_bytes * HEADROOM / 4
    trainer = Trainer(SmallCard(host, int(per_image * 1.5)), images, config(memory="auto", **settings), masks=masks)
    assert trainer.memory.mode == "low" and trainer.memory.micro_batch == 1
    assert "1 image(s) at a time" in trainer.memory.summary()
    parts = trainer.run()
    whole = train(host, images, config(memory="low", **settings), masks=masks)
    for key in host.encoders:
        # the parts add the gradient in another order: float rounding, 1e-6 of a vector of norm ~0.4
        torch.testing.assert_close(parts.final_vectors[key], whole.final_vectors[key], rtol=0.0, atol=1e-5)
    assert parts.train_losses == pytest.approx(whole.train_losses, rel=1e-5)


def test_auto_without_a_free_memory_figure_keeps_the_fast_path(tiny_host, images):
    trainer = Trainer(SmallCard(tiny_host("sd1"), None), images, config(memory="auto"))
    assert trainer.memory.mode == "fast" and "does not report" in trainer.memory.reason


def test_extrapolation_is_exact_for_a_quadratic_and_never_shrinks_with_size():
    assert extrapolate([1, 4, 9], [3 + 2 + 1, 3 + 8 + 16, 3 + 18 + 81], 16) == pytest.approx(3 + 32 + 256)
    assert extrapolate([1, 4, 9], [10, 20, 25], 100) >= 25  # a concave fit falls back to a straight line


def test_unknown_memory_mode_is_refused(tiny_host, images):
    from textinv_core.config import TrainingError

    with pytest.raises(TrainingError, match="memory must be auto, fast or low"):
        train(tiny_host("sd1"), images, config(memory="tiny"))
