"""The fault matrix (README: "What survives what"): each fault a training run or the server can
meet, injected for real (a full or read-only disk is a small tmpfs), and what must hold after
it: one clear message, a non-zero exit, and nothing already written lost or changed."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl
from test_training import pretrain_argv

SAVE_EVERY = ["--max_steps", "12", "--save_interval", "4"]  # checkpoints at steps 4 and 8


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s * 3} for s in SENTENCES * 6])


def run_main(argv):
    import ddp_pretrain
    ddp_pretrain.main(argv)


def fails_with(argv) -> str:
    """The one-line message a run stops with (SystemExit with a message: exit status 1)."""
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "Traceback" not in message, message
    return message


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def at_step(monkeypatch, step, action):
    """Run `action()` once, right after the optimizer step `step` (before its logging and saving)."""
    import ddp_pretrain
    original = ddp_pretrain.Run.after_step

    def after_step(self, *args):
        if self.step == step:
            action()
        return original(self, *args)
    monkeypatch.setattr(ddp_pretrain.Run, "after_step", after_step)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a disk we may fill or make read-only), or a skip naming why there is none."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full and read-only disk rows need a small tmpfs")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'}): the full and "
                    "read-only disk rows need root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory):
    """Write a file until the disk is full."""
    with open(os.path.join(directory, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


# ---------------------------------------------------------------- checkpoints that do not load

def test_auto_never_starts_over_when_no_checkpoint_loads(tokenizer_dir, data, tmp_path):
    out = tmp_path / "out"
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    for path in (out / "checkpoints").glob("step_*.pt"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = {p.name: digest(p) for p in (out / "checkpoints").glob("step_*.pt")}
    metrics_before = digest(out / "metrics.jsonl")

    message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY, "--resume", "auto"))
    assert "none of the 2 checkpoint(s)" in message and "nothing was trained, changed or deleted" in message
    assert all(name in message for name in before) and message.count("truncated or corrupt") == 2
    assert "--resume FILE" in message and "--resume none" in message
    assert {p.name: digest(p) for p in (out / "checkpoints").glob("step_*.pt")} == before
    assert digest(out / "metrics.jsonl") == metrics_before


def test_auto_falls_back_only_saying_so_and_keeps_the_unreadable_file(tokenizer_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    newest = out / "checkpoints" / "step_00000008.pt"
    with open(newest, "r+b") as f:
        f.truncate(100)
    kept = digest(newest)
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY, "--resume", "auto"))
    err = capsys.readouterr().err
    assert "resuming from" in err and "step_00000004.pt, an older checkpoint" in err and str(newest) in err
    moved = out / "checkpoints" / "unreadable" / "step_00000008.pt"
    assert digest(moved) == kept  # kept byte for byte, out of the way of the new step-8 save
    assert checkpoints(out) == ["step_00000004.pt", "step_00000008.pt"]


def test_pruning_spares_other_runs_and_unreadable_files(tokenizer_dir, data, tmp_path):
    out = tmp_path / "out"
    run_main(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "8", "--save_interval", "2"))
    assert checkpoints(out) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]  # keep 3
    # an earlier run's checkpoint, and two that do not load, in the same folder
    os.rename(out / "checkpoints" / "step_00000002.pt", out / "checkpoints" / "step_00000001.pt")
    broken = out / "checkpoints" / "step_00000003.pt"
    broken.write_bytes(b"not a checkpoint")
    (out / "checkpoints" / "step_00000006.pt").write_bytes(b"half-synced")  # where the new run will save
    run_main(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "14", "--save_interval", "2", "--resume", "none"))
    # the new run kept its own newest 3 (8, 10, 12) and pruned its own 2, 4, 6; the rest stays
    assert checkpoints(out) == ["step_00000001.pt", "step_00000003.pt", "step_00000008.pt",
                                "step_00000010.pt", "step_00000012.pt"]
    assert broken.read_bytes() == b"not a checkpoint"
    assert (out / "checkpoints" / "unreadable" / "step_00000006.pt").read_bytes() == b"half-synced"  # not overwritten


def test_a_checkpoint_refused_for_its_format_names_the_conversion(tokenizer_dir, data, tmp_path):
    from checkpoint import main as checkpoint_main
    out = tmp_path / "out"
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    old = out / "checkpoints" / "step_00000008.pt"
    state = torch.load(old, weights_only=True)
    for rng in state["rng"]:  # as an older Tiny-K wrote it: numpy's key array, which weights_only refuses
        name, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    del state["lineage"]
    torch.save(state, old)

    message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY, "--resume", str(old)))
    assert "refused for its format" in message and f"python code/checkpoint.py --convert {old}" in message
    checkpoint_main(["--convert", str(old)])
    assert (out / "checkpoints" / "step_00000008.pt.orig").is_file()
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY, "--resume", str(old)))
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- the disk during a run

def test_a_disk_that_fills_during_a_checkpoint(tokenizer_dir, data, small_disk, monkeypatch):
    out = small_disk / "out"
    at_step(monkeypatch, 5, lambda: fill(small_disk))
    message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    assert f"{out / 'checkpoints' / 'step_00000008.pt'}: not saved (No space left on device" in message
    assert "MiB free on" in message and "earlier checkpoints are intact" in message
    assert os.listdir(out / "checkpoints") == ["step_00000004.pt"]  # no partial file left
    from checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "checkpoints" / "step_00000004.pt"))["step"] == 4


def test_a_disk_that_fills_before_the_final_save(tokenizer_dir, data, small_disk, monkeypatch):
    out = small_disk / "out"
    at_step(monkeypatch, 6, lambda: fill(small_disk))
    message = fails_with(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "8", "--save_interval", "4"))
    assert f"{out}: final model not saved (No space left on device" in message and "checkpoints are intact" in message
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors") or n.startswith(".saving")]
    assert checkpoints(out) == ["step_00000004.pt"]


def test_metrics_that_cannot_be_written_warn_once_and_training_goes_on(tokenizer_dir, data, tmp_path, monkeypatch,
                                                                      capsys):
    import ddp_pretrain
    out = tmp_path / "out"
    original = ddp_pretrain.Run.after_step

    def after_step(self, *args):
        if self.step == 3:  # the log file now sits on a full disk: every write fails with ENOSPC
            self.logger.file = open("/dev/full", "w", encoding="utf-8")
        return original(self, *args)
    monkeypatch.setattr(ddp_pretrain.Run, "after_step", after_step)
    run_main(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    err = capsys.readouterr().err
    assert err.count("cannot write metrics (No space left on device); training goes on") == 1
    assert (out / "model.safetensors").is_file() and checkpoints(out) == ["step_00000004.pt", "step_00000008.pt"]


def test_an_out_dir_that_turns_read_only(tokenizer_dir, data, small_disk, monkeypatch):
    out = small_disk / "out"

    def read_only():  # out_dir bound onto itself read-only: the files the run has open stay writable
        subprocess.run(["mount", "--bind", str(out), str(out)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(out)], check=True)
    at_step(monkeypatch, 5, read_only)
    try:
        message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
    assert "step_00000008.pt: not saved (Read-only file system" in message
    assert checkpoints(out) == ["step_00000004.pt"]


def test_an_out_dir_that_vanishes_is_not_recreated(tokenizer_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    at_step(monkeypatch, 5, lambda: shutil.rmtree(out))
    message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY))
    assert f"{out} vanished while training" in message
    assert not out.exists()


# ---------------------------------------------------------------- preemption

def test_torchrun_max_restarts_resumes_after_a_rank_is_killed(tokenizer_dir, data, tmp_path):
    """A preempted or crashed rank: torchrun restarts the group, --resume auto continues from the
    last checkpoint, and the run finishes. Prints the restart's cost (kill to the first new step)."""
    import signal
    import time
    out = tmp_path / "out"
    argv = pretrain_argv(tokenizer_dir, data, out, "--max_steps", "150", "--save_interval", "20", "--log_interval", "1",
                         "--batch_size", "2", "--resume", "auto")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts",
                             "1", "--standalone", os.path.join(CODE, "ddp_pretrain.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*.pt")) if (out / "checkpoints").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "ddp_pretrain.py"], capture_output=True, text=True)
    worker = int(workers.stdout.split()[0])
    killed_at = time.time()
    os.kill(worker, signal.SIGKILL)
    lines, first_step_after = [], None
    for line in proc.stdout:
        lines.append(line)
        if first_step_after is None and any("resumed from" in seen for seen in lines) and " | step " in line:
            first_step_after = time.time() - killed_at
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    text = "".join(lines)
    assert "resumed from" in text and (out / "model.safetensors").is_file()
    print(f"restart: {first_step_after:.1f} s from kill -9 to the first step after resuming")


# ---------------------------------------------------------------- the data and tokenizer during a run

def test_a_jsonl_truncated_while_training_is_named_with_its_line(tokenizer_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def truncate():
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 3 + 5)  # mid-line
    at_step(monkeypatch, 5, truncate)
    message = fails_with(pretrain_argv(tokenizer_dir, data, out, *SAVE_EVERY, "--max_steps", "40"))
    assert f"error: {data}: " in message and ("line " in message) and "changed while training" in message
    assert "restore it and continue with --resume auto" in message
    assert checkpoints(out) == ["step_00000004.pt"]


def test_a_token_file_truncated_while_training_is_named_with_its_window(tokenizer_dir, tmp_path, monkeypatch):
    from pretokenize import pretokenize
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": s * 4} for s in SENTENCES * 8])
    bin_path = str(tmp_path / "docs.bin")
    pretokenize(src, tokenizer_dir, bin_path, num_proc=1)
    out = tmp_path / "out"
    at_step(monkeypatch, 5, lambda: os.truncate(bin_path, 64))
    message = fails_with(pretrain_argv(tokenizer_dir, bin_path, out, *SAVE_EVERY))
    assert f"{bin_path}: window " in message and "changed while training" in message
    assert checkpoints(out) == ["step_00000004.pt"]


def test_a_tokenizer_changed_under_a_run_is_not_saved_with_the_model(tokenizer_dir, data, tmp_path, monkeypatch,
                                                                    capsys):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer)
    original = (tokenizer / "tokenizer.json").read_bytes()
    out = tmp_path / "out"
    at_step(monkeypatch, 5, lambda: (tokenizer / "tokenizer.json").write_bytes(original + b" "))
    run_main(pretrain_argv(str(tokenizer), data, out, *SAVE_EVERY))
    assert "changed while training" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == original
    # resuming with the changed tokenizer is refused: the checkpoints name the one they trained with
    message = fails_with(pretrain_argv(str(tokenizer), data, out, *SAVE_EVERY, "--resume", "auto"))
    assert "another tokenizer" in message


def test_the_checkpoint_tool_refuses_a_missing_file(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(CODE, "checkpoint.py"), "--convert", str(tmp_path / "x.pt")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and str(tmp_path / "x.pt") in result.stderr and "Traceback" not in result.stderr
