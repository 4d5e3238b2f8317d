"""What a written word says about itself: the one place its `textinv.*` metadata keys are built.

safetensors metadata holds only strings. `save_embedding` adds the name, the vector count and a
content hash; these builders add how the word came to be (family, steps, init word, losses, ...),
with the same keys whichever front end trained it.
"""

from __future__ import annotations


def snapshot_metadata(family: str, step: int) -> dict[str, str]:
    return {"textinv.family": family, "textinv.steps": str(step)}


def training_metadata(family: str, config, result) -> dict[str, str]:
    """For a finished run: `config` a TrainConfig, `result` its TrainResult."""
    meta = snapshot_metadata(family, result.steps_run)
    meta.update({
        "textinv.init_word": result.init_word,
        "textinv.templates": config.templates,
        "textinv.vectors_trained": str(config.num_vectors),
        "textinv.best_step": str(result.best_step),
        "textinv.init_eval_loss": f"{result.init_eval_loss:.6g}",
        "textinv.best_eval_loss": f"{result.best_eval_loss:.6g}",
        "textinv.stopped": result.stopped_reason,
    })
    return meta


def composed_metadata(family: str, mode: str, names: list[str]) -> dict[str, str]:
    return {"textinv.family": family, "textinv.composed": f"{mode} of {', '.join(names)}"}
