"""Faults in the middle of `textinv train`, and `textinv info` on bad files: nothing lost, nothing cryptic.

A NaN, Ctrl-C (in a step or in an evaluation), a snapshot the disk refuses, a final write that fails:
each ends in one line that says where the last good state is and how to go on, every file that existed
is unchanged, only complete snapshot files were added, and following the advice finishes the run. Out of
memory and bugs keep their traceback. The tiny model stays in memory (`Workspace.use_host`), so only the
steps themselves cost time.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import pytest
import torch

from textinv_core.embedding_file import load_embedding, save_embedding
from textinv_core.snapshots import read_resume

from .test_faults import make_workspace, no_partial_files, one_error_line, run_cli, tree

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class FaultyHost:
    """The tiny host, whose denoiser fails from its n-th call on, in training steps or in evaluations."""

    def __init__(self, host, fault: str, from_call: int, during: str = "train", action=None):
        self._host, self.fault, self.from_call, self.during, self.action = host, fault, from_call, during, action
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        out = self._host.predict(noisy, timesteps, cond)
        if torch.is_grad_enabled() == (self.during == "train"):
            self.calls += 1
            if self.calls >= self.from_call:
                if self.action is not None:
                    self.action()
                if self.fault == "nan":
                    return out * math.nan
                if self.fault == "interrupt":
                    raise KeyboardInterrupt
                if self.fault == "oom":
                    raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
                if self.fault == "bug":
                    raise ZeroDivisionError("a bug")
        return out


@pytest.fixture
def ws(tmp_path, tiny_sd1_folder, tiny_host):
    return make_workspace(tmp_path, tiny_sd1_folder, tiny_host("sd1"))


def last_error_line(code: int, err: str, *needles: str, status: int = 2) -> str:
    """Mid-run: the progress bar may be on stderr above; the message is the one, last, `textinv:` line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    ours = [line for line in lines if line.startswith("textinv:")]
    assert len(ours) == 1 and lines[-1] == ours[0], err
    for needle in needles:
        assert needle in ours[0], f"{needle!r} not in: {ours[0]}"
    return ours[0]


def only_complete_snapshots_added(ws, before: dict) -> list[str]:
    """Every old entry unchanged; what was added lies in the snapshot folder and loads."""
    after = tree(ws.root)
    assert {k: v for k, v in after.items() if k in before} == before
    added = sorted(set(after) - set(before))
    for rel in added:
        assert rel.startswith("out/w.snapshots"), f"unexpected new file {rel}"
        path = ws.root / rel
        if path.name.endswith(".resume.safetensors"):
            read_resume(path, "w")
        elif path.suffix == ".safetensors":
            load_embedding(path)
    no_partial_files(ws.root, before)
    return added


def snapshots(ws) -> Path:
    return ws.out.with_name("w.snapshots")


def failing_save_file(monkeypatch, folder: Path, from_call: int, code: int = errno.ENOSPC):
    """safetensors' save_file refuses writes into `folder` from its n-th one there, as a full disk would."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent == folder:
            calls.append(filename)
            if len(calls) >= from_call:
                raise OSError(code, os.strerror(code))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def clean_vectors(ws, monkeypatch, capsys, steps: str = "8") -> torch.Tensor:
    """The word an uninterrupted run writes, for comparing a resumed one with."""
    clean = ws.root / "clean" / "w.safetensors"
    assert run_cli(ws.args("--steps", steps, output=str(clean))) == 0
    capsys.readouterr()
    return load_embedding(clean).vectors[""]


def test_nan_keeps_the_state_before_the_bad_update_and_the_advice_works(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch, FaultyHost(ws.host, "nan", 6))
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "8", "--snapshot-every", "100"))
    last_error_line(code, capsys.readouterr().err, "step 6", "step 4", "learning rate below 0.05",
                    f"--resume {snapshots(ws)} --lr 0.025")
    added = only_complete_snapshots_added(ws, before)
    assert added == ["out/w.snapshots", "out/w.snapshots/w-step000004.safetensors",
                     "out/w.snapshots/w.resume.safetensors"]
    assert read_resume(snapshots(ws), "w")[0]["stopped"] == "nan" and not ws.out.exists()
    ws.use_host(monkeypatch)  # the advice: same command, --resume, a lower learning rate
    higher = ws.args("--steps", "8", "--snapshot-every", "100", "--resume", str(snapshots(ws)), "--lr", "0.1")
    last_error_line(run_cli(higher), capsys.readouterr().err, "only a lower learning rate")
    lower = ws.args("--steps", "8", "--snapshot-every", "100", "--resume", str(snapshots(ws)), "--lr", "0.025")
    assert run_cli(lower) == 0 and load_embedding(ws.out).vectors[""].isfinite().all()


def test_ctrl_c_mid_step_saves_the_steps_done_and_resume_retraces_the_run(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch)
    whole = clean_vectors(ws, monkeypatch, capsys)
    ws.use_host(monkeypatch, FaultyHost(ws.host, "interrupt", 5))
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "8", "--snapshot-every", "100"))
    last_error_line(code, capsys.readouterr().err, "interrupted", "step 4", f"--resume {snapshots(ws)}", status=130)
    assert "out/w.snapshots/w-step000004.safetensors" in only_complete_snapshots_added(ws, before)
    assert not ws.out.exists()
    ws.use_host(monkeypatch)
    assert run_cli(ws.args("--steps", "8", "--snapshot-every", "100", "--resume", str(snapshots(ws)))) == 0
    assert torch.equal(load_embedding(ws.out).vectors[""], whole)


def test_ctrl_c_during_an_evaluation_keeps_the_steps_done(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch, FaultyHost(ws.host, "interrupt", 3, during="eval"))  # evaluations at 0, 1, 2: at step 2
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "8", "--snapshot-every", "100", "--eval-every", "2"))
    last_error_line(code, capsys.readouterr().err, "interrupted", "step 2", "--resume", status=130)
    assert "out/w.snapshots/w-step000002.safetensors" in only_complete_snapshots_added(ws, before)
    ws.use_host(monkeypatch)
    assert run_cli(ws.args("--steps", "8", "--snapshot-every", "100", "--resume", str(snapshots(ws)))) == 0


@pytest.mark.parametrize("fails_at", [3, 4], ids=["state-write", "embedding-write"])
def test_a_full_disk_at_a_snapshot_stops_with_the_last_snapshot_named(ws, monkeypatch, capsys, fails_at):
    """Snapshots at steps 2 and 4; the disk fills while the second is written (its state, or its embedding):
    the step-2 snapshot stays whole and is the one named, nothing of step 4 stays."""
    ws.use_host(monkeypatch)
    failing_save_file(monkeypatch, snapshots(ws), fails_at)
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "6", "--snapshot-every", "2"))
    last_error_line(code, capsys.readouterr().err, "No space left on device", "step 4",
                    f"last snapshot written is {snapshots(ws) / 'w-step000002.safetensors'}")
    added = only_complete_snapshots_added(ws, before)
    assert added == ["out/w.snapshots", "out/w.snapshots/w-step000002.safetensors",
                     "out/w.snapshots/w.resume.safetensors"]
    assert read_resume(snapshots(ws), "w")[0]["step"] == 2 and not ws.out.exists()


def test_a_snapshot_folder_that_turns_read_only_is_one_line(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch)
    failing_save_file(monkeypatch, snapshots(ws), 1, errno.EROFS)
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "4", "--snapshot-every", "2"))
    last_error_line(code, capsys.readouterr().err, "Read-only file system", "no snapshot was written before")
    assert only_complete_snapshots_added(ws, before) in ([], ["out/w.snapshots"])


def test_a_failed_final_write_keeps_the_run_and_resume_writes_the_word(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch)
    whole = clean_vectors(ws, monkeypatch, capsys, steps="4")
    failing_save_file(monkeypatch, ws.out.parent, 1)
    before = tree(ws.root)
    code = run_cli(ws.args("--steps", "4", "--snapshot-every", "100"))
    last_error_line(code, capsys.readouterr().err, f"Could not write {ws.out}", "No space left on device",
                    "saved up to step 4", f"--resume {snapshots(ws)}")
    only_complete_snapshots_added(ws, before)
    monkeypatch.undo()
    ws.use_host(monkeypatch)
    assert run_cli(ws.args("--steps", "4", "--snapshot-every", "100", "--resume", str(snapshots(ws)))) == 0
    assert torch.equal(load_embedding(ws.out).vectors[""], whole)


def test_an_output_that_appears_during_training_is_kept_and_the_run_too(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch, FaultyHost(ws.host, "none", 2, action=lambda: ws.out.write_bytes(b"someone's word")))
    code = run_cli(ws.args("--steps", "4"))
    last_error_line(code, capsys.readouterr().err, "already exists", f"--resume {snapshots(ws)}")
    assert ws.out.read_bytes() == b"someone's word"


def test_out_of_memory_keeps_its_traceback_and_names_the_setting(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch, FaultyHost(ws.host, "oom", 2))
    with pytest.raises(OOM) as info:
        run_cli(ws.args("--steps", "4"))
    assert "--memory low" in " ".join(getattr(info.value, "__notes__", []))
    assert not ws.out.exists()


def test_a_bug_keeps_its_traceback(ws, monkeypatch):
    ws.use_host(monkeypatch, FaultyHost(ws.host, "bug", 1))
    with pytest.raises(ZeroDivisionError):
        run_cli(ws.args("--steps", "4"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(ws, monkeypatch, umask, mode):
    ws.use_host(monkeypatch)
    old = os.umask(umask)
    try:
        assert run_cli(ws.args("--steps", "2", "--snapshot-every", "2")) == 0
    finally:
        os.umask(old)
    written = [ws.out, *snapshots(ws).glob("*.safetensors")]
    assert len(written) == 3 and {p.stat().st_mode & 0o777 for p in written} == {mode}


# -- textinv info -----------------------------------------------------------------------------------------

def _word(ws, name: str, value: float) -> Path:
    path = ws.root / f"{name}.safetensors"
    from safetensors.torch import save_file

    tensor = torch.randn(2, 768)
    tensor[1, 5] = value
    save_file({"emb_params": tensor}, str(path))
    return path


INFO_CASES = {
    "nan-vectors": (lambda ws: [str(_word(ws, "nan", math.nan))], ["non-finite", "unusable"]),
    "inf-vectors": (lambda ws: [str(_word(ws, "inf", math.inf))], ["non-finite"]),
    "garbage-file": (lambda ws: [str(_garbage(ws))], ["junk.safetensors", "not a readable"]),
    "missing-file": (lambda ws: [str(ws.root / "none.safetensors")], ["No embedding file"]),
    "model-truncated": (lambda ws: [str(ws.existing), "--model", str(_damaged(ws))], ["truncated"]),
    "model-is-an-embedding": (lambda ws: [str(ws.existing), "--model", str(ws.existing)], ["is an embedding"]),
}


def _garbage(ws) -> Path:
    (ws.root / "junk.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}" + b"garbage" * 3)
    path = ws.root / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    return path


def _damaged(ws) -> Path:
    from .test_faults import damaged_model

    return damaged_model(ws, "unet/diffusion_pytorch_model.safetensors", "truncate")


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_info_on_a_bad_file_is_one_line(ws, capsys, case):
    make, needles = INFO_CASES[case]
    argv = ["info", *make(ws)]
    capsys.readouterr()
    before = tree(ws.root)
    code = run_cli(argv)
    captured = capsys.readouterr()
    one_error_line(code, captured.err, *needles)
    assert "nearest tokens" not in captured.out and tree(ws.root) == before


def test_an_embedding_with_nan_cannot_be_written_either(tmp_path):
    from textinv_core.embedding_file import EmbeddingFileError

    with pytest.raises(EmbeddingFileError, match="non-finite"):
        save_embedding(tmp_path / "x.safetensors", {"clip_l": torch.full((1, 768), math.nan)}, "x")
    assert list(tmp_path.iterdir()) == []


def test_resume_accepts_a_snapshot_file_instead_of_its_folder(ws, monkeypatch, capsys):
    ws.use_host(monkeypatch)
    first = ws.root / "first" / "w.safetensors"
    assert run_cli(ws.args("--steps", "2", "--snapshot-every", "2", output=str(first))) == 0
    snapshot = first.with_name("w.snapshots") / "w-step000002.safetensors"
    assert run_cli(ws.args("--steps", "4", "--snapshot-every", "2", "--resume", str(snapshot))) == 0
    assert load_embedding(ws.out).metadata["textinv.steps"] == "4"
