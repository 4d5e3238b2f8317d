"""textinv in the Automatic1111 family (A1111, Forge, reForge): the "textinv" tab and the HTTP route.

The web UI imports every .py in this folder at start-up; this one only registers callbacks, so
start-up stays cheap and nothing of textinv's engine loads until a word is trained. The engine
(`textinv_core`, beside this folder) is loaded by path as a package of its own name: the pack's
root never goes on sys.path (it holds folders such as `nodes` and `tests` that must not shadow
anything), and the pack's folder may have any name.

Routes (added in on_app_started, so they exist with --nowebui too; each training takes the web UI's
queue lock, as txt2img does):
  POST /textinv/v1/train   JSON: name, images (base64) or folder, and any TrainConfig field
  GET  /textinv/v1/status  the running or last job: step, losses, evaluations, preview, result
  POST /textinv/v1/load    JSON: path: check a word file against the loaded model and register it
Interrupt: the web UI's own (the Interrupt button, POST /sdapi/v1/interrupt).
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


script_callbacks.on_app_started(on_app_started)
