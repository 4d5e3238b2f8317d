"""Test harness for real, headless Automatic1111-family web UIs: install the pack, build checkpoints,
start offline on CPU, talk HTTP.

- Each web UI is found only through an environment variable naming its folder: WEBUI_A1111_PATH
  (A1111 1.8, commit c8a5322), WEBUI_FORGE_PATH, WEBUI_REFORGE_PATH. Its Python is
  `<folder>/venv/bin/python` unless WEBUI_<UI>_PYTHON names another. Its `repositories/` must hold
  what its launcher would have cloned (docs/WEBUI.md).
- The pack is installed the way users install it, as a folder in `<data-dir>/extensions/`, under a
  folder name that differs from the repository's (`textinv-pack`), and `install.py` is run exactly
  as the web UI's launcher runs it (the web UI's Python, cwd = the web UI, PYTHONPATH = the web UI).
  Every run gets its own `--data-dir`, so the web UI's folder is never written.
- Tiny random SD1.5 / SDXL checkpoints (with A1111's side-car yaml) are built at test time by
  build_checkpoints.py into $TEXTINV_TEST_CACHE/webui and reused; never committed.
- Offline: a Hugging Face cache holding the CLIP-L config and tokenizer (from the pack's own
  tokenizer files) is made in the cache folder; HF_HUB_OFFLINE is set.
- The server subprocesses get tests/webui/stand_in on their PYTHONPATH (a torchvision stand-in, see
  its docstring); the pytest process never imports a web UI, torchvision or the stand-in.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAND_IN = HERE / "stand_in"
PACK_FOLDER = "textinv-pack"
UIS = {"a1111": "WEBUI_A1111_PATH", "forge": "WEBUI_FORGE_PATH", "reforge": "WEBUI_REFORGE_PATH"}
FAMILIES = ("sd15", "sdxl")
CHECKPOINT_VERSION = 1  # = build_checkpoints.VERSION (not imported: that module is for a web UI's Python)
# Packages whose versions the web UIs pin and the pack must never move.
WATCHED = ("torch", "transformers", "pillow", "numpy", "safetensors", "gradio", "diffusers", "huggingface-hub",
           "tokenizers", "accelerate", "open-clip-torch", "protobuf", "fastapi", "pydantic")
CLIP_L_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "hidden_act": "quick_gelu", "projection_dim": 768},
}


def webui_path(ui: str) -> Path | None:
    value = os.environ.get(UIS[ui])
    return Path(value) if value else None


def webui_python(ui: str, path: Path) -> Path:
    value = os.environ.get(f"WEBUI_{ui.upper()}_PYTHON")
    return Path(value) if value else path / "venv" / "bin" / "python"


def cache_dir() -> Path:
    path = Path(os.environ.get("TEXTINV_TEST_CACHE") or Path.home() / ".cache" / "textinv-test") / "webui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def server_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STAND_IN)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({"PYTHONUNBUFFERED": "1", "HF_HOME": str(hf_home()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False", "CUDA_VISIBLE_DEVICES": ""})
    env.pop("VIRTUAL_ENV", None)
    env.update(extra or {})
    return env


def hf_home() -> Path:
    """A Hugging Face cache with openai/clip-vit-large-patch14's config and tokenizer (no weights).

    The tokenizer files are the pack's own (textinv_core/assets/clip_tokenizer, rebuilt from OpenAI's
    released BPE table), so nothing is downloaded; ldm/sgm's FrozenCLIPEmbedder reads these.
    """
    home = cache_dir() / "hf"
    snapshot = home / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "textinv-offline"
    if not (snapshot / "config.json").exists():
        snapshot.mkdir(parents=True, exist_ok=True)
        assets = REPO / "textinv_core" / "assets" / "clip_tokenizer"
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(assets / name, snapshot / name)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}
        (snapshot / "special_tokens_map.json").write_text(json.dumps(special))
        (snapshot / "tokenizer_config.json").write_text(json.dumps(
            dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")))
        (snapshot / "config.json").write_text(json.dumps(CLIP_L_CONFIG))
        refs = snapshot.parent.parent / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text("textinv-offline")
    return home


def repositories_for_building() -> tuple[Path, Path] | None:
    """(python, repositories) of a web UI that has ldm and sgm (A1111 or reForge; Forge has neither)."""
    for ui in ("a1111", "reforge"):
        path = webui_path(ui)
        if path and (path / "repositories" / "generative-models").is_dir():
            return webui_python(ui, path), path / "repositories"
    return None


def build_checkpoint(family: str) -> Path:
    """The cached tiny checkpoint (and its side-car yaml), built on first use (SD1.5 ~20 s, SDXL ~60 s)."""
    path = cache_dir() / f"textinv-webui-tiny-{family}-v{CHECKPOINT_VERSION}.safetensors"
    if not path.exists():
        found = repositories_for_building()
        if found is None:
            raise RuntimeError("Building the tiny checkpoints needs ldm and sgm: set WEBUI_A1111_PATH or "
                               "WEBUI_REFORGE_PATH too (or copy built files into $TEXTINV_TEST_CACHE/webui).")
        python, repositories = found
        cmd = ["nice", "-n", "10", str(python), str(HERE / "build_checkpoints.py"), str(repositories), str(path),
               family]
        done = subprocess.run(cmd, cwd=repositories.parent, env=server_env(), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0 or not path.exists():
            output = done.stdout[-3000:] + "\n" + done.stderr[-3000:]
            raise RuntimeError(f"Building the {family} checkpoint failed:\n{output}")
    return path


def install_pack(target: Path) -> Path:
    """A copy of the checkout's files (tracked and new, not ignored) as a user's extension folder.

    A copy, not a link: A1111 reads an extension's git remote and reports an error for a checkout
    without one, which a user's clone always has.
    """
    if target.exists():
        shutil.rmtree(target)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned_versions(python: Path, webui: Path) -> dict[str, str]:
    """Installed versions of the packages the web UIs pin, read with the web UI's own Python."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for name in sys.argv[1:]:\n"
            "    try: out[name] = m.version(name)\n"
            "    except m.PackageNotFoundError: out[name] = None\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([str(python), "-c", code, *WATCHED], cwd=webui, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_installer(python: Path, webui: Path, pack: Path) -> subprocess.CompletedProcess:
    """install.py exactly as A1111's launch_utils.run_extension_installer runs it."""
    env = server_env({"PYTHONPATH": f"{webui}{os.pathsep}{STAND_IN}"})
    return subprocess.run([str(python), str(pack / "install.py")], cwd=webui, env=env, capture_output=True, text=True,
                          timeout=600)


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def training_images(count: int = 3, size: int = 64) -> list:
    """Small synthetic photos: a coloured disc on a plain background, a little shifted each time."""
    from PIL import Image, ImageDraw

    images = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (40 + 20 * i, 90, 160))
        draw = ImageDraw.Draw(image)
        r = size // 4
        cx, cy = size // 2 + 3 * (i - 1), size // 2 - 2 * (i - 1)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(230, 200, 40))
        images.append(image)
    return images


class WebUIServer:
    """One headless web UI on 127.0.0.1 with the pack installed as an extension; HTTP helpers."""

    def __init__(self, ui: str, webui: Path, root: Path, checkpoint: Path, browser: bool = False,
                 others: tuple[Path, ...] = ()):
        self.ui, self.webui, self.root, self.browser = ui, webui, root, browser
        self.python = webui_python(ui, webui)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = root / "data"
        self.extensions = self.data / "extensions"
        self.embeddings = root / "embeddings"
        self.ckpt_dir = root / "checkpoints"
        for folder in (self.extensions, self.embeddings, self.ckpt_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.pack = install_pack(self.extensions / PACK_FOLDER)
        settings = self.data / "config.json"
        if not settings.exists():
            # "Approx NN" live previews would download an SDXL approximation model; the cheap one is built in.
            settings.write_text(json.dumps({"show_progress_type": "Approx cheap", "show_progress_every_n_steps": 1}))
        self.checkpoint = self.link_checkpoint(checkpoint)
        for other in others:
            self.link_checkpoint(other)
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def link_name(checkpoint: Path) -> str:
        return f"tiny-{checkpoint.name.split('-tiny-')[1].split('-')[0]}.safetensors"

    def link_checkpoint(self, checkpoint: Path) -> Path:
        target = self.ckpt_dir / self.link_name(checkpoint)
        for src, dst in ((checkpoint, target), (checkpoint.with_suffix(".yaml"), target.with_suffix(".yaml"))):
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
        return target

    def command(self) -> list[str]:
        cmd = [str(self.python), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
               "--no-download-sd-model", "--port", str(self.port), "--data-dir", str(self.data), "--ckpt",
               str(self.checkpoint), "--ckpt-dir", str(self.ckpt_dir), "--embeddings-dir", str(self.embeddings),
               "--api"]
        # With --data-dir elsewhere, Gradio 4 (Forge) only serves files under the data dir: the web UI's own
        # javascript/ would be refused (403), so its folder is allowed explicitly.
        cmd += ["--gradio-allowed-path", str(self.webui)] if self.browser else ["--nowebui"]
        if self.ui == "a1111":
            cmd += ["--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full"]
        else:
            cmd += ["--always-cpu", "--all-in-fp32"]
        return cmd

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> None:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(["nice", "-n", "10", *self.command()], cwd=self.webui, env=server_env(),
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.ui} exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            try:
                # 404 until on_app_started has run (the Gradio front end answers before it)
                if self.request("GET", "/textinv/v1/status", timeout=5)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.ui} did not answer /textinv/v1/status in {timeout} s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 900.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, {"detail": text.decode(errors="replace")}

    def get(self, path: str, timeout: float = 60.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def post(self, path: str, body: dict, timeout: float = 900.0):
        return self.request("POST", path, body, timeout=timeout)

    def txt2img(self, prompt: str, seed: int = 7, steps: int = 4, size: int = 64) -> bytes:
        """PNG pixels (decoded to raw RGB bytes) of one txt2img through the web UI's own API."""
        from PIL import Image

        status, body = self.post("/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": seed, "steps": steps, "width": size, "height": size,
            "cfg_scale": 5.0, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, "send_images": True,
            "save_images": False})
        if status != 200:
            raise RuntimeError(f"txt2img failed: {status} {body}")
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0].split(",", 1)[-1]))).convert("RGB")
        return image.tobytes()

    def switch_checkpoint(self, checkpoint: Path) -> None:
        """Select a checkpoint the way the settings page does. The web UI's list is refreshed only for a
        file it has not seen: a refresh sets the selection back to the --ckpt file (A1111's list_models),
        and Forge, which loads lazily, would not notice that change."""
        new = not (self.ckpt_dir / self.link_name(checkpoint)).exists()
        target = self.link_checkpoint(checkpoint)
        if new:
            self.post("/sdapi/v1/refresh-checkpoints", {})
        status, body = self.post("/sdapi/v1/options", {"sd_model_checkpoint": target.name})
        if status != 200:
            raise RuntimeError(f"switching to {target.name} failed: {status} {body}")
