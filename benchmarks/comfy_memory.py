"""Memory of the ComfyUI host on full-size models: a training step (memory fast / low) against sampling.

What it measures, for SD1.5 or SDXL at a resolution and precision, in a fresh ComfyUI process each:
- weights: bytes of the UNet, text encoders and VAE as ComfyUI loaded them;
- a sampling step (one euler step of ComfyUI's own sampler, classifier-free guidance, as KSampler runs
  it) and the VAE decode of its latent: peak memory and time;
- one training step of the ComfyUI host (text encoder with the word spliced in, UNet, backward to the
  word) with memory `fast` (no recomputation) or `low` (the host's `recompute_blocks` under
  non-reentrant checkpointing): peak memory, time, and the bytes autograd kept for the backward pass
  (a saved-tensor probe outside the host's own hooks; inside recomputed blocks it sees nothing).
Peak memory is the device's (torch.cuda max allocated) on a GPU, peak resident memory (VmHWM, reset per
phase) on CPU, where glibc is told to return freed blocks at once so RSS follows what is live.

The checkpoints are full-size single files in the original (ldm) layout with random bf16 weights,
built once into $TEXTINV_BENCH_CACHE (default ~/.cache/textinv-bench; SD1.5 ~2.1 GB, SDXL ~6.9 GB):
ComfyUI's own classes are built on the meta device to name and shape every tensor, then each tensor is
drawn and streamed to the file alone, so building needs no memory beyond one tensor. They are loaded
through ComfyUI's own loader (comfy.sd.load_checkpoint_guess_config), never shipped, never committed.

Needs a ComfyUI checkout (COMFYUI_PATH) and a Python with its requirements (COMFYUI_PYTHON, default
$COMFYUI_PATH/.venv/bin/python, else this one); the worker runs with the harness's torchvision stand-in
when torchvision cannot be imported (tests/comfy/stand_in).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_memory.py sd15 --resolution 512
    python benchmarks/comfy_memory.py sdxl --resolution 1024 --memory low --compare-copies

`measure(family, resolution, precision, memory)` returns one row as a dict (benchmarks/memory.py).
Never imported by the pack; the worker half runs only inside the ComfyUI process it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAND_IN = REPO / "tests" / "comfy" / "stand_in"
FAMILIES = ("sd15", "sdxl")
PRECISIONS = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
BUILD_VERSION = 1  # part of the cached file name: bump when the weights change
PROMPT = "a photo of a <textinv-bench>"
GIB = 1024 ** 3

# Full UNet configs, as comfy/model_detection.py's unet_config_from_diffusers_unet lists them.
UNETS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32",
                      "torch.int64": "I64", "torch.int32": "I32"}


# -- the parent side: paths, subprocess, table ---------------------------------------------------
def comfyui_path() -> Path:
    value = os.environ.get("COMFYUI_PATH")
    if not value or not (Path(value) / "main.py").is_file():
        raise SystemExit("Set COMFYUI_PATH to a ComfyUI checkout (0.3.64 is tested): see docs/COMFYUI.md.")
    return Path(value)


def comfyui_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = comfyui_path() / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def cache_dir() -> Path:
    path = Path(os.environ.get("TEXTINV_BENCH_CACHE") or Path.home() / ".cache" / "textinv-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_worker(request: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [comfyui_python(), str(Path(__file__).resolve()), "--worker", json.dumps(request)]
    done = subprocess.run(cmd, cwd=comfyui_path(), env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TEXTINV-RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"The ComfyUI worker failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-5000:]}")
    return json.loads(lines[-1][len("TEXTINV-RESULT "):])


def checkpoint(family: str) -> Path:
    """The cached full-size random bf16 checkpoint of `family` in the original layout, built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    path = cache_dir() / f"textinv-bench-{family}-bf16-v{BUILD_VERSION}.safetensors"
    if not path.exists():
        _run_worker({"task": "build", "family": family, "path": str(path)}, timeout=3600)
    return path


def measure(family: str, resolution: int, precision: str, memory: str, *, by_reference: bool = True,
            device: str | None = None, vram_flag: str | None = None, decode: bool = True) -> dict:
    """One training step (memory 'fast' or 'low') and one sampling step of the ComfyUI host, in a fresh
    ComfyUI process. Bytes and seconds; `*_peak` are peaks of the device's memory (RSS on CPU).

    by_reference=False keeps ComfyUI's weight copies for backward, as the host did before issue 10
    (which also computed weight gradients; those are gone in both routes now);
    device 'cpu' adds --cpu (None: ComfyUI's own choice); vram_flag e.g. '--lowvram' is passed through.
    """
    if memory not in ("fast", "low"):
        raise ValueError("memory must be 'fast' or 'low' (the engine resolves 'auto' to one of them)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    request = {"task": "measure", "family": family, "resolution": int(resolution), "precision": precision,
               "memory": memory, "by_reference": by_reference, "device": device, "vram_flag": vram_flag,
               "decode": decode, "path": str(checkpoint(family)), "repo": str(REPO)}
    return _run_worker(request, timeout=6 * 3600)


def _gb(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def print_table(rows: list[dict]) -> None:
    head = ("family", "res", "prec", "memory", "route", "device", "weights", "load pk", "sample pk", "decode pk",
            "train pk", "train/sample", "process pk", "saved", "sample s", "train s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        sampling = max(r["sample_peak"], r.get("decode_peak") or 0)
        print(" | ".join(str(x) for x in (
            r["family"], r["resolution"], r["precision"], r["memory"], "by reference" if r["by_reference"] else
            "copies", r["device"], _gb(r["weights_bytes"]), _gb(r["load_peak"]), _gb(r["sample_peak"]),
            _gb(r.get("decode_peak")), _gb(r["train_peak"]), f"{r['train_peak'] / sampling:.2f}",
            _gb(r["process_peak"]), _gb(r["saved_bytes"]), f"{r['sample_seconds']:.1f}",
            f"{r['train_seconds']:.1f}")))
    print("GB = GiB. pk = peak (GPU: max allocated; CPU: peak RSS of the phase). train/sample = training-step "
          "peak over the larger of the sampling-step and decode peaks. saved = bytes autograd kept for backward "
          "outside recomputed blocks.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=["sd15"], choices=FAMILIES)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--memory", nargs="+", default=["fast", "low"], choices=["fast", "low"])
    parser.add_argument("--compare-copies", action="store_true",
                        help="also measure the route before issue 10 (autograd keeps weight copies)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--vram-flag", default=None, help="a ComfyUI VRAM flag, e.g. --lowvram")
    parser.add_argument("--no-decode", action="store_true", help="skip the VAE decode")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for family in args.families:
        resolution = args.resolution or (1024 if family == "sdxl" else 512)
        for memory in args.memory:
            for by_reference in ((True, False) if args.compare_copies else (True,)):
                row = measure(family, resolution, args.precision, memory, by_reference=by_reference,
                              device=args.device, vram_flag=args.vram_flag, decode=not args.no_decode)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:  # row by row, so a run cut short keeps what it measured
                    args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


# -- the worker side: runs inside ComfyUI's process ----------------------------------------------
def _start_comfy(flags: list[str]):
    sys.argv = [sys.argv[0], *flags]
    sys.path.insert(0, os.getcwd())  # cwd = the ComfyUI checkout
    try:
        import torchvision  # noqa: F401
    except Exception:  # the registry's torchvision needs a CUDA torch: use the harness's stand-in
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(STAND_IN))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (parses the flags)


def _init_value(name: str, shape: tuple, generator, dtype):
    """Seeded random weights by name: fan-in scaled matrices, unit norms, small biases and embeddings."""
    import torch

    lname = name.lower()
    if len(shape) == 0 or "logit_scale" in lname:
        return torch.full(shape, 4.6 if "logit_scale" in lname else 0.0, dtype=dtype)
    if "embedding" in lname and len(shape) == 2:
        return (torch.randn(shape, generator=generator) * (0.01 if "position" in lname else 0.02)).to(dtype)
    if len(shape) >= 2:
        return (torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))).to(dtype)
    norm = any(s in lname for s in ("norm", "ln_", "in_layers.0.", "out_layers.0.", ".out.0.")) or \
        lname.startswith("model.diffusion_model.out.0.")
    if norm and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _build(family: str, out_path: str) -> dict:
    """Stream a full-size random checkpoint of `family` to `out_path` (one tensor in memory at a time)."""
    _start_comfy(["--cpu"])
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.supported_models as supported
    import torch

    meta = torch.device("meta")
    config_class = {"sd15": supported.SD15, "sdxl": supported.SDXL}[family]
    model_config = config_class(dict(UNETS[family], dtype=torch.bfloat16))
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, "model.diffusion_model.", device=meta)
    clip = comfy.sd.CLIP(model_config.clip_target({}), model_options={"dtype": torch.bfloat16, "initial_device": meta})
    with meta:
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    sd = model.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    header, offset = {}, 0
    for key in sorted(sd):
        tensor = sd[key]
        dtype = torch.bfloat16 if tensor.is_floating_point() else tensor.dtype
        size = math.prod(tensor.shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"textinv.bench": f"full-size random {family}, bf16, not a real model"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for key in sorted(sd):
            template = sd[key]
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            if template.is_floating_point():
                value = _init_value(key, tuple(template.shape), generator, torch.bfloat16)
            else:
                value = torch.arange(math.prod(template.shape), dtype=template.dtype).reshape(template.shape)
            handle.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, out_path)
    return {"path": out_path, "bytes": os.path.getsize(out_path), "tensors": len(sd)}


def _phase_peak(device):
    """benchmarks/peak.PhasePeak, plus where each phase started and the process's own peak."""
    sys.path.insert(0, str(HERE))
    from peak import PhasePeak

    class Peak(PhasePeak):
        def start(self) -> None:
            import gc

            gc.collect()
            self.started_at = self.torch.cuda.memory_allocated(self.device) if self.cuda else self.rss()
            super().start()

        def process_rss_peak(self) -> int:
            return self.hwm()

    return Peak(device)


def _measure(req: dict) -> dict:
    flags = ["--" + PRECISIONS[req["precision"]] + s for s in ("-unet", "-text-enc", "-vae")]
    if req["device"] == "cpu":
        flags.insert(0, "--cpu")
    if req["vram_flag"]:
        flags.extend(req["vram_flag"].split())
    _start_comfy(flags)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import torch

    sys.path.append(req["repo"])  # textinv_core only: the repository root would shadow ComfyUI's `nodes`
    from textinv_core.hosts.comfy import ComfyHost

    device = mm.get_torch_device()
    peak = _phase_peak(device)
    phases: dict[str, int] = {}
    out = {k: req[k] for k in ("family", "resolution", "precision", "memory", "by_reference")}
    out["device"] = str(device) + (f" {req['vram_flag']}" if req["vram_flag"] else "")
    out["vram_state"] = mm.vram_state.name

    peak.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(req["path"], output_vae=True, output_clip=True)
    out["load_seconds"] = time.perf_counter() - t0
    phases["load"] = peak.peak()
    base = {"load": peak.started_at}

    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    out["weights_bytes"] = nbytes(model.model) + nbytes(clip.cond_stage_model) + nbytes(vae.first_stage_model)
    out["weights"] = {"unet": nbytes(model.model), "text": nbytes(clip.cond_stage_model),
                      "vae": nbytes(vae.first_stage_model)}
    out["unet_dtype"] = str(model.model.get_dtype())
    out["compute_dtype"] = str(model.model.manual_cast_dtype or model.model.get_dtype())
    side = req["resolution"] // 8

    # One sampling step as KSampler runs it (inference mode, CFG 5: cond and uncond in one batch).
    with torch.inference_mode():
        peak.start()
        t0 = time.perf_counter()
        conds = []
        for text in ("a photo of a cat", ""):
            encoded = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
            cond = encoded.pop("cond")
            if req["family"] == "sdxl":
                size = req["resolution"]
                encoded.update(width=size, height=size, target_width=size, target_height=size)
            conds.append([[cond, encoded]])
        latent = torch.zeros(1, 4, side, side)
        noise = comfy.sample.prepare_noise(latent, 0)
        samples = comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", conds[0], conds[1], latent,
                                      seed=0, disable_pbar=True)
        out["sample_seconds"] = time.perf_counter() - t0
        phases["sample"] = peak.peak()
        base["sample"] = peak.started_at
        if req["decode"]:
            peak.start()
            t0 = time.perf_counter()
            vae.decode(samples)
            out["decode_seconds"] = time.perf_counter() - t0
            phases["decode"] = peak.peak()
            base["decode"] = peak.started_at
    del samples, noise, conds

    # One training step of the host, as Train Embedding runs it.
    with torch.inference_mode(False), torch.enable_grad():
        peak.start()
        host = ComfyHost(model, clip, vae)
        if not req["by_reference"]:
            host.by_reference.active = contextlib.nullcontext  # the route before issue 10
        out["free_memory"] = host.free_memory()
        phases["host"] = peak.peak()
        words = {k: v.mean(0, keepdim=True).clone().requires_grad_(True) for k, v in host.word_vectors("cat").items()}
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, side, side, generator=generator) * 0.8
        eps = torch.randn(1, 4, side, side, generator=generator)
        timesteps = torch.tensor([host.num_timesteps // 2])
        saved: dict[int, int] = {}

        def pack(tensor):
            try:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return tensor

        from textinv_core.recompute import recomputed
        peak.start()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                recomputed(host.recompute_blocks(), req["memory"] == "low"):
            cond = host.encode_text([PROMPT], {"<textinv-bench>": words})
            prediction = host.predict(host.add_noise(latents, eps, timesteps), timesteps, cond)
        loss = ((prediction.float() - host.target(latents, eps, timesteps).to(prediction.device)) ** 2).mean()
        loss.backward()
        out["train_seconds"] = time.perf_counter() - t0
        phases["train"] = peak.peak()
        base["train"] = peak.started_at
        out["saved_bytes"] = sum(saved.values())
        out["loss"] = float(loss.detach())
        out["grad_norm"] = {k: float(v.grad.norm()) for k, v in words.items()}
        out["backward_reads"] = dict(host.by_reference.reads)
        host.close()
    out["load_peak"] = phases["load"]
    out["sample_peak"] = phases["sample"]
    out["decode_peak"] = phases.get("decode")
    out["train_peak"] = phases["train"]
    out["process_peak"] = max(phases.values())
    out["phase_start"] = base  # memory in use when each phase began (the weights, mostly)
    out["process_rss_peak"] = peak.process_rss_peak() if device.type == "cuda" else out["process_peak"]
    out["peak_kind"] = "cuda max allocated" if device.type == "cuda" else "RSS"
    return out


def _worker(request: str) -> None:
    req = json.loads(request)
    result = _build(req["family"], req["path"]) if req["task"] == "build" else _measure(req)
    print("TEXTINV-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        main()
