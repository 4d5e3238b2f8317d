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


def test_evaluations_come_early_too_but_early_stopping_reads_only_the_regular_ones(tiny_host, images):
    from textinv_core.trainer import Trainer, evaluates_at

    assert [s for s in range(1, 401) if evaluates_at(s, 100)] == [12, 25, 50, 100, 200, 300, 400]
    assert [s for s in range(1, 7) if evaluates_at(s, 1)] == [1, 2, 3, 4, 5, 6]
    # A flat loss and a window of 4: the evaluations at steps 1 and 2 (the halving points of 4) stay out
    # of the window, so the run stops at its fourth regular evaluation (steps 0, 4, 8, 12), not at step 4.
    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(eval_every=4, lr_drops=0))
    result = trainer.run()
    assert [s for s, _ in result.eval_losses][:4] == [0, 1, 2, 4]
    assert result.stopped_reason == "early_stop" and result.steps_run == 12


@pytest.mark.parametrize("family", ["sd1"])
def test_early_stopping_ends_a_run_whose_loss_is_flat(tiny_host, images, family):
    from textinv_core.trainer import train

    result = train(tiny_host(family), images, flat_run_config(lr_drops=0))
    assert result.stopped_reason == "early_stop" and result.steps_run < 40


def flat_run_config(**overrides):
    from textinv_core.trainer import TrainConfig

    settings = dict(name="probe", init_word="cat", steps=400, learning_rate=1e-9, batch_size=2, resolution=32,
                    eval_every=2, eval_draws=4, early_stop_patience=4, preview_every=0, memory="fast", word_swaps=0)
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize("family", ["sd1"])
def test_a_plateau_drops_the_learning_rate_at_the_best_word_before_it_stops(tiny_host, images, family):
    import torch

    from textinv_core.config import LR_DROP
    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host(family), images, flat_run_config(lr_drops=2))
    result = trainer.run()
    assert result.stopped_reason == "early_stop" and len(result.lr_drops) == 2
    assert result.lr_drops[0] < result.lr_drops[1] < result.steps_run < 80
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.config.effective_lr * LR_DROP ** 2)
    # A drop goes back to the best vectors and forgets AdamW's moments of the vectors it leaves.
    with torch.no_grad():
        for v in trainer.vectors.values():
            v.add_(1.0)
    trainer._drop_learning_rate()
    for key, v in trainer.vectors.items():
        assert torch.equal(v.detach(), trainer.best.vectors[key])
        assert v not in trainer.optimizer.state


@pytest.mark.parametrize("family", ["sd1"])
def test_a_run_resumed_after_a_learning_rate_drop_equals_the_uninterrupted_one(tiny_host, images, tmp_path, family):
    import torch

    from textinv_core.trainer import train

    from .test_trainer import StopAt

    host = tiny_host(family)
    config = dict(learning_rate=1e-3, early_stop_patience=3, lr_drops=3, steps=30, snapshot_every=1)
    whole = train(host, images, flat_run_config(**config), snapshot_dir=tmp_path / "whole")
    assert whole.lr_drops, "the setting must drop the learning rate before the interrupt for this test to show it"
    cut_at = whole.lr_drops[0] + 3
    stopped = train(host, images, flat_run_config(**config), observer=StopAt(cut_at), snapshot_dir=tmp_path / "cut")
    assert stopped.steps_run == cut_at and stopped.lr_drops == whole.lr_drops[:1]
    cut = tmp_path / "cut"
    resumed = train(host, images, flat_run_config(**config), snapshot_dir=cut, resume_from=cut)
    assert resumed.lr_drops == whole.lr_drops and resumed.steps_run == whole.steps_run
    for key in host.encoders:
        assert torch.equal(resumed.final_vectors[key], whole.final_vectors[key])
    assert resumed.eval_losses == whole.eval_losses


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


def fake_trials(trainer, monkeypatch, kept: bool | list[bool]) -> list:
    """Replace the trainer's swap trials by ones that end on the swapped word itself and score it below
    (kept) or above the best word, one flag for every trial or one per trial in turn; returns the list the
    tried (word, steps) are appended to."""
    import torch

    tried = []

    def trial(vectors, steps):
        tried.append(({k: v.clone() for k, v in vectors.items()}, steps))
        with torch.no_grad():
            for key, v in trainer.vectors.items():
                v.copy_(vectors[key])
        beats = kept[len(tried) - 1] if isinstance(kept, list) else kept
        return trainer.best.loss + (-1.0 if beats else 1.0)

    monkeypatch.setattr(trainer, "_trial", trial)
    return tried


@pytest.mark.parametrize("kept", [True, False])
def test_a_plateau_tries_a_word_swap_first_and_keeps_it_only_if_its_trial_beats_the_best(tiny_host, images,
                                                                                         monkeypatch, kept):
    import torch

    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(word_swaps=1, lr_drops=1))
    tried = fake_trials(trainer, monkeypatch, kept)
    result = trainer.run()
    # the first finalist's trial beats the best and is kept, or both are tried; a quarter of eval_every=2 steps each
    assert [steps for _, steps in tried] == ([1] if kept else [1, 1])
    table = trainer.host.token_table("clip_l").float().cpu()
    for swapped, _ in tried:  # one vector of the word replaced by a row of the vocabulary
        rows = swapped["clip_l"]
        assert sum(bool((table == row).all(1).any()) for row in rows) >= 1
    assert result.swap_passes > 0 and result.stopped_reason == "early_stop"
    if kept:  # trained on from the swapped word; the drop came at the next plateau
        (step, change), = result.swaps
        assert change.startswith("vector ") and result.lr_drops and step < result.lr_drops[0]
        assert any(torch.equal(result.vectors["clip_l"], w["clip_l"]) for w, _ in tried)
    else:     # as if no swap had been tried: the plateau drops the learning rate
        assert result.swaps == [] and len(result.lr_drops) == 1


@pytest.mark.parametrize("kept", [True, False])
def test_a_found_start_is_tried_with_one_slot_swapped_before_the_first_step(tiny_host, images, monkeypatch, kept):
    """A found start is one vector copied to every slot: before the first step the trainer tries it with the
    first slot swapped for a vocabulary row (a copy's swaps would be the same ones) and keeps the trial's word
    only if it beats the start. The plateau tries are left as they were."""
    import torch

    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(init_word="", num_vectors=2, word_swaps=1, steps=2))
    start = {k: v.detach().clone() for k, v in trainer.vectors.items()}
    assert torch.equal(start["clip_l"][0], start["clip_l"][1])
    trials = fake_trials(trainer, monkeypatch, kept)
    result = trainer.run()
    tried = [word for word, _ in trials]
    table = trainer.host.token_table("clip_l").float().cpu()
    assert len(tried) == (1 if kept else 2)  # the first trial that beats the start is kept, untried the rest
    for word in tried:  # slot 1 a vocabulary row, slot 2 the start as it was
        assert bool((table == word["clip_l"][0]).all(1).any())
        assert torch.equal(word["clip_l"][1], start["clip_l"][1])
    assert trainer.swaps_tried == 0  # the plateau's tries are all still there
    if kept:
        (step, change), = result.swaps
        assert step == 0 and change.startswith("vector 1 -> ")
        assert result.eval_losses[1] == (0, result.eval_losses[0][1] - 1.0)
        assert any(torch.allclose(result.final_vectors["clip_l"], w["clip_l"], atol=1e-5) for w in tried)
    else:  # training went on from the start (the learning rate is too small to move it visibly)
        assert result.swaps == [] and result.swap_passes > 0
        assert torch.allclose(result.final_vectors["clip_l"], start["clip_l"].cpu(), atol=1e-5)


def test_a_swap_whose_first_trial_loses_tries_the_next_finalist_and_keeps_it_if_it_wins(tiny_host, images,
                                                                                        monkeypatch):
    import torch

    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(init_word="", num_vectors=2, word_swaps=1, steps=2))
    trials = fake_trials(trainer, monkeypatch, [False, True])
    result = trainer.run()
    (first, _), (second, _) = trials
    assert not torch.equal(first["clip_l"], second["clip_l"])  # two different finalists, in turn
    (step, change), = result.swaps
    assert step == 0 and result.eval_losses[1] == (0, result.eval_losses[0][1] - 1.0)
    assert torch.allclose(result.final_vectors["clip_l"], second["clip_l"], atol=1e-5)


@pytest.mark.parametrize("setting", [dict(init_word="cat"), dict(num_vectors=1), dict(word_swaps=0), dict(steps=1)])
def test_no_start_swap_for_a_given_word_one_vector_swaps_off_or_a_run_shorter_than_an_interval(
        tiny_host, images, monkeypatch, setting):
    from textinv_core.trainer import Trainer

    config = flat_run_config(**{"init_word": "", "num_vectors": 2, "word_swaps": 1, "steps": 2, **setting})
    trainer = Trainer(tiny_host("sd1"), images, config)
    monkeypatch.setattr(trainer, "_try_swap", lambda where: pytest.fail(f"a swap was tried at {where}"))
    assert trainer.run().swaps == []


def test_a_rejected_swap_leaves_the_run_as_it_was(tiny_host, images, monkeypatch):
    import torch

    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(word_swaps=1, learning_rate=1e-2))
    for _ in range(3):
        trainer.train_step()
    trainer._record_eval()
    vectors = {k: v.detach().clone() for k, v in trainer.vectors.items()}
    moments = {i: {s: t.clone() for s, t in trainer.optimizer.state[p].items()}
               for i, p in enumerate(trainer.vectors.values())}
    step, losses, best = trainer.step, list(trainer.train_losses), trainer.best.loss
    monkeypatch.setattr(trainer, "_trial", lambda v, n: trainer.best.loss + 1.0)
    assert not trainer._swap_at_plateau()
    assert (trainer.step, trainer.train_losses, trainer.best.loss, trainer.swaps) == (step, losses, best, [])
    for key, v in trainer.vectors.items():
        assert torch.equal(v.detach(), vectors[key])
    for i, p in enumerate(trainer.vectors.values()):
        assert all(torch.equal(trainer.optimizer.state[p][s], t) for s, t in moments[i].items())


@pytest.mark.parametrize("seed", [2 ** 63 - 1, -(2 ** 63)])
def test_a_trial_takes_any_seed_the_settings_allow(tiny_host, images, seed):
    from textinv_core.trainer import Trainer

    trainer = Trainer(tiny_host("sd1"), images, flat_run_config(seed=seed, word_swaps=1))
    assert trainer._trial({k: v.detach().clone() for k, v in trainer.vectors.items()}, 1) > 0


def test_a_swap_puts_back_the_shape_a_word_lacks_on_the_toy_world():
    """A word with the colour and the pattern but no shape, the basin that training from 'plain' can settle in
    on the blue plain square: the swap puts 'square' into one of its vectors, and 25 steps from there beat it."""
    from textinv_core.toyworld import scene as world
    from textinv_core.toyworld.bench import RECON_TEMPLATE
    from textinv_core.toyworld.model import DEFAULT_MODEL_DIR, load_host
    from textinv_core.trainer import TrainConfig, Trainer

    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the toy model (textinv_core/toyworld/weights) is not in this checkout")
    host = load_host(None)
    concept = {"shape": "square", "colour": "blue", "pattern": "plain"}
    images = [world.render(s) for s in world.concept_images(concept, count=5, seed=1)]
    config = TrainConfig(name="swap", init_word="blue plain", templates="captions", captions=[RECON_TEMPLATE] * 5,
                         resolution=world.SIZE, seed=1, preview_every=0, snapshot_every=0)
    trainer = Trainer(host, images, config)
    trainer._record_eval()
    before = trainer.best.loss
    assert trainer._swap_at_plateau()
    (step, change), = trainer.swaps
    assert step == 0 and "'square'" in change and trainer.best.loss < before


def test_a_run_resumed_after_a_word_swap_equals_the_uninterrupted_one(tiny_host, images, tmp_path):
    import torch

    from textinv_core.trainer import train

    from .test_trainer import StopAt

    host = tiny_host("sd1")
    config = dict(learning_rate=1e-3, early_stop_patience=3, lr_drops=1, steps=40, word_swaps=2, snapshot_every=1)
    whole = train(host, images, flat_run_config(**config), snapshot_dir=tmp_path / "whole")
    assert whole.swaps, "the setting must keep a swap before the interrupt for this test to show it"
    cut_at = whole.swaps[0][0] + 3
    stopped = train(host, images, flat_run_config(**config), observer=StopAt(cut_at), snapshot_dir=tmp_path / "cut")
    assert stopped.steps_run == cut_at and stopped.swaps == whole.swaps[:1]
    cut = tmp_path / "cut"
    resumed = train(host, images, flat_run_config(**config), snapshot_dir=cut, resume_from=cut)
    assert (resumed.swaps, resumed.swap_passes, resumed.lr_drops) == (whole.swaps, whole.swap_passes, whole.lr_drops)
    assert resumed.steps_run == whole.steps_run and resumed.eval_losses == whole.eval_losses
    for key in host.encoders:
        assert torch.equal(resumed.final_vectors[key], whole.final_vectors[key])
