"""The engine's own start beats a neutral word, and early stopping stops when the word stops improving."""

from __future__ import annotations

import pytest

from textinv_core.evaluation import stopped_improving


def test_a_flat_loss_stops_and_a_falling_one_goes_on():
    flat = [0.05, 0.0502, 0.0499, 0.0501, 0.05, 0.0498, 0.0502]
    falling = [0.09, 0.08, 0.071, 0.063, 0.056, 0.05, 0.045]
    slow_but_steady = [0.050 - 0.0004 * i for i in range(20)]  # 0.8% per evaluation, no noise
    assert stopped_improving(flat, window=5)
    assert not stopped_improving(falling, window=5)
    assert not stopped_improving(slow_but_steady, window=5)
    assert not stopped_improving(flat[:4], window=5)  # not before a whole window
    assert not stopped_improving(flat, window=0)       # 0 = off


def test_noisy_descent_goes_on_while_the_trend_beats_the_scatter():
    noisy_falling = [0.080, 0.074, 0.076, 0.066, 0.068, 0.059, 0.061, 0.052]
    noisy_plateau = [0.052, 0.049, 0.053, 0.050, 0.052, 0.049, 0.051, 0.050]
    assert not stopped_improving(noisy_falling, window=6)
    assert stopped_improving(noisy_plateau, window=6)


@pytest.mark.parametrize("family", ["sd1"])
def test_early_stopping_ends_a_run_whose_loss_is_flat(tiny_host, images, family):
    from textinv_core.trainer import TrainConfig, train

    config = TrainConfig(name="probe", init_word="cat", steps=400, learning_rate=1e-9, batch_size=2, resolution=32,
                         eval_every=2, eval_draws=4, early_stop_patience=4, preview_every=0, memory="fast")
    result = train(tiny_host(family), images, config)
    assert result.stopped_reason == "early_stop" and result.steps_run < 40


def test_the_default_start_beats_object_on_a_short_toy_inversion():
    """From "object" one vector settles in a basin without the shape; the searched start does not."""
    from textinv_core.toyworld import scene as world
    from textinv_core.toyworld.bench import RECON_TEMPLATE
    from textinv_core.toyworld.model import DEFAULT_MODEL_DIR, load_host
    from textinv_core.trainer import TrainConfig, train

    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the toy model (textinv_core/toyworld/weights) is not in this checkout")
    host = load_host(None)
    concept = {"shape": "square", "colour": "blue", "pattern": "striped"}
    images = [world.render(s) for s in world.concept_images(concept, count=5, seed=3)]

    def short_run(init_word: str):
        config = TrainConfig(name="start", init_word=init_word, steps=15, templates="captions",
                             captions=[RECON_TEMPLATE] * len(images), resolution=world.SIZE, seed=3,
                             early_stop_patience=0, preview_every=0, snapshot_every=0, eval_every=5)
        return train(host, images, config)

    found, neutral = short_run(""), short_run("object")
    assert found.init_word not in ("", "object")
    assert found.eval_losses[0][0] == neutral.eval_losses[0][0] == 0  # the same fixed draws scored both
    assert found.init_eval_loss < neutral.init_eval_loss
    assert found.best_eval_loss < neutral.best_eval_loss
