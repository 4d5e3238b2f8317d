"""The ComfyUI host inside a real ComfyUI process: no second copy of the weights, partial loading, sampling.

Each test runs tests/comfy/host_checks.py in a ComfyUI process on a tiny checkpoint (skipped, with the
reason, without COMFYUI_PATH). On a CPU ComfyUI never loads a model partly, and its VRAM flags cannot
even be given (argparse refuses them beside --cpu; without --cpu a CPU-only torch fails to start), so
partial loading is forced through ComfyUI's own loading code with a small weight budget. What needs a
GPU (the flags themselves) is listed in docs/COMFYUI.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .harness import HERE, server_env


def run_check(comfy_path, checkpoint, name: str, flags: str = "") -> dict:
    cmd = ["nice", "-n", "10", sys.executable, str(HERE / "host_checks.py"), str(checkpoint), name, *flags.split()]
    done = subprocess.run(cmd, cwd=comfy_path, env=server_env(), capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TEXTINV-RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + "\n" + done.stderr[-6000:]
    return json.loads(lines[-1][len("TEXTINV-RESULT "):])


def assert_same_grads(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = max(abs(v) for v in a[key]) or 1.0
        assert max(abs(x - y) for x, y in zip(a[key], b[key])) <= rel * scale, key


@pytest.fixture(scope="module")
def memory_checks(comfy_path, checkpoints):
    return {family: run_check(comfy_path, checkpoints[family], "memory") for family in ("sd15", "sdxl")}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_step_keeps_no_copy_of_the_weights_for_backward(memory_checks, family):
    r = memory_checks[family]
    ref, copies = r["fast-ref"], r["fast-copies"]
    # The same loss and gradient as the route that keeps ComfyUI's weight copies...
    assert ref["loss"] == copies["loss"]
    assert_same_grads(ref["grads"], copies["grads"], rel=0.0)
    # ...while autograd keeps no copy of the weights: the copies route keeps more than all their bytes,
    # this one at least 90% of them less (what is left is activations, a 64 px image's here).
    assert copies["saved"] > r["weights"]
    assert copies["saved"] - ref["saved"] > 0.9 * r["weights"]
    assert ref["saved"] < 0.25 * r["weights"]
    # No weight gradient is computed either (ComfyUI's UNet parameters require grad): the shared
    # model's parameters get no .grad.
    assert ref["weight_grads"] == 0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_recomputed_blocks_give_the_same_gradient_and_are_restored(memory_checks, family):
    r = memory_checks[family]
    assert r["low-ref"]["blocks"] > 0
    assert r["low-ref"]["blocks_called"] == r["low-ref"]["blocks"]  # each block is called as a module
    assert r["low-ref"]["patched_left"] == 0
    assert_same_grads(r["low-ref"]["grads"], r["fast-ref"]["grads"])
    assert r["low-ref"]["saved"] < r["fast-ref"]["saved"]
    assert r["low-ref"]["weight_grads"] == 0  # recomputed blocks compute no weight gradient either


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_leaves_no_wrapper_and_other_nodes_results_bit_identical(memory_checks, family):
    r = memory_checks[family]
    assert r["graph_unchanged"] is True
    assert r["notes_left"] == 0
    assert isinstance(r["free_memory"], int) and r["free_memory"] > 0
    assert r["vram_state"] == "DISABLED" and r["lower_flag"] is None  # a CPU has no lower VRAM mode


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_partly_loaded_and_weightless_unet_train_like_a_loaded_one(comfy_path, checkpoints, family):
    # What --lowvram (a partly loaded UNet) and --novram (no weight kept on the device) do on a GPU,
    # through ComfyUI's own loading code: the same gradient, and the per-op casts are not kept either.
    r = run_check(comfy_path, checkpoints[family], "partial")
    for patches in ("plain", "patched"):
        full, part, none = r[f"full-{patches}"], r[f"partial-{patches}"], r[f"none-{patches}"]
        assert not full["lowvram"] and part["lowvram"] and none["lowvram"]
        assert 0 < part["loaded"] < full["loaded"] and none["loaded"] < part["loaded"]
        for step in (part, none):
            assert_same_grads(step["grads"], full["grads"])
            assert_same_grads(step["low"], full["grads"])
            assert step["saved"] <= 1.05 * full["saved"]  # the cast copies are not kept either
    # The weight patches (a LoRA-like diff) reach the gradient on every route.
    with pytest.raises(AssertionError):
        assert_same_grads(r["full-patched"]["grads"], r["full-plain"]["grads"])


def test_weights_already_in_the_compute_dtype_are_read_in_place_by_backward(comfy_path, checkpoints):
    # fp32 weights on a CPU need no cast: the backward pass reads the module's own (inference) tensor,
    # as it does for fp16/bf16 weights on a GPU.
    r = run_check(comfy_path, checkpoints["sd15"], "step", "--fp32-unet --fp32-text-enc")
    ref, copies = r["fast-ref"], r["fast-copies"]
    assert ref["reads"]["in_place"] > 0 and ref["reads"]["cast"] == 0
    assert ref["loss"] == copies["loss"]
    assert_same_grads(ref["grads"], copies["grads"], rel=0.0)


def test_sample_draws_all_noise_from_the_seed_and_types_the_word(comfy_path, checkpoints):
    r = run_check(comfy_path, checkpoints["sd15"], "sample")
    assert r["count"] == [2, 1] and r["sizes"] == [[64, 64]] * 3
    assert r["same_first"] is True      # a prompt's image does not depend on the other prompts
    assert r["prompts_differ"] is True
    assert r["word_equals_typed"] is True  # the word set to 'ball' samples exactly like typing 'ball'


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_works_when_sub_quadratic_attention_splits_the_keys(comfy_path, checkpoints, family):
    """ComfyUI's default attention without PyTorch attention (CPU, --use-quad-cross-attention) splits the
    keys when free memory is short and then exponentiates in place, which autograd refuses (a full-size
    SDXL step at 1024 px failed so on CPU). Training routes those calls to PyTorch's attention."""
    r = run_check(comfy_path, checkpoints[family], "attention")
    assert "automatic differentiation" in r["sub_quad_with_grad"]  # ComfyUI's own call fails under autograd
    roomy, short = r["roomy"], r["short"]
    assert abs(short["loss"] - roomy["loss"]) <= 1e-5 * abs(roomy["loss"])
    assert_same_grads(roomy["grads"], short["grads"], rel=1e-4)
