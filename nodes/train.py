"""Train Embedding: learn a pseudo-word from the images in the graph, on the graph's own models.

The node only wires ComfyUI to the engine: the host adapter (textinv_core/hosts/comfy.py) trains on
clones of the MODEL/CLIP the graph loaded, on the device ComfyUI's model management picks; the
trainer (textinv_core/trainer.py) does the math and the previews. Progress goes to the node's bar,
the loss to the browser (`textinv.loss` events, drawn by web/textinv.js) and previews to the node as
live images. Cancel (Interrupt) stops between steps, keeps a snapshot, then ends the prompt as
interrupted. The final word is written to the embeddings folder, so `embedding:name` works in stock
ComfyUI. Widget defaults are the engine's (textinv_core/config.py).
"""

from __future__ import annotations

import logging

from ..textinv_core.config import LR_DROP, default
from .common import CATEGORY, EMBEDDING_TYPE, PseudoWord, embeddings_folder, image_tensor

log = logging.getLogger(__name__)


class _NodeObserver:
    """TrainingObserver for one node run: progress bar, loss events, previews, cancel."""

    def __init__(self, total: int, node_id):
        import comfy.utils

        self.total, self.node_id = total, node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.cancelled = False

    def _send(self, event: str, data: dict) -> None:
        try:
            import server

            instance = server.PromptServer.instance
            instance.send_sync(event, dict(data, node=self.node_id), instance.client_id)
        except Exception:  # noqa: BLE001 - no server (e.g. run from a script): nothing to show
            pass

    def _progress(self, step: int, preview=None) -> None:
        import comfy.model_management as mm

        if self.cancelled:
            return
        try:  # ComfyUI's progress hook raises on Interrupt; stop between steps instead
            self.bar.update_absolute(step, self.total, preview)
        except mm.InterruptProcessingException:
            self.cancelled = True

    def on_step(self, step: int, total: int, loss: float) -> None:
        self._send("textinv.loss", {"step": step, "total": total, "loss": loss})
        self._progress(step)

    def on_eval(self, step: int, eval_loss: float) -> None:
        self._send("textinv.loss", {"step": step, "total": self.total, "eval_loss": eval_loss})

    def on_snapshot(self, step: int, path) -> None:
        self._send("textinv.snapshot", {"step": step, "path": str(path)})

    def on_memory(self, summary: str) -> None:
        log.info("textinv: %s", summary)
        self._send("textinv.memory", {"text": summary})

    def on_preview(self, step: int, image) -> None:
        self._progress(step, ("PNG", image, 512))

    def should_stop(self) -> bool:
        import comfy.model_management as mm

        if not self.cancelled and mm.processing_interrupted():
            self.cancelled = True
        return self.cancelled


class TrainEmbedding:
    """Learn `<name>` from a few images of one concept (Gal et al. 2023, Textual Inversion)."""

    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CLIP", EMBEDDING_TYPE, "IMAGE")
    RETURN_NAMES = ("clip", "embedding", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The CLIP with <name> loaded: type it in any CLIP Text Encode downstream.",
        "The learned word, for Load Pseudo-word or Compose Concepts.",
        "Training loss (grey raw, blue smoothed) and evaluation loss (orange) against step.",
    )
    DESCRIPTION = ("Textual Inversion: learns a new word from 3-5 images of an object (or 10-20 of a style) "
                   "on the loaded checkpoint, saves it to the embeddings folder and returns a CLIP that knows it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the word is trained against (not changed)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint (not changed)."}),
                "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint, to encode the training images."}),
                "images": ("IMAGE", {"tooltip": "Training images: a batch, e.g. from Load Image Set From Folder. "
                                                "3-5 photos of an object, or 10-20 images of a style."}),
                "name": ("STRING", {"default": "my-concept", "tooltip": "File and word name: saved as "
                                    "embeddings/<name>.safetensors, typed as <name> or embedding:<name>."}),
                "init_word": ("STRING", {"default": default("init_word"), "tooltip": "A coarse word for the "
                                         "concept ('cat', 'toy', 'painting'); the new word starts from its "
                                         "embedding. Empty: the node searches the vocabulary for the word that "
                                         "fits the images best, then tries it with one of its vectors swapped "
                                         "for another word the images call for (together about a tenth of a "
                                         "run's image-passes)."}),
                "vectors": ("INT", {"default": default("num_vectors"), "min": 1, "max": 75, "tooltip": "Tokens the "
                                    "word uses. The paper finds 1 often enough; 2 (the default) held a concept's "
                                    "parts together more often; many more edit less easily."}),
                "steps": ("INT", {"default": default("steps"), "min": 1, "max": 100000,
                                  "tooltip": "Optimisation steps (at most: early stop may end sooner)."}),
                "learning_rate": ("FLOAT", {"default": default("learning_rate"), "min": 1e-6, "max": 1.0,
                                            "step": 0.0001, "tooltip": "Learning rate per step, at any batch size "
                                            "(the paper's 0.005 x batch 4)."}),
                "batch_size": ("INT", {"default": default("batch_size"), "min": 1, "max": 64,
                                       "tooltip": "Images per step (the learning rate is per step at any "
                                       "batch size). 1 needs the least memory."}),
                "templates": (["object", "style", "captions"], {"default": default("templates"), "tooltip": "Prompts "
                              "the word is trained in: object ('a photo of a <w>'), style ('a painting in the "
                              "style of <w>'), or the captions below, one line per image."}),
                "seed": ("INT", {"default": default("seed"), "min": 0, "max": 0xFFFFFFFF,
                                 "control_after_generate": False,
                                 "tooltip": "Seed of all training randomness (noise, timesteps, flips); the same "
                                            "seed repeats a run. Kept fixed, so running the graph again does not "
                                            "retrain."}),
                "early_stop": ("INT", {"default": default("early_stop_patience"), "min": 0, "max": 1000,
                                       "tooltip": "When this many evaluations in a row show no downward "
                                                  "trend of the evaluation loss beyond its scatter, first try "
                                                  "swapping one of the best word's vectors for a vocabulary word "
                                                  f"that lowers the loss (up to {default('word_swaps')} times), "
                                                  f"else go back to the best word and on at {LR_DROP:g}x the "
                                                  f"learning rate ({default('lr_drops')} times), then stop "
                                                  "(0 = never). The "
                                                  "best word so far is what is saved."}),
                "save_every": ("INT", {"default": default("snapshot_every"), "min": 0, "max": 100000,
                                       "tooltip": "Write a snapshot to output/textinv/<name>/ every N steps (0 = "
                                                  "only on cancel and at the end)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Loss weight per pixel (white = learn this): one mask, "
                                            "or one per image."}),
                "resolution": ("INT", {"default": default("resolution"), "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Training size in pixels: 512 for SD1.x, 768 for SD2 768-v, "
                                                  "1024 for SDXL."}),
                "eval_every": ("INT", {"default": default("eval_every"), "min": 1, "max": 100000, "tooltip": "Steps "
                               "between evaluations on fixed noise (the loss that early stop and the best word "
                               "use); before the first, also at its halves (12, 25, 50 for 100)."}),
                "eval_draws": ("INT", {"default": default("eval_draws"), "min": 1, "max": 256, "tooltip": "Fixed "
                               "(image, noise, timestep) draws in the evaluation set: more is a steadier loss, fewer "
                               "is faster."}),
                "preview_every": ("INT", {"default": default("preview_every"), "min": 0, "max": 100000,
                                          "tooltip": "Show a preview image on the node every N steps (0 = none). "
                                                     "Each costs one 20-step sampling."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip": "With templates=captions: one "
                             "caption per image, naming the word as {} or <name>."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing embedding file of "
                              "this name (otherwise the node refuses)."}),
                "memory": (["auto", "fast", "low"], {"default": default("memory"), "tooltip": "fast: keep every "
                           "activation for the backward pass (most memory, fastest). low: recompute them block by "
                           "block (about a third more time per step, a fraction of the memory: SD1.5 at 512 and "
                           "SDXL at 1024 on 8-12 GB cards). auto: low only when a fast step would not fit the "
                           "free memory ComfyUI reports; the choice is shown on the node."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, name, init_word, vectors, steps, learning_rate, batch_size,
              templates, seed, early_stop, save_every, mask=None, resolution=None, eval_every=None,
              eval_draws=None, preview_every=None, captions="", overwrite=False, memory=None, unique_id=None):
        from pathlib import Path

        import comfy.model_management as mm
        import folder_paths
        import torch

        from ..textinv_core.config import TrainConfig
        from ..textinv_core.embedding_file import save_embedding, validate_name
        from ..textinv_core.hosts.comfy import ComfyHost, with_words
        from ..textinv_core.inputs import NODE_LABELS, check_output_file, check_training
        from ..textinv_core.metadata import training_metadata
        from ..textinv_core.plots import loss_curve_image
        from ..textinv_core.trainer import Trainer

        name = validate_name(name)
        target = embeddings_folder() / f"{name}.safetensors"
        check_output_file(target, overwrite, name, NODE_LABELS)  # first: the one mistake that costs a trained word
        caption_list = [c.strip() for c in captions.splitlines() if c.strip()] if templates == "captions" else None
        optional = {"resolution": resolution, "eval_every": eval_every, "eval_draws": eval_draws,
                    "preview_every": preview_every, "memory": memory}
        config = TrainConfig(
            name=name, init_word=init_word, num_vectors=vectors, steps=steps, learning_rate=learning_rate,
            batch_size=batch_size, templates=templates, captions=caption_list, seed=seed,
            early_stop_patience=early_stop, snapshot_every=save_every,
            **{k: v for k, v in optional.items() if v is not None},
        )
        snapshot_dir = Path(folder_paths.get_output_directory()) / "textinv" / name
        # Images, masks, settings, the embeddings folder and the snapshot folder, before any model work.
        check_training(config, images, output=target, overwrite=overwrite, snapshot_dir=snapshot_dir, masks=mask,
                       labels=NODE_LABELS)
        with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae) as host:
            observer = _NodeObserver(config.steps, unique_id)
            trainer = Trainer(host, images, config, masks=mask, observer=observer, snapshot_dir=snapshot_dir)
            observer.on_memory(f"start word '{trainer.init_word}'; {trainer.memory.summary()}")
            result = trainer.run()
            if result.stopped_reason != "cancelled" and result.snapshot_path is None:
                trainer.snapshot()
        if result.stopped_reason == "cancelled":
            log.info("textinv: training of '%s' cancelled at step %d; snapshot kept at %s", name,
                     result.steps_run, result.snapshot_path)
            mm.throw_exception_if_processing_interrupted()  # clears the Interrupt flag and raises
            raise mm.InterruptProcessingException()
        metadata = training_metadata(host.family, config, result)
        saved = save_embedding(target, result.vectors, name, metadata=metadata, overwrite=overwrite)
        log.info("textinv: saved %s (eval loss %.4f -> %.4f, %s after %d steps)", saved, result.init_eval_loss,
                 result.best_eval_loss, result.stopped_reason, result.steps_run)
        word = PseudoWord(name=name, vectors=result.vectors, family=host.family, path=str(saved), metadata=metadata)
        new_clip = with_words(clip, {word.placeholder: word.vectors})
        curve = image_tensor(loss_curve_image(result.train_losses, result.eval_losses, title=f"<{name}> loss"))
        summary = (f"saved {saved.name}: eval loss {result.init_eval_loss:.4f} at '{result.init_word}' -> "
                   f"{result.best_eval_loss:.4f} "
                   f"(best at step {result.best_step}, {result.stopped_reason} after {result.steps_run} steps)")
        return {
            "ui": {"text": [summary, result.memory], "textinv": [{"name": name, "file": saved.name,
                                                   "init_eval_loss": result.init_eval_loss,
                                                   "best_eval_loss": result.best_eval_loss,
                                                   "eval_losses": [list(e) for e in result.eval_losses],
                                                   "steps_run": result.steps_run}]},
            "result": (new_clip, word, curve),
        }
