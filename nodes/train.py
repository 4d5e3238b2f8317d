"""Train Embedding: learn a pseudo-word from the images in the graph, on the graph's own models.

The node only wires ComfyUI to the engine: the host adapter (textinv_core/hosts/comfy.py) trains on
clones of the MODEL/CLIP the graph loaded, on the device ComfyUI's model management picks; the
trainer (textinv_core/trainer.py) does the math. Progress goes to the node's bar, the loss to the
browser (`textinv.loss` events, drawn by web/textinv.js) and previews to the node as live images.
Cancel (Interrupt) stops between steps, keeps a snapshot, then ends the prompt as interrupted.
The final word is written to the embeddings folder, so `embedding:name` works in stock ComfyUI.
"""

from __future__ import annotations

import logging

from .common import CATEGORY, EMBEDDING_TYPE, PseudoWord, embeddings_folder, image_tensor

log = logging.getLogger(__name__)


class _NodeObserver:
    """TrainingObserver for one node run: progress bar, loss events, previews, cancel."""

    def __init__(self, host, config, node_id, preview_every: int, preview_prompt: str, trainer_ref: list):
        import comfy.utils

        self.host, self.config, self.node_id = host, config, node_id
        self.preview_every, self.preview_prompt = preview_every, preview_prompt
        self.trainer_ref = trainer_ref
        self.bar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
        self.cancelled = False
        self.snapshots: list[str] = []

    def _send(self, event: str, data: dict) -> None:
        try:
            import server

            instance = server.PromptServer.instance
            instance.send_sync(event, dict(data, node=self.node_id), instance.client_id)
        except Exception:  # no server (e.g. run from a script): nothing to show
            pass

    def _progress(self, step: int, preview=None) -> None:
        import comfy.model_management as mm

        if self.cancelled:
            return
        try:  # ComfyUI's progress hook raises on Interrupt; stop between steps instead
            self.bar.update_absolute(step, self.config.steps, preview)
        except mm.InterruptProcessingException:
            self.cancelled = True

    def on_step(self, step: int, total: int, loss: float) -> None:
        self._send("textinv.loss", {"step": step, "total": total, "loss": loss})
        preview = None
        if self.preview_every and step % self.preview_every == 0 and not self.should_stop():
            preview = self._preview(step)
        self._progress(step, preview)

    def on_eval(self, step: int, eval_loss: float) -> None:
        self._send("textinv.loss", {"step": step, "total": self.config.steps, "eval_loss": eval_loss})

    def on_snapshot(self, step: int, path) -> None:
        self.snapshots.append(str(path))
        self._send("textinv.snapshot", {"step": step, "path": str(path)})

    def should_stop(self) -> bool:
        import comfy.model_management as mm

        if not self.cancelled and mm.processing_interrupted():
            self.cancelled = True
        return self.cancelled

    def _preview(self, step: int):
        import torch

        trainer = self.trainer_ref[0] if self.trainer_ref else None
        if trainer is None:
            return None
        current = trainer.words(step)[self.config.placeholder]
        words = {self.config.placeholder: {k: v.detach() for k, v in current.items()}}
        try:
            with torch.no_grad():
                image = self.host.preview(self.preview_prompt, words, seed=self.config.seed,
                                          steps=20, size=self.config.resolution)
        except Exception as error:  # a preview must never end the training
            log.warning("textinv: preview at step %d failed: %s", step, error)
            return None
        return ("PNG", image, 512)


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
                "init_word": ("STRING", {"default": "object", "tooltip": "A coarse word for the concept "
                                         "('cat', 'toy', 'painting'); the new word starts from its embedding."}),
                "vectors": ("INT", {"default": 1, "min": 1, "max": 75, "tooltip": "Tokens the word uses. The paper "
                                    "finds 1 enough; more can capture more detail but edit less easily."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimisation steps."}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 0.0001,
                                            "tooltip": "Base learning rate (paper: 0.005), multiplied by the "
                                                       "batch size as in the paper."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step."}),
                "templates": (["object", "style", "captions"], {"tooltip": "Prompts the word is trained in: "
                              "object ('a photo of a <w>'), style ('a painting in the style of <w>'), or the "
                              "captions below, one line per image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seed of all training randomness (noise, timesteps, flips); the same "
                                            "seed repeats a run. Kept fixed, so running the graph again does not "
                                            "retrain."}),
                "early_stop": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Stop after this many "
                                       "evaluations without improvement of the evaluation loss (0 = never)."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Write a snapshot to "
                                       "output/textinv/<name>/ every N steps (0 = only on cancel and at the end)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Loss weight per pixel (white = learn this): one mask, "
                                            "or one per image."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Training "
                               "size in pixels: 512 for SD1.x, 768 for SD2 768-v, 1024 for SDXL."}),
                "eval_every": ("INT", {"default": 50, "min": 1, "max": 100000, "tooltip": "Steps between "
                               "evaluations on fixed noise (the loss that early stop and the best word use)."}),
                "eval_draws": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "Fixed (image, noise, "
                               "timestep) draws in the evaluation set: more is a steadier loss, fewer is faster."}),
                "preview_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip": "Show a preview "
                                  "image on the node every N steps (0 = none). Each costs one 20-step sampling."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip": "With templates=captions: one "
                             "caption per image, naming the word as {} or <name>."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing embedding file of "
                              "this name (otherwise the node refuses)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, name, init_word, vectors, steps, learning_rate, batch_size,
              templates, seed, early_stop, save_every, mask=None, resolution=512, eval_every=50,
              eval_draws=16, preview_every=100, captions="", overwrite=False, unique_id=None):
        from pathlib import Path

        import comfy.model_management as mm
        import folder_paths
        import torch

        from ..textinv_core.embedding_file import save_embedding, validate_name
        from ..textinv_core.hosts.comfy import ComfyHost, with_words
        from ..textinv_core.plots import loss_curve_image
        from ..textinv_core.trainer import TrainConfig, Trainer

        name = validate_name(name)
        target = embeddings_folder() / f"{name}.safetensors"
        if target.exists() and not overwrite:
            raise ValueError(f"An embedding named '{name}' already exists ({target}): choose another name, "
                             "or switch on overwrite.")
        caption_list = [c.strip() for c in captions.splitlines() if c.strip()] if templates == "captions" else None
        config = TrainConfig(
            name=name, init_word=init_word, num_vectors=vectors, steps=steps, learning_rate=learning_rate,
            batch_size=batch_size, resolution=resolution, templates=templates, captions=caption_list, seed=seed,
            early_stop_patience=early_stop, snapshot_every=save_every, eval_every=eval_every,
            eval_draws=eval_draws,
        )
        snapshot_dir = Path(folder_paths.get_output_directory()) / "textinv" / name
        preview_prompt = ("a painting in the style of {}" if templates == "style" else "a photo of a {}").format(
            config.placeholder)
        with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae) as host:
            trainer_ref: list = []
            observer = _NodeObserver(host, config, unique_id, preview_every, preview_prompt, trainer_ref)
            trainer = Trainer(host, images, config, masks=mask, observer=observer, snapshot_dir=snapshot_dir)
            trainer_ref.append(trainer)
            result = trainer.run()
            if result.stopped_reason != "cancelled" and result.snapshot_path is None:
                trainer.snapshot()
        if result.stopped_reason == "cancelled":
            log.info("textinv: training of '%s' cancelled at step %d; snapshot kept at %s", name,
                     result.steps_run, result.snapshot_path)
            mm.throw_exception_if_processing_interrupted()  # clears the Interrupt flag and raises
            raise mm.InterruptProcessingException()
        metadata = {
            "textinv.family": host.family, "textinv.steps": str(result.steps_run), "textinv.init": init_word,
            "textinv.templates": templates, "textinv.init_eval_loss": f"{result.init_eval_loss:.6g}",
            "textinv.best_eval_loss": f"{result.best_eval_loss:.6g}", "textinv.stopped": result.stopped_reason,
        }
        saved = save_embedding(target, result.vectors, name, metadata=metadata, overwrite=overwrite)
        log.info("textinv: saved %s (eval loss %.4f -> %.4f, %s after %d steps)", saved, result.init_eval_loss,
                 result.best_eval_loss, result.stopped_reason, result.steps_run)
        word = PseudoWord(name=name, vectors=result.vectors, family=host.family, path=str(saved), metadata=metadata)
        new_clip = with_words(clip, {word.placeholder: word.vectors})
        curve = image_tensor(loss_curve_image(result.train_losses, result.eval_losses, title=f"<{name}> loss"))
        summary = (f"saved {saved.name}: eval loss {result.init_eval_loss:.4f} -> {result.best_eval_loss:.4f} "
                   f"(best at step {result.best_step}, {result.stopped_reason} after {result.steps_run} steps)")
        return {
            "ui": {"text": [summary], "textinv": [{"name": name, "file": saved.name,
                                                   "init_eval_loss": result.init_eval_loss,
                                                   "best_eval_loss": result.best_eval_loss,
                                                   "eval_losses": [list(e) for e in result.eval_losses],
                                                   "steps_run": result.steps_run}]},
            "result": (new_clip, word, curve),
        }
