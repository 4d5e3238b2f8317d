"""The `textinv` command: train, inspect and demo pseudo-words outside ComfyUI.

Every user mistake (a `UserError`) ends in one line on stderr and exit status 2, with nothing
written: inputs are checked before the model loads, and the embedding is written atomically at the
end. Anything else is a bug or a resource problem and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from .config import LR_DROP, default
from .errors import UserError
from .progress import ProgressBar

log = logging.getLogger("textinv")


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's flags; every training default is the engine's (textinv_core/config.py)."""
    a, d = parser.add_argument, default
    a("--model", required=True, help="diffusers folder or single-file checkpoint (.safetensors/.ckpt)")
    a("--images", required=True, nargs="+", help="a folder of images, or image files")
    a("--name", required=True, help="the pseudo-word's name; prompts use it as <name>")
    a("--init-word", default=d("init_word"), help="coarse descriptor to start from, e.g. cat, toy, painting")
    a("--vectors", type=int, default=d("num_vectors"),
      help="vectors per word (k); the paper finds 1 often enough, 2 held a concept's parts together more often")
    a("--steps", type=int, default=d("steps"))
    a("--lr", type=float, default=d("learning_rate"),
      help="learning rate per step (multiplied by the batch size with --scale-lr)")
    a("--scale-lr", action=argparse.BooleanOptionalAction, default=d("scale_lr"),
      help="multiply --lr by the batch size, the paper's rule for its base LR 0.005")
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
      help="stop once this many evaluations in a row show no downward trend beyond their scatter (0: off)")
    a("--lr-drops", type=int, default=d("lr_drops"),
      help=f"when the evaluation loss stops improving, go back to the best word and go on at {LR_DROP:g}x the "
           "learning rate, this many times before early stopping ends the run")
    a("--word-swaps", type=int, default=d("word_swaps"),
      help="when the evaluation loss stops improving, first try swapping one of the word's vectors for the "
           "vocabulary word that lowers the loss most, up to this many times in a run; a start the engine "
           "found is also tried so before the first step (0: no swaps)")
    a("--max-norm", type=float, default=d("max_norm_ratio"),
      help="cap each vector's norm at this x the start word's norm, so the word composes (0: off)")
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
    from .config import TrainConfig
    from .embedding_file import check_format, default_suffix, validate_name
    from .inputs import (
        CLI_LABELS,
        check_model_path,
        check_resume_fits,
        check_training,
        load_image_files,
        read_captions,
    )

    # Every input is checked before the (slow) model load: one error line, nothing written.
    name = validate_name(args.name)
    model = check_model_path(args.model)
    encoders = model.encoders or 1  # a .ckpt says only once loaded; checked again then
    output = Path(args.output) if args.output else Path(f"{name}{default_suffix(args.format, encoders)}")
    check_format(args.format, encoders, output)
    files, images = load_image_files(args.images)
    captions = read_captions(files) if args.templates == "captions" else None
    config = TrainConfig(
        name=name, init_word=args.init_word, num_vectors=args.vectors, steps=args.steps, learning_rate=args.lr,
        scale_lr=args.scale_lr, batch_size=args.batch, resolution=args.resolution, templates=args.templates,
        captions=captions, seed=args.seed, flip=not args.no_flip, init_pull=args.init_pull,
        max_norm_ratio=args.max_norm, progressive_steps=_progressive(args.progressive),
        per_image_tokens=args.per_image_tokens, eval_every=args.eval_every, early_stop_patience=args.early_stop,
        lr_drops=args.lr_drops, word_swaps=args.word_swaps, snapshot_every=args.snapshot_every,
        preview_every=args.preview_every, memory=args.memory,
    )
    snapshots = output.with_name(f"{output.stem}.snapshots")
    images = check_training(config, images, output=output, overwrite=args.overwrite, snapshot_dir=snapshots,
                            resume=args.resume, labels=CLI_LABELS, model=model)
    device = _device(args.device)

    from .hosts.diffusers_host import DiffusersHost
    from .trainer import Trainer

    with _memory_note("loading the model", "--dtype fp16 (or bf16) halves the model's memory"):
        host = DiffusersHost.load(args.model, device=device, dtype=_dtype(args.dtype),
                                  **({"prediction_type": args.prediction} if args.prediction else {}))
    if args.resume:
        check_resume_fits(args.resume, name, host.encoders)
    if len(host.encoders) != encoders:  # a .ckpt of SDXL: its default name and format are known only now
        output = Path(args.output) if args.output else Path(f"{name}{default_suffix(args.format, len(host.encoders))}")
        check_format(args.format, len(host.encoders), output)
        snapshots = output.with_name(f"{output.stem}.snapshots")
        check_training(config, images, output=output, overwrite=args.overwrite, snapshot_dir=snapshots,
                       labels=CLI_LABELS)
    progress = ProgressBar(snapshots)
    with _memory_note("encoding the images", "a lower --resolution needs less"):
        trainer = Trainer(host, images, config, observer=progress, snapshot_dir=snapshots)
    if args.resume:
        trainer.load_state(args.resume)
    started = trainer.step
    try:
        result = trainer.run()
        _save_result(args, host, config, result, output, trainer, snapshots)
    except KeyboardInterrupt:
        progress.close()
        return _interrupted(trainer, snapshots, started)
    except UserError as error:
        progress.close()
        hint = _nan_hint(trainer, snapshots, args, error)
        if hint:
            raise UserError(f"{error}{hint}") from error
        raise
    found = f" (found in {result.start_passes} image-passes)" if result.start_passes else ""
    print(f"eval loss {result.init_eval_loss:.4f} at the start word '{result.init_word}'{found} -> "
          f"{result.best_eval_loss:.4f} "
          f"(best, step {result.best_step}); {result.stopped_reason} after {result.steps_run} steps; {result.memory}")
    if result.swaps:
        swaps = ", ".join(f"{change} at step {step}" for step, change in result.swaps)
        print(f"swaps the word took (step 0: its start): {swaps} ({result.swap_passes} image-passes spent "
              "trying swaps)")
    print(f"wrote {output}; use it as <{name}> or embedding:{name}")
    return 0


@contextlib.contextmanager
def _memory_note(doing: str, advice: str):
    """Out of memory outside a training step keeps its traceback too, and says what lowers the need."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, MemoryError) or "out of memory" in str(error).lower() or "allocate" in str(error):
            note = f"textinv: out of memory while {doing}: {advice}."
            if hasattr(error, "add_note"):
                error.add_note(note)
            log.error(note)
        raise


def _progressive(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--progressive {text!r} must be step numbers separated by commas, e.g. 2000,4000.") from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s); use --device cpu or auto.")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto.")
    return name


def _snapshot_step(path: Path | None) -> int | None:
    try:
        return int(path.stem.rsplit("-step", 1)[1]) if path is not None else None
    except (IndexError, ValueError):
        return None


def _interrupted(trainer, snapshots: Path, started: int) -> int:
    """Ctrl-C: the trainer keeps the state before a cut-short step; a stop anywhere else (evaluation, preview)
    is kept here, so the steps done are never lost. Exit status 130, as for any interrupted command."""
    if trainer.step > started and _snapshot_step(trainer.last_snapshot) != trainer.step:
        try:
            trainer.snapshot()
        except KeyboardInterrupt:
            pass
    step = _snapshot_step(trainer.last_snapshot)
    if trainer.last_snapshot is not None and step is not None and step >= started:
        print(f"textinv: interrupted; step {step} is saved in {trainer.last_snapshot.parent}: run the same command "
              f"with --resume {trainer.last_snapshot.parent} to go on.", file=sys.stderr)
    else:
        print("textinv: interrupted before the first step finished; nothing was written.", file=sys.stderr)
    return 130


def _nan_hint(trainer, snapshots: Path, args, error: UserError) -> str:
    """After a NaN loss, the command that goes on from the last good state."""
    from .snapshots import STOPPED_BY_NAN, SnapshotWriteError, read_resume

    if trainer.last_snapshot is None or isinstance(error, SnapshotWriteError):
        return ""
    try:
        meta, _ = read_resume(snapshots, trainer.config.name)
    except (UserError, OSError, ValueError, KeyError):
        return ""
    if meta.get("stopped") != STOPPED_BY_NAN or meta.get("step") != trainer.step:
        return ""
    return f" Go on with the same command and --resume {snapshots} --lr {args.lr / 2:g}."


def _save_result(args, host, config, result, output: Path, trainer, snapshots: Path) -> None:
    """The final write; if it fails (disk full, a file appeared meanwhile) the trained state is kept as a
    snapshot where possible and the message says how to get the word without training again."""
    from .embedding_file import save_embedding
    from .metadata import training_metadata

    meta = training_metadata(host.family, config, result)
    try:
        save_embedding(output, result.vectors, config.name, fmt=args.format, metadata=meta, overwrite=args.overwrite)
    except UserError as error:
        if _snapshot_step(trainer.last_snapshot) != trainer.step:
            try:
                trainer.snapshot()
            except UserError:
                pass
        if trainer.last_snapshot is None:
            raise
        step = _snapshot_step(trainer.last_snapshot)
        raise UserError(f"{error} The run is saved up to step {step} in {snapshots}: fix this and run the same "
                        f"command with --resume {snapshots} to write the word.") from error


def info_command(args: argparse.Namespace) -> int:
    from .embedding_file import load_embedding, vectors_for_encoders
    from .families import describe_width
    from .inputs import check_model_path

    emb = load_embedding(args.file)  # refuses a file that is not an embedding, or holds NaN/inf
    if args.model:
        check_model_path(args.model)
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


def bench_speed_command(args: argparse.Namespace) -> int:
    from .toyworld.speed import run_speed_command

    return run_speed_command(args)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"textinv: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="textinv", description="Textual Inversion: learn a pseudo-word.")
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
    speed = bench.add_parser("speed", help="toy world: time to a good word, the defaults against the anchors' recipes")
    from .toyworld.speed import add_speed_arguments

    add_speed_arguments(speed)
    speed.set_defaults(func=bench_speed_command)
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
        print(f"textinv: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (a run's own interrupt is handled where it runs)
        print("textinv: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
