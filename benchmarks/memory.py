"""Memory of one training step against one sampling step, full-size SD1.5 (512 px) and SDXL (1024 px).

For each family, precision and memory setting (fast: keep every activation; low: recompute them block
by block), in a fresh process each, through the diffusers host (and through the ComfyUI host when
COMFYUI_PATH is set, via benchmarks/comfy_memory.py), batch 1:
- weights: bytes of the UNet, text encoders and VAE;
- sample: one denoising step as a sampler runs it (both prompts of classifier-free guidance encoded,
  the UNet on the batch of two), peak and time; decode: the VAE decode of one latent, peak;
- train: one training step (word spliced into the prompt, UNet forward and backward to the word,
  AdamW step), peak and time, after one warm-up step;
- process: the whole process's peak (model build, VAE encode of the training images, every phase);
- est: what memory=auto estimates a step keeps for its backward pass (textinv_core/memory.py).
Peaks are the device's: torch.cuda max allocated on a GPU, peak resident memory on CPU (VmHWM reset per
phase, glibc told to hand freed memory back at once). Models are built in the measured precision on
the measured device with random weights (benchmarks/full_size.py): nothing is downloaded.

    python benchmarks/memory.py                                 # CPU, bf16, SD1.5 and SDXL, fast and low
    python benchmarks/memory.py --families sd15 --precision fp16,bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

GIB = 1024 ** 3
PROMPT = "a photo of a <textinv-bench>"


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def run_worker(family: str, precision: str, memories: list[str], device: str, resolution: int) -> list[dict]:
    """Build once, then per memory setting: a sampling step, a training step and a decode (on CPU the
    driver runs one setting per process, since resident memory cannot be reset to what is live)."""
    import torch
    from full_size import components, images
    from peak import PhasePeak

    from textinv_core.config import TrainConfig
    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.memory import plan_memory
    from textinv_core.trainer import Trainer

    dev = torch.device(device)
    meter = PhasePeak(dev)
    meter.start()
    start = time.perf_counter()
    host = DiffusersHost(components(family, dtype=_dtype(precision), device=device), device=device,
                         dtype=_dtype(precision))
    build_seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for m in host._modules() for p in m.parameters())
    load_peak = meter.peak()
    rows = []
    for memory in memories:
        row = {"family": family, "resolution": resolution, "precision": precision, "memory": memory,
               "route": "diffusers", "device": device, "build_seconds": build_seconds, "weights_bytes": weights}
        peaks = {"load": load_peak}
        meter.start()
        config = TrainConfig(name="textinv-bench", init_word="cat", steps=10, resolution=resolution, batch_size=1,
                             memory=memory, eval_draws=1, preview_every=0, snapshot_every=0)
        trainer = Trainer(host, images(), config)
        peaks["encode"] = meter.peak()

        latent_shape = trainer.latents.shape[2:]

        def sampling_step(latent_shape=latent_shape):
            with torch.no_grad():
                cond = host.encode_text([PROMPT.replace("<textinv-bench>", "cat"), ""], {})
                x = torch.randn(2, *latent_shape, device=dev)
                host.predict(x, torch.full((2,), 500, device=dev), cond)

        for phase, work in (("sample", sampling_step), ("train", trainer.train_step)):
            work()  # warm-up: one-time allocations and kernel choices are not the step's
            meter.start()
            start = time.perf_counter()
            row[f"{phase}_loss"] = work()  # a NaN loss (fp16 overflow of random weights) skips the backward
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            row[f"{phase}_seconds"] = time.perf_counter() - start
            peaks[phase] = meter.peak()
        meter.start()
        with torch.no_grad():
            host._to_pil(trainer.latents[0, :1])
        peaks["decode"] = meter.peak()
        plan = plan_memory("auto", host, trainer.latents, trainer.eval_set[:1], trainer.words(0),
                           max(1, host.pixel_multiple * trainer.latents.shape[-1] // resolution))
        row.update({f"{k}_peak": v for k, v in peaks.items()})
        row["process_peak"] = max(peaks.values())
        row["estimate_bytes"] = plan.low_bytes if memory == "low" else plan.fast_bytes
        rows.append(row)
        del trainer
    return rows


def measure(family: str, precision: str, memories: list[str], device: str, resolution: int,
            route: str) -> list[dict]:
    """Rows measured in a fresh process (so each peak is its own)."""
    if route == "comfy":
        import comfy_memory

        rows = []
        for memory in memories:
            try:
                rows.append(dict(comfy_memory.measure(family, resolution, precision, memory, device=device),
                                 route="comfy"))
            except Exception as error:  # noqa: BLE001 - a failed row is reported, the others still run
                rows.append(_failed(family, resolution, precision, memory, route, device, str(error)[-300:]))
        return rows
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")
    request = json.dumps({"family": family, "precision": precision, "memories": memories, "device": device,
                          "resolution": resolution})
    done = subprocess.run([sys.executable, __file__, "--worker", request], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TEXTINV-ROWS ")]
    if done.returncode != 0 or not lines:
        why = "killed (out of memory)" if done.returncode == -9 else \
            (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return [_failed(family, resolution, precision, memory, route, device, why) for memory in memories]
    return json.loads(lines[-1][len("TEXTINV-ROWS "):])


def _failed(family, resolution, precision, memory, route, device, why: str) -> dict:
    return {"family": family, "resolution": resolution, "precision": precision, "memory": memory,
            "route": route, "device": device, "error": why}


def _gb(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def print_table(rows: list[dict]) -> None:
    head = ("family", "res", "prec", "route", "memory", "weights", "sample", "decode", "train", "train/sample",
            "process", "est. kept", "sample s", "train s", "low/fast time")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    fast_time = {(r["family"], r["precision"], r["route"]): r.get("train_seconds") for r in rows
                 if r["memory"] == "fast" and "error" not in r}
    for r in rows:
        lead = (r["family"], r["resolution"], r["precision"], r["route"], r["memory"])
        if "error" in r:
            print("| " + " | ".join(map(str, lead)) + f" | {r['error'][:100]} |" + " |" * (len(head) - 6))
            continue
        if r.get("train_loss") is not None and not math.isfinite(r["train_loss"]):
            lead = (*lead[:-1], f"{lead[-1]} (NaN loss: no backward, peak not comparable)")
        fast = fast_time.get((r["family"], r["precision"], r["route"]))
        slower = f"{r['train_seconds'] / fast:.2f}x" if fast and r["memory"] == "low" else "-"
        estimate = r.get("estimate_bytes", r.get("saved_bytes"))
        cells = (*lead, _gb(r["weights_bytes"]), _gb(r["sample_peak"]), _gb(r.get("decode_peak")),
                 _gb(r["train_peak"]), f"{r['train_peak'] / r['sample_peak']:.2f}", _gb(r["process_peak"]),
                 _gb(estimate), f"{r['sample_seconds']:.2f}", f"{r['train_seconds']:.2f}", slower)
        print("| " + " | ".join(map(str, cells)) + " |")
    print("GiB. sample = one denoising step with guidance (2 prompts); decode = VAE decode of one image; train = "
          "one training step; train/sample = their peaks' ratio (target <= 1.5 with memory=low); process = the "
          "whole process's peak; est. kept = memory=auto's estimate of what the step keeps for backward "
          "(ComfyUI route: the bytes autograd kept, measured).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--precision", default="bf16", help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--memory", default="fast,low")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, help="pixels for every family (default: 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--routes", default=None, help="diffusers,comfy (comfy needs COMFYUI_PATH)")
    parser.add_argument("--json", type=Path, help="also write the rows here, one run at a time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        request = json.loads(args.worker)
        print("TEXTINV-ROWS " + json.dumps(run_worker(**request)), flush=True)
        return
    from full_size import FAMILIES

    memories = args.memory.split(",")
    routes = (args.routes or ("diffusers,comfy" if os.environ.get("COMFYUI_PATH") else "diffusers")).split(",")
    rows = []
    for family in args.families.split(","):
        for precision in args.precision.split(","):
            for route in routes:
                # one process per setting on CPU (resident memory cannot be reset), one for all on CUDA
                groups = [memories] if args.device.startswith("cuda") else [[m] for m in memories]
                for group in groups:
                    rows += measure(family, precision, group, args.device, args.resolution or FAMILIES[family],
                                    route)
                    for row in rows[-len(group):]:
                        print(json.dumps(row), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
