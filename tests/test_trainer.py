"""The trainer does what the paper says and nothing else: only the new vectors move."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from textinv_core.trainer import TrainConfig, Trainer, TrainingError, TrainingObserver, spread_init, train

# Fixed seeds make these deterministic; the margins are what a random tiny model allows.
MARGIN = {"sd1": 0.004, "sd2": 0.004, "sdxl": 0.05}


def small_config(**overrides) -> TrainConfig:
    values = dict(name="probe", init_word="cat", num_vectors=1, steps=40, learning_rate=0.1, batch_size=2,
                  resolution=32, eval_every=20, eval_draws=8, seed=3,
                  max_norm_ratio=0.0)  # random tiny models need long vectors
    values.update(overrides)
    return TrainConfig(**values)


def frozen_tensors(host) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in [("unet", host.unet), ("vae", host.vae)] + [(e.key, e.model) for e in host.text_encoders]:
        for name, tensor in module.state_dict().items():
            out[f"{prefix}.{name}"] = tensor.detach().clone()
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_training_moves_only_new_vectors_and_lowers_eval_loss(tiny_host, images, family):
    host = tiny_host(family)
    before = frozen_tensors(host)
    result = train(host, images, small_config(steps=60))
    after = frozen_tensors(host)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen weights changed: {changed[:5]}"
    assert result.final_eval_loss < result.init_eval_loss * (1 - MARGIN[family])
    assert set(result.vectors) == set(host.encoders)
    for key, width in host.encoders.items():
        assert result.vectors[key].shape == (1, width)
        assert result.vectors[key].dtype == torch.float32


def test_optimizer_state_grows_with_vectors_not_vocabulary(tiny_host, images):
    host = tiny_host("sdxl")
    trainer = Trainer(host, images, small_config(num_vectors=3, steps=2))
    trainer.run()
    params = trainer.optimizer.param_groups[0]["params"]
    assert sum(p.numel() for p in params) == 3 * (768 + 1280)
    for param in params:
        for value in trainer.optimizer.state[param].values():
            assert value.numel() in (1, param.numel())
            assert value.dtype == torch.float32


def test_same_seed_gives_same_vectors(tiny_host, images):
    host = tiny_host("sd1")
    a = train(host, images, small_config(steps=8))
    b = train(host, images, small_config(steps=8))
    assert torch.equal(a.final_vectors["clip_l"], b.final_vectors["clip_l"])


class StopAt(TrainingObserver):
    def __init__(self, step: int):
        self.stop_step, self.step = step, 0

    def on_step(self, step, total, loss):
        self.step = step

    def should_stop(self):
        return self.step >= self.stop_step


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_host, images, tmp_path, family):
    host = tiny_host(family)
    config = dict(steps=24, eval_every=5, snapshot_every=4, early_stop_patience=0)
    whole = train(host, images, small_config(**config), snapshot_dir=tmp_path / "whole")
    stopped = train(host, images, small_config(**config), observer=StopAt(13), snapshot_dir=tmp_path / "cut")
    assert stopped.stopped_reason == "cancelled" and stopped.steps_run == 13
    assert stopped.snapshot_path is not None and stopped.snapshot_path.is_file()
    resumed = train(host, images, small_config(**config), snapshot_dir=tmp_path / "cut", resume_from=tmp_path / "cut")
    assert resumed.steps_run == 24
    for key in host.encoders:
        assert torch.equal(resumed.final_vectors[key], whole.final_vectors[key])
        assert torch.equal(resumed.vectors[key], whole.vectors[key])
    assert resumed.eval_losses == whole.eval_losses


def test_resume_refuses_other_settings(tiny_host, images, tmp_path):
    host = tiny_host("sd1")
    train(host, images, small_config(steps=4, snapshot_every=2), snapshot_dir=tmp_path)
    with pytest.raises(TrainingError, match="learning_rate"):
        train(host, images, small_config(steps=6, learning_rate=0.01), resume_from=tmp_path)


class NanHost:
    """Delegates to a real host but returns NaN predictions from a given call on."""

    def __init__(self, host, nan_from_call: int):
        self._host, self.calls, self.nan_from = host, 0, nan_from_call

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        out = self._host.predict(noisy, timesteps, cond)
        self.calls += 1
        return out * math.nan if self.calls >= self.nan_from else out


def test_nan_loss_stops_with_reason_and_keeps_last_good_snapshot(tiny_host, images, tmp_path):
    from textinv_core.embedding_file import load_embedding

    host = NanHost(tiny_host("sd1"), nan_from_call=9)  # 2 eval batches, then training steps
    with pytest.raises(TrainingError, match="nan") as info:
        train(host, images, small_config(steps=20, snapshot_every=3), snapshot_dir=tmp_path)
    assert "learning rate" in str(info.value)
    snapshots = sorted(tmp_path.glob("probe-step*.safetensors"))
    assert snapshots, "the last good state must be kept"
    vectors = load_embedding(snapshots[-1]).vectors[""]
    assert torch.isfinite(vectors).all()


@pytest.mark.parametrize("init_word", ["", "   "])
def test_an_empty_init_word_starts_from_a_word_the_engine_finds(tiny_host, images, init_word):
    result = train(tiny_host("sd1"), images, small_config(init_word=init_word, steps=2))
    assert result.init_word.strip() and result.start_passes > 0
    assert result.steps_run == 2


def test_the_start_search_measures_at_the_noisier_half_of_the_runs_noise_range(tiny_host, images, monkeypatch):
    import textinv_core.trainer as trainer_module

    seen = []
    real = trainer_module.find_start

    def spy(host, latents, gradient_draws, screen_draws, *args, **kwargs):
        seen.append((gradient_draws.timesteps, screen_draws.timesteps))
        return real(host, latents, gradient_draws, screen_draws, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "find_start", spy)
    host = tiny_host("sd1")
    train(host, images, small_config(init_word="", steps=1, timestep_range=(0.2, 0.6)))
    (gradient, screen), = seen
    first, last = 0.4 * host.num_timesteps - 1, 0.6 * host.num_timesteps  # the upper half of 0.2-0.6 (float rounding)
    for timesteps in (gradient, screen):
        assert int(timesteps.min()) >= first and int(timesteps.max()) < last


@pytest.mark.parametrize("steps", [0, -5])
def test_non_positive_steps_are_refused(tiny_host, images, steps):
    with pytest.raises(TrainingError, match="steps must be at least 1"):
        train(tiny_host("sd1"), images, small_config(steps=steps))


def test_multi_token_init_word_is_averaged_or_spread():
    tokens = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(spread_init(tokens, 1), tokens.mean(0, keepdim=True))
    assert torch.equal(spread_init(tokens, 3), tokens)
    assert torch.equal(spread_init(tokens, 2), torch.stack([tokens[:2].mean(0), tokens[2]]))
    assert torch.equal(spread_init(tokens[:1], 3), tokens[:1].repeat(3, 1))


def test_multi_token_init_word_trains(tiny_host, images):
    host = tiny_host("sd1")
    assert host.word_vectors("teddy bear")["clip_l"].shape[0] == 2
    result = train(host, images, small_config(init_word="teddy bear", num_vectors=1, steps=3))
    assert result.vectors["clip_l"].shape == (1, 768)


def test_norm_control_caps_vector_norms(tiny_host, images):
    host = tiny_host("sd1")
    ratio = 1.2
    result = train(host, images, small_config(learning_rate=5.0, max_norm_ratio=ratio, steps=10))
    cap = ratio * host.token_table_stats()["clip_l"]
    assert float(result.final_vectors["clip_l"].norm(dim=1).max()) <= cap * (1 + 1e-5)


def test_init_pull_keeps_vectors_near_init(tiny_host, images):
    host = tiny_host("sd1")
    init = host.word_vectors("cat")["clip_l"]
    free = train(host, images, small_config(steps=15, learning_rate=0.5))
    pulled = train(host, images, small_config(steps=15, learning_rate=0.5, init_pull=50.0))
    assert (pulled.final_vectors["clip_l"] - init).norm() < (free.final_vectors["clip_l"] - init).norm()


def test_progressive_extension_adds_vectors_at_given_steps(tiny_host, images):
    host = tiny_host("sd1")
    trainer = Trainer(host, images, small_config(num_vectors=3, progressive_steps=(4, 8), steps=10))
    assert [trainer.active_count(s) for s in (0, 3, 4, 7, 8, 9)] == [1, 1, 2, 2, 3, 3]
    init = trainer.init["clip_l"].clone()
    trainer.config.steps = 4
    trainer.run()
    vectors = trainer.vectors["clip_l"].detach()
    assert not torch.equal(vectors[0], init[0]) and torch.equal(vectors[1:], init[1:])


def test_per_image_tokens_train_but_are_not_part_of_the_word(tiny_host, images):
    host = tiny_host("sd1")
    trainer = Trainer(host, images, small_config(per_image_tokens=True, steps=4))
    prompt = trainer.prompt_for(1, 0)
    assert "<probe>" in prompt and "<probe-image-1>" in prompt
    before = trainer.image_vectors["clip_l"].detach().clone()
    result = trainer.run()
    assert not torch.equal(trainer.image_vectors["clip_l"].detach(), before)
    assert result.vectors["clip_l"].shape == (1, 768)


def test_mask_weights_the_loss(tiny_host, images):
    from textinv_core.data import DataError

    host = tiny_host("sd1")
    half = torch.zeros(1, 32, 32)
    half[:, :, :16] = 1.0
    masked = train(host, images, small_config(steps=3), masks=half)
    plain = train(host, images, small_config(steps=3))
    assert masked.init_eval_loss != plain.init_eval_loss
    with pytest.raises(DataError, match="empty"):
        train(host, images, small_config(steps=3), masks=torch.zeros(1, 32, 32))


class RecordTimesteps:
    """Delegates to a real host and keeps every timestep the UNet is asked about."""

    def __init__(self, host):
        self._host, self.seen = host, []

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        self.seen.extend(int(t) for t in timesteps)
        return self._host.predict(noisy, timesteps, cond)


def test_timestep_range_limits_training_and_evaluation_draws(tiny_host, images):
    host = RecordTimesteps(tiny_host("sd1"))
    n = host.num_timesteps
    train(host, images, small_config(steps=10, eval_every=5, timestep_range=(0.6, 0.9)))
    assert len(host.seen) > 20
    assert min(host.seen) >= int(0.6 * n) and max(host.seen) < round(0.9 * n)
    assert max(host.seen) - min(host.seen) > 0.2 * n  # the whole range is used, not one corner
    with pytest.raises(TrainingError, match="timestep range"):
        train(host, images, small_config(timestep_range=(0.8, 0.5)))


def test_style_and_caption_templates_reach_the_prompts(tiny_host, images):
    host = tiny_host("sd1")
    style = Trainer(host, images, small_config(templates="style"))
    assert "style of <probe>" in style.prompt_for(0, 0)
    captions = ["a {} on a table", "my <probe> asleep", "S* in the garden"]
    trainer = Trainer(host, images, small_config(templates="captions", captions=captions))
    assert [trainer.prompt_for(i, 0) for i in range(3)] == ["a <probe> on a table", "my <probe> asleep",
                                                            "<probe> in the garden"]
    with pytest.raises(TrainingError, match="one caption per image"):
        Trainer(host, images, small_config(templates="captions", captions=["only one"]))


def test_vectors_and_optimizer_stay_fp32_under_bf16_model(images):
    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.tiny_models import build_tiny_components

    host = DiffusersHost(build_tiny_components("sd1"), dtype=torch.bfloat16)
    trainer = Trainer(host, images, small_config(steps=2))
    trainer.run()
    param = trainer.vectors["clip_l"]
    assert param.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in trainer.optimizer.state[param].values())
    assert next(host.unet.parameters()).dtype == torch.bfloat16


class Collect(TrainingObserver):
    def __init__(self):
        self.steps, self.evals, self.previews = [], [], []

    def on_step(self, step, total, loss):
        self.steps.append((step, total, loss))

    def on_eval(self, step, eval_loss):
        self.evals.append(step)

    def on_preview(self, step, image):
        self.previews.append((step, image.size))


def test_observer_sees_progress_loss_evaluations_and_previews(tiny_host, images):
    observer = Collect()
    train(tiny_host("sd1"), images, small_config(steps=6, eval_every=3, preview_every=3), observer=observer)
    assert [s for s, _, _ in observer.steps] == [1, 2, 3, 4, 5, 6] and observer.steps[0][1] == 6
    assert all(math.isfinite(loss) for _, _, loss in observer.steps)
    assert observer.evals == [0, 1, 3, 6]  # 1: before the first regular evaluation, at its halving point
    assert observer.previews == [(3, (32, 32)), (6, (32, 32))]


@pytest.mark.parametrize("resolution", [30, 4, 0])
def test_resolution_that_does_not_fit_the_model_is_refused(tiny_host, images, resolution):
    with pytest.raises(TrainingError, match="multiple of 8"):
        train(tiny_host("sd1"), images, small_config(resolution=resolution))


class PixelLocalHost:
    """A real host's text encoder with a denoiser and an encoder that act on each 8x8 patch alone, so
    a latent pixel depends only on its own patch: what a mask leaves out cannot reach the loss."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def encode_images(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels.float(), 8).repeat(1, 2, 1, 1)[:, :4]

    def predict(self, noisy, timesteps, cond):
        return noisy * cond.hidden.float().pow(2).mean()


def test_a_mask_leaves_the_loss_blind_to_pixels_outside_its_white_area(tiny_host, images):
    host = PixelLocalHost(tiny_host("sd1"))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # the left half is the subject
    changed = []
    for image in images:
        pixels = np.array(image.resize((32, 32)))
        pixels[:, 16:] = 255 - pixels[:, 16:]  # only the right half, outside the white area
        changed.append(Image.fromarray(pixels))
    same = [image.resize((32, 32)) for image in images]
    config = small_config(steps=4, flip=False)
    with_mask = [train(host, imgs, config, masks=mask) for imgs in (same, changed)]
    assert with_mask[0].eval_losses == with_mask[1].eval_losses
    assert with_mask[0].train_losses == with_mask[1].train_losses
    assert torch.equal(with_mask[0].final_vectors["clip_l"], with_mask[1].final_vectors["clip_l"])
    without = [train(host, imgs, config) for imgs in (same, changed)]
    assert without[0].eval_losses != without[1].eval_losses  # the change does reach an unmasked loss
