"""Loading an original-layout checkpoint file (`textinv train --model x.safetensors`): time and peak memory.

Side by side, each in a fresh process, the same file through `load_single_file`:
- empty: the models are built with their parameters on the meta device, then take the file's tensors
  (what the loader does);
- random-init: the models are built with random weights first, then take the file's tensors (what it
  did without accelerate installed, before this script was written).
The file is full-size SD1.5 or SDXL with random weights in the file's precision (benchmarks/full_size.py,
exported by tests/ldm_export.py), written once to --dir and reused. Peak is the process's peak resident
memory (VmHWM) from start to the loaded models, the file's tensors included.

    python benchmarks/single_file_load.py --families sd15,sdxl      # fp16 files, loaded as fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
GIB = 1024 ** 3
MODES = ("empty", "random-init")
LOADER_FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}


def write_file(family: str, folder: Path) -> Path:
    """The full-size checkpoint, written once (fp16, as most released files are)."""
    import torch
    from full_size import components

    from tests.ldm_export import export_single_file

    path = folder / f"{family}-random-fp16.safetensors"
    if not path.exists():
        partial = folder / f"{family}-random-fp16.partial.safetensors"  # renamed once whole
        export_single_file(components(family, dtype=torch.float16), LOADER_FAMILY[family], partial)
        partial.rename(path)
    return path


def load_once(path: Path, mode: str, dtype: str) -> dict:
    """Worker: load the file once in this process and report seconds and the process's peak."""
    from contextlib import nullcontext

    import torch
    from peak import PhasePeak

    from textinv_core.hosts import single_file

    if mode == "random-init":
        single_file._empty_weights = nullcontext
    began = time.perf_counter()
    loaded = single_file.load_single_file(path, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - began
    weights = sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                  if loaded[name] is not None for p in loaded[name].parameters())
    return dict(mode=mode, seconds=seconds, peak=PhasePeak.hwm(), weights=weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--dtype", default="float32", help="precision the models are loaded in")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "textinv-load-bench"),
                        help="where the random full-size files are written once and reused")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, mode, dtype = args.worker
        print(json.dumps(load_once(Path(path), mode, dtype)))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'family':7} {'file GiB':>8} {'mode':12} {'seconds':>8} {'peak GiB':>9} {'weights GiB':>12}")
    for family in args.families.split(","):
        path = write_file(family, folder)
        for mode in MODES:
            env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, __file__, "--worker", str(path), mode, args.dtype],
                                 capture_output=True, text=True, env=env, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{family:7} {path.stat().st_size / GIB:8.2f} {mode:12} {row['seconds']:8.1f} "
                  f"{row['peak'] / GIB:9.2f} {row['weights'] / GIB:12.2f}", flush=True)


if __name__ == "__main__":
    main()
