"""The `textinv` command: train, inspect and demo pseudo-words outside ComfyUI.

Every user mistake (a `UserError`) ends in one line on stderr and exit status 2, with nothing
written: inputs are checked before the model loads, and the embedding is written atomically at the
end. Anything else is a bug or a resource problem and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import default
from .errors import MissingFileError, OutputExistsError, UserError
from .progress import ProgressBar

log = logging.getLogger("textinv")


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's flags; every training default is the engine's (textinv_core/config.py)."""
    a, d = parser.add_argument, default
    a("--model", required=True, help="diffusers folder or single-file checkpoint (.safetensors/.ckpt)")
    a("--images", required=True, nargs="+", help="a folder of images, or image files")
    a("--name", required=True, help="the pseudo-word's name; prompts use it as <name>")
    a("--init-word", default=d("init_word"), help="coarse descriptor to start from, e.g. cat, toy, painting")
    a("--vectors", type=int, default=d("num_vectors"), help="vectors per word (k); 1 is usually enough")
    a("--steps", type=int, default=d("steps"))
    a("--lr", type=float, default=d("learning_rate"),
      help="base learning rate (multiplied by batch unless --no-scale-lr)")
    a("--no-scale-lr", action="store_true", help="use --lr as is instead of lr x batch")
    a("--batch", type=int, default=d("batch_size"))
    a("--resolution", type=int, default=d("resolution"),
      help="training size in pixels (768 for SD2-768, 1024 for SDXL)")
    a("--templates", choices=("object", "style", "captions"), default=d("templates"),
      help="object/style prompt templates, or captions from <image>.txt files ({} marks the word)")
    a("--seed", type=int, default=d("seed"))
    a("--output", help="output file (default ./<name>.safetensors, .pt for --format a1111)")
    a("--format", choices=("textinv", "a1111", "diffusers"), default="textinv",
      help="textinv: emb_params / clip_l+clip_g safetensors (ComfyUI, A1111, diffusers); a1111: .pt; "
           "diffusers: {token: tensor}")
    a("--overwrite", action="store_true", help="replace an existing output file")
    a("--resume", help="snapshot folder of an interrupted run with the same settings")
    a("--snapshot-every", type=int, default=d("snapshot_every"), help="steps between snapshots (0: only on stop)")
    a("--eval-every", type=int, default=d("eval_every"), help="steps between evaluation-loss measurements")
    a("--preview-every", type=int, default=d("preview_every"),
      help="steps between preview PNGs in the snapshot folder (0: off)")
    a("--early-stop", type=int, default=d("early_stop_patience"),
      help="stop after this many evaluations without improvement (0: off)")
    a("--max-norm", type=float, default=d("max_norm_ratio"),
      help="cap each vector's norm at this x the mean word norm (0: off)")
    a("--init-pull", type=float, default=d("init_pull"), help="L2 pull toward the init word (paper's LDM code; 0: off)")
    a("--progressive", default="", help="comma-separated steps where one more vector joins, e.g. 2000,4000")
    a("--per-image-tokens", action="store_true", help="'a photo of S* with S_i' (paper's extension)")
    a("--no-flip", action="store_true", help="disable random horizontal flips")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model precision (vectors stay fp32)")
    a("--memory", choices=("auto", "fast", "low"), default=d("memory"),
      help="fast: keep every activation for the backward pass (most memory); low: recompute them block by block "
           "(about a third more time per step, a fraction of the memory); auto: low only when fast would not fit")
    a("--prediction", choices=("epsilon", "v_prediction"), help="override for single-file checkpoints")


def train_command(args: argparse.Namespace) -> int:
    from .data import find_image_files, load_images
    from .embedding_file import check_format, default_suffix, save_embedding, validate_name
    from .hosts.diffusers_host import DiffusersHost
    from .metadata import training_metadata
    from .trainer import TrainConfig, Trainer

    name = validate_name(args.name)
    if args.output:  # checked before the (slow) model load; the default name is checked after it
        _check_output(Path(args.output), args.overwrite, name)
    files = find_image_files(args.images)
    images = load_images(files)
    captions = None
    if args.templates == "captions":
        captions = [_read_caption(path) for path in files]
    progressive = tuple(int(s) for s in args.progressive.split(",") if s.strip())
    config = TrainConfig(
        name=name, init_word=args.init_word, num_vectors=args.vectors, steps=args.steps, learning_rate=args.lr,
        scale_lr=not args.no_scale_lr, batch_size=args.batch, resolution=args.resolution, templates=args.templates,
        captions=captions, seed=args.seed, flip=not args.no_flip, init_pull=args.init_pull,
        max_norm_ratio=args.max_norm, progressive_steps=progressive, per_image_tokens=args.per_image_tokens,
        eval_every=args.eval_every, early_stop_patience=args.early_stop, snapshot_every=args.snapshot_every,
        preview_every=args.preview_every, memory=args.memory,
    )
    config.validate(len(images))
    host = DiffusersHost.load(args.model, device=_device(args.device), dtype=_dtype(args.dtype),
                              **({"prediction_type": args.prediction} if args.prediction else {}))
    output = Path(args.output) if args.output else Path(f"{name}{default_suffix(args.format, len(host.encoders))}")
    check_format(args.format, len(host.encoders), output)
    _check_output(output, args.overwrite, name)
    snapshots = output.with_name(f"{output.stem}.snapshots")
    trainer = Trainer(host, images, config, observer=ProgressBar(snapshots), snapshot_dir=snapshots)
    if args.resume:
        trainer.load_state(args.resume)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        where = trainer.last_snapshot or "none was written yet"
        print(f"\ninterrupted; last snapshot: {where} (resume with --resume {snapshots})", file=sys.stderr)
        return 130
    meta = training_metadata(host.family, config, result)
    save_embedding(output, result.vectors, name, fmt=args.format, metadata=meta, overwrite=args.overwrite)
    print(f"eval loss {result.init_eval_loss:.4f} at the init word -> {result.best_eval_loss:.4f} "
          f"(best, step {result.best_step}); {result.stopped_reason} after {result.steps_run} steps; {result.memory}")
    print(f"wrote {output}; use it as <{name}> or embedding:{name}")
    return 0


def _check_output(output: Path, overwrite: bool, name: str) -> None:
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name such as {output / name}.safetensors.")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists: pass --overwrite or choose another --output.")


def _read_caption(image_path: Path) -> str:
    caption = image_path.with_suffix(".txt")
    if not caption.is_file():
        raise MissingFileError(f"--templates captions needs {caption} beside {image_path.name}.")
    return caption.read_text(encoding="utf-8").strip()


def info_command(args: argparse.Namespace) -> int:
    from .embedding_file import load_embedding, vectors_for_encoders
    from .families import describe_width

    emb = load_embedding(args.file)
    print(f"file:    {args.file}")
    print(f"name:    {emb.name}")
    print(f"format:  {emb.format}")
    print(f"vectors: {emb.num_vectors}")
    for key, tensor in emb.vectors.items():
        norms = ", ".join(f"{n:.3f}" for n in tensor.norm(dim=1).tolist())
        print(f"encoder: {key or '(single)'} {describe_width(tensor.shape[1])}; norms {norms}")
    for key, value in sorted(emb.metadata.items()):
        print(f"meta:    {key} = {value}")
    if args.model:
        from .hosts.diffusers_host import DiffusersHost

        host = DiffusersHost.load(args.model)
        vectors = vectors_for_encoders(emb, host.encoders)
        stats = host.token_table_stats()
        for key, tensor in vectors.items():
            print(f"norm ratio to mean word ({key}): "
                  + ", ".join(f"{n / stats[key]:.2f}x" for n in tensor.norm(dim=1).tolist()))
        for i, tokens in enumerate(host.nearest_tokens(vectors)):
            print(f"nearest tokens, vector {i}: {' '.join(t.replace('</w>', '') for t in tokens)}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """The toy-world demo (a word visibly learned) when its committed model is here, else the random one."""
    from .toyworld.model import DEFAULT_MODEL_DIR

    if args.random_model or not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        from .demo import run_demo

        if not args.random_model:
            print(f"the toy-world model is not at {DEFAULT_MODEL_DIR}; running the random-model demo")
        run_demo(Path(args.out), steps=args.steps)
        return 0
    from .toyworld.demo import run_demo as run_toy_demo

    report = run_toy_demo(Path(args.out), steps=args.steps)
    result, scores = report["result"], report["scores"]
    print(f"eval loss {result.init_eval_loss:.4f} at the init word -> {result.best_eval_loss:.4f}; "
          f"reconstruction {scores['before']:.2f} (init word) -> {scores['after']:.2f} (learned word)")
    print(f"wrote {report['embedding']} and {report['grid']}")
    return 0


def bench_quality_command(args: argparse.Namespace) -> int:
    from .toyworld.bench import run_quality

    return run_quality(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textinv", description="Textual Inversion: learn a pseudo-word.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="learn a pseudo-word from a few images")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=train_command)
    info = sub.add_parser("info", help="describe an embedding file")
    info.add_argument("file")
    info.add_argument("--model", help="a model to compare with: norms and nearest real tokens")
    info.set_defaults(func=info_command)
    demo = sub.add_parser("demo", help="build a small model offline and learn a word end to end")
    demo.add_argument("--out", default="textinv-demo", help="output folder")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.add_argument("--random-model", action="store_true",
                      help="use a random tiny SD1.x-layout model instead of the trained toy-world model")
    demo.set_defaults(func=demo_command)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    quality = bench.add_parser("quality", help="toy world: reconstruction and editability of a learned word")
    from .toyworld.bench import add_quality_arguments

    add_quality_arguments(quality)
    quality.set_defaults(func=bench_quality_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # library advice (e.g. "install accelerate") is noise to someone training a word
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read by both libraries when first imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except UserError as error:
        if args.verbose:
            raise
        print(f"textinv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
