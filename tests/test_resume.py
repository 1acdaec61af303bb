"""Reliable training: kill -9 and resume gives the same run, SIGTERM checkpoints and exits 0,
corrupt checkpoints are detected, mismatches refused, NaN steps skipped, full disks caught."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl
from test_training import pretrain_argv, read_metrics

TRAIN = os.path.join(CODE, "ddp_pretrain.py")
ENV = dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s * 3} for s in SENTENCES * 6])


def long_run_argv(tokenizer_dir, data, out, *extra):
    """Enough steps that a kill lands mid-run (the first checkpoint comes at step 20); checkpoints every 20 steps."""
    return pretrain_argv(tokenizer_dir, data, out, "--max_steps", "100", "--save_interval", "20",
                         "--log_interval", "10", "--batch_size", "2", "--accumulation_steps", "2", *extra)


def start(argv, launcher=(sys.executable,)):
    """In a process group of its own, so a kill reaches torchrun's workers too."""
    return subprocess.Popen([*launcher, TRAIN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)


def wait_for_checkpoint(out, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((out / "checkpoints").glob("step_*.pt")) if (out / "checkpoints").is_dir() else []:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


def test_kill_9_and_resume_equals_the_uninterrupted_run(tokenizer_dir, data, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run([sys.executable, TRAIN, *long_run_argv(tokenizer_dir, data, whole)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = start(long_run_argv(tokenizer_dir, data, broken))
    wait_for_checkpoint(broken, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (broken / "model.safetensors").exists(), "the run finished before it was killed"
    resumed = subprocess.run([sys.executable, TRAIN, *long_run_argv(tokenizer_dir, data, broken, "--resume", "auto")],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    a, b = final_weights(whole), final_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert read_metrics(whole, "loss") == pytest.approx(read_metrics(broken, "loss"), abs=1e-6)


def test_sigterm_writes_a_checkpoint_and_exits_0(tokenizer_dir, data, tmp_path):
    out = tmp_path / "out"
    proc = start(long_run_argv(tokenizer_dir, data, out, "--save_interval", "1000"))
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "continue with --resume auto" in stdout
    checkpoints = list((out / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1  # save_interval 1000: only the one SIGTERM asked for
    from checkpoint import load_checkpoint
    state = load_checkpoint(str(checkpoints[0]))
    # the step reached (0 if the signal came inside the first accumulation window: its start is saved)
    assert 0 <= state["step"] < 100 and not (out / "model.safetensors").exists()


def run_main(argv):
    import ddp_pretrain
    ddp_pretrain.main(argv)


def test_a_repeated_sigterm_waits_for_the_checkpoint_and_a_second_ctrl_c_does_not():
    from harness import StopRequest
    stop = StopRequest()
    try:
        signal.raise_signal(signal.SIGTERM)  # Slurm signals every process of the step ...
        signal.raise_signal(signal.SIGTERM)  # ... and torchrun forwards its own: still one request
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a user's second Ctrl-C: stop without the checkpoint
    finally:
        stop.restore()


def test_a_stop_inside_an_accumulation_window_checkpoints_its_start_and_resumes_exactly(
        tokenizer_dir, data, tmp_path, monkeypatch):
    import harness
    from checkpoint import load_checkpoint
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    argv = lambda out, *extra: pretrain_argv(tokenizer_dir, data, out, "--max_steps", "4",  # noqa: E731
                                             "--accumulation_steps", "4", "--batch_size", "2", *extra)
    run_main(argv(whole))
    micro_batches, count = [], harness.Run.count

    def count_and_signal(self, loss, loss_mask):
        count(self, loss, loss_mask)
        micro_batches.append(self.step)
        if len(micro_batches) == 6:  # the 2nd micro-batch of step 2's window: two SIGTERMs, as from Slurm
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(harness.Run, "count", count_and_signal)
    run_main(argv(broken))
    assert len(micro_batches) == 6  # it stopped after that micro-batch, not at the end of the window
    [saved] = (broken / "checkpoints").glob("step_*.pt")
    state = load_checkpoint(str(saved))
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (1, 0, 4)  # step 2's window is redone
    monkeypatch.undo()
    run_main(argv(broken, "--resume", "auto"))
    a, b = final_weights(whole), final_weights(broken)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert read_metrics(whole, "loss") == read_metrics(broken, "loss")


def test_corrupt_checkpoint_is_named_and_auto_falls_back(tokenizer_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = pretrain_argv(tokenizer_dir, data, out, "--max_steps", "12", "--save_interval", "4")
    run_main(argv)
    newest = sorted((out / "checkpoints").glob("step_*.pt"))[-1]  # keep_checkpoints 3: steps 4 and 8
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(SystemExit) as info:
        run_main(argv + ["--resume", str(newest)])
    assert str(newest) in info.value.code and "truncated or corrupt" in info.value.code

    run_main(argv + ["--resume", "auto"])
    captured = capsys.readouterr()
    assert f"{newest}: unreadable checkpoint" in captured.err
    assert "resumed from" in captured.out and "step_00000004.pt" in captured.out


def test_resume_refuses_another_model_or_tokenizer(tokenizer_dir, data, tmp_path):
    out = tmp_path / "out"
    argv = pretrain_argv(tokenizer_dir, data, out, "--max_steps", "6", "--save_interval", "3")
    run_main(argv)
    with pytest.raises(SystemExit) as info:
        run_main(argv + ["--resume", "auto", "--dim", "64"])
    assert "another model" in info.value.code and "dim: checkpoint 32 vs now 64" in info.value.code

    import shutil
    other = tmp_path / "other_tokenizer"  # same size, different file: the sha256 tells them apart
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as info:
        run_main(pretrain_argv(str(other), data, out, "--max_steps", "6", "--resume", "auto"))
    assert "another tokenizer" in info.value.code


def test_resume_refuses_weights_that_do_not_fit(tokenizer_dir, data, tmp_path):
    from checkpoint import list_checkpoints
    out = tmp_path / "out"
    argv = pretrain_argv(tokenizer_dir, data, out, "--max_steps", "6", "--save_interval", "3")
    run_main(argv)
    path = list_checkpoints(str(out))[0]
    state = torch.load(path, weights_only=False)
    state["model"]["extra.weight"] = state["model"].pop("norm.weight")
    torch.save(state, path)
    with pytest.raises(SystemExit) as info:
        run_main(argv + ["--resume", path])
    assert "weights do not fit" in info.value.code and "norm.weight" in info.value.code
    assert "extra.weight" in info.value.code


def test_one_nan_loss_skips_exactly_one_step(tokenizer_dir, data, tmp_path, monkeypatch, capsys):
    import k_model
    real_loss, calls = k_model.masked_cross_entropy, []

    def nan_on_fifth(logits, targets):  # the first call is the step-0 loss, before training
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss * float("nan") if len(calls) == 1 + 5 else loss
    monkeypatch.setattr(k_model, "masked_cross_entropy", nan_on_fifth)
    out = tmp_path / "out"
    run_main(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "8"))
    skipped = [m for m in map(json.loads, open(out / "metrics.jsonl")) if "skipped" in m]
    assert [m["step"] for m in skipped] == [5]
    losses = dict(read_metrics(out, "loss"))
    assert len(losses) == 8 and losses[5] != losses[5]  # step 5's loss is logged as NaN
    assert all(loss == loss for step, loss in losses.items() if step != 5)
    assert (out / "model.safetensors").exists()


def test_persistent_nan_stops_the_run_naming_the_last_checkpoint(tokenizer_dir, data, tmp_path, monkeypatch):
    import k_model
    real_loss, calls = k_model.masked_cross_entropy, []

    def nan_from_seventh(logits, targets):
        calls.append(1)
        return real_loss(logits, targets) * (float("nan") if len(calls) >= 1 + 7 else 1.0)  # 1: step 0
    monkeypatch.setattr(k_model, "masked_cross_entropy", nan_from_seventh)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run_main(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "50", "--save_interval", "4",
                               "--max_nonfinite_steps", "3"))
    assert "step 9: 3 non-finite steps in a row" in info.value.code
    assert "step_00000008.pt" in info.value.code  # skipped steps left the weights as they were


def test_unwritable_or_full_out_dir_is_reported_before_training(tokenizer_dir, data, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        run_main(pretrain_argv(tokenizer_dir, data, blocker / "out"))
    assert str(blocker / "out") in info.value.code and "cannot write" in info.value.code

    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit) as info:
        run_main(pretrain_argv(tokenizer_dir, data, tmp_path / "out"))
    assert "GiB free" in info.value.code
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def wait_for_training_log(out, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    raise AssertionError("no training step was logged")


def test_torchrun_resume_after_a_double_sigterm_matches_the_uninterrupted_run(tokenizer_dir, data, tmp_path):
    """Slurm's scancel or preemption: SIGTERM to every process of the step, then torchrun forwards its own.
    (kill -9 of a rank under torchrun, then --resume auto: test_faults.py's --max_restarts test.)"""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541")
    whole, terminated = tmp_path / "whole", tmp_path / "terminated"
    argv = lambda out, *extra: long_run_argv(tokenizer_dir, data, out, "--max_steps", "60", *extra)  # noqa: E731
    done = subprocess.run([*torchrun, TRAIN, *argv(whole)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = start(argv(terminated, "--save_interval", "1000"), launcher=torchrun)
    wait_for_training_log(terminated, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)  # the workers hold the pipes until they are done
    assert "KeyboardInterrupt" not in stderr and "continue with --resume auto" in stdout, stderr[-2000:]
    assert len(list((terminated / "checkpoints").glob("step_*.pt"))) == 1
    assert not (terminated / "model.safetensors").exists(), "the run finished before the signal"

    resumed = subprocess.run([*torchrun, TRAIN, *argv(terminated, "--resume", "auto")], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = final_weights(whole), final_weights(terminated)
    for key in a:  # the logged losses may not line up: a stop between two logs shortens the next window
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
