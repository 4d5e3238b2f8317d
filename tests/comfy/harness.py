"""Test harness for a real, headless ComfyUI: install the pack, build checkpoints, start, talk HTTP.

- ComfyUI is found only through the COMFYUI_PATH environment variable (a checkout of 0.3.64).
- The pack is installed the way users install it, into a custom_nodes folder, but under a folder
  name that differs from the repository's (`textinv-pack`), via `--extra-model-paths-config`, so
  the pack's relative imports are proven. A harness-only probe pack (tests/comfy/probe_pack) sits
  next to it: it saves CONDITIONING tensors to files so tests can compare them.
- Tiny random SD1.5 / SD2-v / SDXL checkpoints are built at test time by build_checkpoints.py into
  $TEXTINV_TEST_CACHE (default ~/.cache/textinv-test) and reused; they are never committed.
- The server subprocess gets tests/comfy/stand_in on its PYTHONPATH (a torchvision stand-in, see
  its docstring); the pytest process never imports ComfyUI, torchvision or the stand-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAND_IN = HERE / "stand_in"
PROBE_PACK = HERE / "probe_pack"
PACK_FOLDER = "textinv-pack"
FAMILIES = ("sd15", "sd2v", "sdxl")
CHECKPOINT_VERSION = 2  # = build_checkpoints.VERSION (not imported: that module is for ComfyUI's process)


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value) if value else None


def cache_dir() -> Path:
    path = Path(os.environ.get("TEXTINV_TEST_CACHE") or Path.home() / ".cache" / "textinv-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STAND_IN)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def build_checkpoint(family: str) -> Path:
    """The cached tiny checkpoint of one layout, built on first use (SD1.5 ~5 s, SDXL ~30 s)."""
    comfy = comfyui_path()
    path = cache_dir() / f"textinv-tiny-{family}-v{CHECKPOINT_VERSION}.safetensors"
    if not path.exists():
        cmd = ["nice", "-n", "10", sys.executable, str(HERE / "build_checkpoints.py"), str(path), family]
        done = subprocess.run(cmd, cwd=comfy, env=server_env(), capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not path.exists():
            output = done.stdout[-3000:] + "\n" + done.stderr[-3000:]
            raise RuntimeError(f"Building the {family} checkpoint failed:\n{output}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """One headless ComfyUI on 127.0.0.1 with the pack installed; HTTP and websocket helpers."""

    def __init__(self, root: Path, checkpoints: dict[str, Path]):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = root / "base"
        self.nodes_dir = root / "pack_nodes"
        for sub in ("custom_nodes", "models/embeddings", "models/checkpoints", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no template dialog in the browser
        link = self.nodes_dir / PACK_FOLDER
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        probe = self.nodes_dir / "textinv_test_probe"
        if not probe.exists():
            probe.symlink_to(PROBE_PACK, target_is_directory=True)
        ckpt_dir = root / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        for family, path in checkpoints.items():
            target = ckpt_dir / f"tiny-{family}.safetensors"
            if not target.exists():
                target.symlink_to(path)
        self.embeddings = self.base / "models" / "embeddings"
        self.output = self.base / "output"
        self.input = self.base / "input"
        self.config = root / "extra_model_paths.yaml"
        self.config.write_text(
            "textinv_test:\n"
            f"    base_path: {root}\n"
            f"    checkpoints: {ckpt_dir}\n"
            f"    custom_nodes: {self.nodes_dir}\n"
        )
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._ws_thread: threading.Thread | None = None
        self._ws_stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        comfy = comfyui_path()
        cmd = ["nice", "-n", "10", sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", str(self.base), "--extra-model-paths-config", str(self.config),
               "--disable-auto-launch"]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=comfy, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            raise RuntimeError(f"ComfyUI did not answer /system_stats in {timeout} s:\n{self.log()[-4000:]}")
        self._ws_thread = threading.Thread(target=self._listen, daemon=True)
        self._ws_thread.start()

    def stop(self) -> None:
        self._ws_stop.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        try:
            return json.loads(body)
        except ValueError:
            return body

    def post(self, path: str, data: dict | None = None, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
            raise RuntimeError(f"POST {path} -> {error.code}: {body.decode(errors='replace')[:4000]}") from None
        return json.loads(body) if body else None

    def queue(self, graph: dict) -> str:
        answer = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry["status"]["completed"]:
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"Prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def run(self, graph: dict, timeout: float = 600.0) -> dict:
        entry = self.wait(self.queue(graph), timeout)
        if entry["status"].get("status_str") != "success":
            raise AssertionError(f"Prompt failed: {json.dumps(entry['status'])[:4000]}\n{self.log()[-3000:]}")
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt")

    # -- websocket (events the browser gets) --------------------------------------------------
    def _listen(self) -> None:
        async def main():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}") as ws:
                    while not self._ws_stop.is_set():
                        try:
                            message = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(message.data))
                        elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return

        try:
            asyncio.run(main())
        except Exception as error:  # the tests that need events will say so
            self.messages.append({"type": "harness.ws_error", "data": {"error": repr(error)}})

    def events(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]


def error_message(entry: dict) -> str:
    """The execution_error text the UI shows for a failed prompt."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def write_training_images(folder: Path, count: int = 4, size: int = 64, seed: int = 0) -> None:
    """A few images of one 'concept': a red disc on varied backgrounds."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(40, 220, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        r = size // 4 + int(rng.integers(-4, 5))
        cx, cy = size // 2 + int(rng.integers(-6, 7)), size // 2 + int(rng.integers(-6, 7))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30))
        image.save(folder / f"disc-{i}.png")


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
