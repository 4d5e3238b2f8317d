"""A NaN loss or a Ctrl-C mid-step leaves the last truly good state, and says how to go on."""

from __future__ import annotations

import math

import pytest
import torch

from textinv_core.embedding_file import load_embedding
from textinv_core.snapshots import read_resume
from textinv_core.trainer import TrainConfig, TrainingError, train


def config(**overrides) -> TrainConfig:
    values = dict(name="probe", init_word="cat", steps=8, learning_rate=0.05, batch_size=2, resolution=32,
                  eval_every=4, eval_draws=4, seed=3, snapshot_every=0, preview_every=0, memory="fast")
    values.update(overrides)
    return TrainConfig(**values)


class FailingHost:
    """A real host whose denoiser fails from its n-th training call on (evaluation calls are not counted)."""

    def __init__(self, host, from_call: int, failure):
        self._host, self.calls, self.from_call, self.failure = host, 0, from_call, failure

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        out = self._host.predict(noisy, timesteps, cond)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.from_call:
                if self.failure == "nan":
                    return out * math.nan
                raise KeyboardInterrupt
        return out


def test_a_nan_keeps_the_vectors_before_the_update_that_produced_it(tiny_host, images, tmp_path):
    host = tiny_host("sd1")
    with pytest.raises(TrainingError) as info:  # the loss of step 6 is NaN: update 5 made the bad vectors
        train(FailingHost(host, 6, "nan"), images, config(), snapshot_dir=tmp_path)
    message = str(info.value)
    assert "step 6" in message and "step 4" in message and "learning rate below 0.05" in message
    good = train(host, images, config(steps=4))
    saved = load_embedding(tmp_path / "probe-step000004.safetensors").vectors[""]
    assert torch.equal(saved, good.final_vectors["clip_l"])
    meta, _ = read_resume(tmp_path, "probe")
    assert meta["step"] == 4 and meta["stopped"] == "nan" and len(meta["train_losses"]) == 4


def test_after_a_nan_a_resume_may_lower_the_learning_rate_and_change_nothing_else(tiny_host, images, tmp_path):
    host = tiny_host("sd1")
    with pytest.raises(TrainingError):
        train(FailingHost(host, 6, "nan"), images, config(), snapshot_dir=tmp_path)
    resumed = train(host, images, config(learning_rate=0.01), snapshot_dir=tmp_path, resume_from=tmp_path)
    assert resumed.steps_run == 8 and all(math.isfinite(v) for v in resumed.train_losses)
    for other in (dict(learning_rate=0.1), dict(learning_rate=0.01, seed=4)):  # higher, or another setting
        with pytest.raises(TrainingError, match="only a lower learning rate may change"):
            train(host, images, config(**other), resume_from=tmp_path / "probe-step000004.safetensors")


def test_ctrl_c_mid_step_saves_the_state_before_that_step_and_the_run_resumes_exactly(tiny_host, images, tmp_path):
    host = tiny_host("sd1")
    whole = train(host, images, config())
    with pytest.raises(KeyboardInterrupt):  # step 5 is cut short before its update
        train(FailingHost(host, 5, "interrupt"), images, config(snapshot_every=100), snapshot_dir=tmp_path)
    assert (tmp_path / "probe-step000004.safetensors").is_file()
    resumed = train(host, images, config(), snapshot_dir=tmp_path, resume_from=tmp_path)
    assert torch.equal(resumed.final_vectors["clip_l"], whole.final_vectors["clip_l"])
    assert resumed.train_losses == whole.train_losses
