"""textinv in the Automatic1111 family (A1111, Forge, reForge): the "textinv" tab and the HTTP route.

The web UI imports every .py in this folder at start-up; this one only registers callbacks, so
start-up stays cheap and nothing of textinv's engine loads until a word is trained (on a
checkpoint load, the small web-UI service checks for reForge, see on_model_loaded). The engine
(`textinv_core`, beside this folder) is loaded by path as a package of its own name: the pack's
root never goes on sys.path (it holds folders such as `nodes` and `tests` that must not shadow
anything), and the pack's folder may have any name.

Routes (added in on_app_started, so they exist with --nowebui too; each training takes the web UI's
queue lock, as txt2img does):
  POST /textinv/v1/train   JSON: name, images (base64) or folder, and any TrainConfig field
  GET  /textinv/v1/status  the running or last job: step, losses, evaluations, preview, result
  POST /textinv/v1/load    JSON: path: check a word file against the loaded model and register it
Interrupt: the web UI's own (the Interrupt button, POST /sdapi/v1/interrupt).

The tab: images (a folder or uploads), name, init word, vectors, steps and the other settings with
TrainConfig's own defaults; Train runs through the web UI's job machinery (wrap_gradio_gpu_call:
its queue lock, its progress bar and live preview), Interrupt is the web UI's own interrupt, and
javascript/textinv.js draws the loss chart and the latest preview from /textinv/v1/status.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from modules import script_callbacks

PACK = Path(__file__).resolve().parent.parent
log = logging.getLogger("textinv")


def engine():
    """The pack's `textinv_core`, imported from the pack's own folder."""
    module = sys.modules.get("textinv_core")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "textinv_core", PACK / "textinv_core" / "__init__.py",
            submodule_search_locations=[str(PACK / "textinv_core")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["textinv_core"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["textinv_core"]
            raise
    return module


def service():
    engine()
    import textinv_core.hosts.webui_service as webui_service

    return webui_service


def _user_errors():
    engine()
    from textinv_core.errors import UserError

    return UserError


def on_app_started(demo, app) -> None:
    from fastapi import Body, HTTPException
    from modules import call_queue

    def train(body: dict = Body(...)):  # noqa: B008 - FastAPI's own idiom
        user_error = _user_errors()
        with call_queue.queue_lock:
            try:
                return service().train_request(body)
            except user_error as error:
                raise HTTPException(status_code=400, detail=str(error)) from None

    def status():
        return service().status()

    def load(body: dict = Body(...)):  # noqa: B008
        user_error = _user_errors()
        with call_queue.queue_lock:
            try:
                return service().load_word(str(body.get("path") or ""), bool(body.get("overwrite")))
            except user_error as error:
                raise HTTPException(status_code=400, detail=str(error)) from None

    app.add_api_route("/textinv/v1/train", train, methods=["POST"])
    app.add_api_route("/textinv/v1/status", status, methods=["GET"])
    app.add_api_route("/textinv/v1/load", load, methods=["POST"])


def _tab_train(id_task, name, init_word, num_vectors, steps, folder, uploads, templates, resolution, learning_rate,
               batch_size, seed, preview_every, overwrite):
    """The tab's Train button: the same job as the route, inside the web UI's own job wrapper."""
    import html

    from modules import shared

    user_error = _user_errors()
    request = {"name": (name or "").strip(), "init_word": init_word, "num_vectors": int(num_vectors),
               "steps": int(steps), "templates": templates, "resolution": int(resolution),
               "learning_rate": float(learning_rate), "batch_size": int(batch_size), "seed": int(seed),
               "preview_every": int(preview_every), "overwrite": bool(overwrite)}
    files = [getattr(f, "name", f) for f in (uploads or [])]
    if files:
        import base64

        request["images"] = [base64.b64encode(Path(f).read_bytes()).decode() for f in files]
    else:
        request["folder"] = (folder or "").strip()
    try:
        result = service().train_request(request, manage_state=False)
    except user_error as error:
        return "", f"<div class='error'>{html.escape(str(error))}</div>"
    finally:
        shared.state.textinfo = ""
    if result["path"] is None:
        done = (f"Interrupted at step {result['steps_run']}: nothing written to the embeddings folder; "
                f"the last snapshot is {html.escape(str(result['snapshot']))}.")
    else:
        done = (f"Trained <b>{html.escape(result['name'])}</b> ({result['family']}, {result['steps_run']} steps, "
                f"{result['stopped_reason']}): evaluation loss {result['init_eval_loss']:.4f} &rarr; "
                f"{result['best_eval_loss']:.4f}. Saved to {html.escape(result['path'])}; type "
                f"<code>{html.escape(result['name'])}</code> in a prompt.")
    return "", f"<div class='textinv-done'>{done}</div>"


def on_ui_tabs():
    import gradio as gr
    from modules import call_queue, shared

    engine()
    from textinv_core.config import default

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(elem_id="textinv_settings"):
                name = gr.Textbox(label="Name (the word you will type)", placeholder="my-cat", elem_id="textinv_name")
                init_word = gr.Textbox(label="Init word (what it is, coarsely; empty: textinv finds one)",
                                       value=default("init_word"), elem_id="textinv_init_word")
                with gr.Row():
                    num_vectors = gr.Number(label="Vectors", value=default("num_vectors"), precision=0)
                    steps = gr.Number(label="Steps", value=default("steps"), precision=0, elem_id="textinv_steps")
                    templates = gr.Dropdown(label="Prompts", choices=["object", "style", "captions"],
                                            value=default("templates"))
                folder = gr.Textbox(label="Image folder (or upload below; captions: <image>.txt beside each)",
                                    elem_id="textinv_folder")
                uploads = gr.File(label="Images", file_count="multiple", file_types=["image"])
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        resolution = gr.Number(label="Resolution", value=default("resolution"), precision=0,
                                               elem_id="textinv_resolution")
                        learning_rate = gr.Number(label="Learning rate (per step)",
                                                  value=default("learning_rate"))
                        batch_size = gr.Number(label="Batch size", value=default("batch_size"), precision=0)
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=default("seed"), precision=0)
                        preview_every = gr.Number(label="Preview every (steps, 0 = off)",
                                                  value=default("preview_every"), precision=0,
                                                  elem_id="textinv_preview_every")
                        overwrite = gr.Checkbox(label="Replace an existing word of that name", value=False)
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id="textinv_interrupt")
                    train = gr.Button("Train", variant="primary", elem_id="textinv_train")
            with gr.Column(elem_id="textinv_output_column"):
                gr.HTML(elem_id="textinv_progress")
                gr.HTML("<div id='textinv_chart'></div>")
                gr.Gallery(label="Preview", show_label=False, elem_id="textinv_gallery")
                output = gr.HTML(elem_id="textinv_output")
                outcome = gr.HTML(elem_id="textinv_outcome")
        dummy = gr.Textbox(visible=False)  # carries the task id (a Label breaks under Gradio 4)
        inputs = [dummy, name, init_word, num_vectors, steps, folder, uploads, templates, resolution, learning_rate,
                  batch_size, seed, preview_every, overwrite]
        handler = call_queue.wrap_gradio_gpu_call(_tab_train, extra_outputs=[""])
        try:
            train.click(fn=handler, _js="textinv_start", inputs=inputs, outputs=[output, outcome])
        except TypeError:  # Gradio 4 (Forge) names it js
            train.click(fn=handler, js="textinv_start", inputs=inputs, outputs=[output, outcome])
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    return [(tab, "textinv", "textinv")]


def on_model_loaded(sd_model) -> None:
    """reForge only: the embeddings reload that A1111 does after loading a checkpoint (see
    webui_service.reload_words_after_model_load). A failure is logged, never raised into the loader."""
    try:
        service().reload_words_after_model_load(sd_model)
    except Exception as error:  # noqa: BLE001 - the web UI's model loading must go on
        log.warning("textinv: could not reload the embeddings for the new checkpoint: %s", error)


script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_model_loaded(on_model_loaded)
