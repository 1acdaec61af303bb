"""Training scripts: the loss goes down, DDP equals one process, SFT learns to end its turn,
bad input stops with a one-line error."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl

TINY_MODEL = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "32"]


def pretrain_argv(tokenizer_dir, data_path, out_dir, *extra):
    return ["--data_path", str(data_path), "--tokenizer_path", tokenizer_dir, "--out_dir", str(out_dir),
            *TINY_MODEL, "--batch_size", "4", "--accumulation_steps", "1", "--learning_rate", "3e-3",
            "--warmup_iters", "2", "--max_steps", "20", "--log_interval", "1", "--eval_interval", "1000",
            "--save_interval", "1000", "--device", "cpu", "--dtype", "float32", "--seed", "0", *extra]


def read_metrics(out_dir, key, first_step=1):
    """(step, value) of the logged key; from step 1 unless asked (step 0 is the loss before training)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(m["step"], m[key]) for m in map(json.loads, f) if key in m and m["step"] >= first_step]


@pytest.fixture
def pretrain_data(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s} for s in SENTENCES * 4])


def test_pretraining_lowers_the_loss_and_saves_everything(tokenizer_dir, pretrain_data, tmp_path):
    import ddp_pretrain
    from k_model import load_model
    out = tmp_path / "out"
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, pretrain_data, out, "--max_steps", "30",
                                    "--val_data_path", pretrain_data, "--eval_interval", "10"))
    losses = [loss for _, loss in read_metrics(out, "loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    val_losses = [loss for _, loss in read_metrics(out, "val_loss")]
    assert len(val_losses) == 3 and val_losses[-1] < val_losses[0]
    # step 0, before any update: the curves show where training starts, with lr 0
    (step0, loss0), = read_metrics(out, "loss", first_step=0)[:1]
    # the first step trains on the same first batch: its logged (pre-update) loss is the step-0 loss
    assert step0 == 0 and loss0 == pytest.approx(losses[0], rel=1e-5)
    assert read_metrics(out, "lr", first_step=0)[0] == (0, 0.0)
    assert read_metrics(out, "val_loss", first_step=0)[0][0] == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = load_model(str(out))
    assert model.config.dim == 32 and model.config.n_layers == 2


def test_swanlab_logs_offline_without_an_account(tokenizer_dir, pretrain_data, tmp_path, monkeypatch):
    import ddp_pretrain
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    out = tmp_path / "out"
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, pretrain_data, out, "--max_steps", "2", "--use_swanlab"))
    runs = list((out / "swanlog").glob("run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.swanlab"))


def test_last_partial_accumulation_window_is_trained(tokenizer_dir, tmp_path):
    import ddp_pretrain
    data = write_jsonl(tmp_path / "five.jsonl", [{"text": s} for s in SENTENCES[:5]])
    out = tmp_path / "out"
    argv = pretrain_argv(tokenizer_dir, data, out, "--max_steps", "-1", "--epochs", "1", "--batch_size", "1",
                         "--accumulation_steps", "2")
    ddp_pretrain.main(argv)
    # 5 micro-batches with 2 per step: two full windows and a last one of a single micro-batch
    assert [step for step, _ in read_metrics(out, "loss")] == [1, 2, 3]


def run_script(args, env_extra=None, timeout=240):
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


DDP_GRADIENTS = """
import json, sys
sys.path.insert(0, {code!r})
import ddp_pretrain
train = ddp_pretrain.train

def train_and_look_at_the_gradients(*args, **kwargs):
    model = train(*args, **kwargs)
    grads = [p.grad for p in model.parameters()]
    storages = {{g.untyped_storage().data_ptr() for g in grads if g is not None}}
    with open({out!r} + __import__("os").environ["RANK"], "w") as f:
        json.dump({{"params": len(grads), "none": sum(g is None for g in grads), "storages": len(storages)}}, f)
    return model

ddp_pretrain.train = train_and_look_at_the_gradients
ddp_pretrain.main(sys.argv[1:])
"""



def test_torchrun_two_processes_equal_one_process_with_double_accumulation(tokenizer_dir, pretrain_data, tmp_path):
    """Each rank takes every other sample: 2 ranks x 2 micro-batches cover the same samples as
    1 rank x 4, and DDP's gradient average equals the single process's accumulation."""
    common = ["--batch_size", "1", "--max_steps", "4", "--val_data_path", pretrain_data, "--eval_interval", "4",
              "--eval_iters", "-1"]
    single = run_script([sys.executable, os.path.join(CODE, "ddp_pretrain.py"),
                         *pretrain_argv(tokenizer_dir, pretrain_data, tmp_path / "one", *common,
                                        "--accumulation_steps", "4")])
    assert single.returncode == 0, single.stderr[-2000:]
    script = tmp_path / "look.py"  # ddp_pretrain.py, reporting the gradients after training
    script.write_text(DDP_GRADIENTS.format(code=CODE, out=str(tmp_path / "grads_")))
    double = run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29517", str(script),
                         *pretrain_argv(tokenizer_dir, pretrain_data, tmp_path / "two", *common,
                                        "--accumulation_steps", "2")])
    assert double.returncode == 0, double.stderr[-2000:]
    assert "2 process(es)" in double.stdout
    assert "broadcast_buffers" not in double.stderr  # torch 2.13's deprecation warning is not printed
    # gradient_as_bucket_view saves a copy of the gradients only while they are zeroed in place: set to
    # None, the next backward allocates them anew (the +4 bytes a parameter that --dry_run leaves out)
    for rank in "01":
        seen = json.loads((tmp_path / f"grads_{rank}").read_text())
        assert seen["none"] == 0  # after 4 steps of 2 micro-batches, every gradient is still there ...
        assert seen["storages"] <= 2 < seen["params"]  # ... inside one or two buckets, not one tensor each

    one, two = read_metrics(tmp_path / "one", "loss"), read_metrics(tmp_path / "two", "loss")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    (_, val_one), = read_metrics(tmp_path / "one", "val_loss")
    (_, val_two), = read_metrics(tmp_path / "two", "val_loss")
    assert val_one == pytest.approx(val_two, rel=1e-4)

    from k_model import load_model
    w_one = load_model(str(tmp_path / "one")).state_dict()
    w_two = load_model(str(tmp_path / "two")).state_dict()
    for key in w_one:
        torch.testing.assert_close(w_one[key], w_two[key], atol=1e-5, rtol=1e-4)


CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，很高兴见到你。"}],
    [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是Tiny-K。"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how are you?"}],
    [{"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"},
     {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气。"}],
]


def test_sft_learns_to_answer_and_end_its_turn(tokenizer_dir, pretrain_data, tmp_path):
    import ddp_pretrain
    import ddp_sft
    from model_sample import TextGenerator
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, pretrain_data, tmp_path / "pre", "--max_steps", "5",
                                    "--max_seq_len", "80"))
    sft_data = write_jsonl(tmp_path / "sft.jsonl", CHATS * 4)
    ddp_sft.main(["--data_path", sft_data, "--tokenizer_path", tokenizer_dir, "--pretrained_path",
                  str(tmp_path / "pre"), "--out_dir", str(tmp_path / "sft"), "--batch_size", "16",
                  "--accumulation_steps", "1", "--learning_rate", "3e-3", "--warmup_iters", "5",
                  "--max_steps", "150", "--log_interval", "10", "--device", "cpu"])
    losses = [loss for _, loss in read_metrics(tmp_path / "sft", "loss")]
    assert losses[-1] < 0.1 * losses[0]

    generator = TextGenerator(str(tmp_path / "sft"))
    for chat in CHATS[:3]:
        answer, stopped = generator.chat(chat[0]["content"], temperature=0.0, max_new_tokens=30,
                                         return_stopped=True)
        assert stopped, f"no <|im_end|> after {answer!r}"
        assert answer == chat[1]["content"]


# ---------------------------------------------------------------- bad input: one-line errors

def exit_message(main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, str), "expected an error message, not a bare exit code"
    return info.value.code


def test_missing_data_file_is_named(tokenizer_dir, tmp_path):
    import ddp_pretrain
    missing = tmp_path / "nope.jsonl"
    message = exit_message(ddp_pretrain.main, pretrain_argv(tokenizer_dir, missing, tmp_path / "out"))
    assert str(missing) in message and "not found" in message
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_named(pretrain_data, tmp_path):
    import ddp_pretrain
    missing = str(tmp_path / "no_tokenizer")
    message = exit_message(ddp_pretrain.main, pretrain_argv(missing, pretrain_data, tmp_path / "out"))
    assert missing in message and "train_tokenizer" in message


def test_data_without_usable_lines_is_refused(tokenizer_dir, tmp_path):
    import ddp_pretrain
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"text": ""}, {"title": "no text"}])
    message = exit_message(ddp_pretrain.main, pretrain_argv(tokenizer_dir, bad, tmp_path / "out"))
    assert bad in message and "no usable line" in message


def test_sft_refuses_a_checkpoint_of_another_architecture(tokenizer_dir, pretrain_data, tmp_path):
    import ddp_pretrain
    import ddp_sft
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, pretrain_data, tmp_path / "pre", "--max_steps", "1"))
    sft_data = write_jsonl(tmp_path / "sft.jsonl", CHATS)
    argv = ["--data_path", sft_data, "--tokenizer_path", tokenizer_dir, "--pretrained_path", str(tmp_path / "pre"),
            "--out_dir", str(tmp_path / "sft"), "--device", "cpu"]
    message = exit_message(ddp_sft.main, argv + ["--preset", "demo"])
    assert str(tmp_path / "pre") in message
    assert f"dim: checkpoint 32 vs requested {ddp_pretrain.PRESETS['demo']['dim']}" in message
    message = exit_message(ddp_sft.main, argv[:5] + [str(tmp_path / "missing")] + argv[6:])
    assert str(tmp_path / "missing") in message and "config.json" in message

    import shutil
    other = tmp_path / "other_tokenizer"  # same vocabulary size, different merges
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    message = exit_message(ddp_sft.main, argv[:3] + [str(other)] + argv[4:])
    assert "pretrained with another tokenizer" in message


def test_script_error_is_one_line_without_traceback(tmp_path):
    result = run_script([sys.executable, os.path.join(CODE, "ddp_pretrain.py"), "--data_path",
                         str(tmp_path / "missing.jsonl"), "--tokenizer_path", str(tmp_path)])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_repeat_unlikelihood_penalises_the_previous_token_where_the_answer_does_not_repeat_it():
    from ddp_sft import repeat_unlikelihood
    from k_model import IGNORE_INDEX
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    X = torch.tensor([[1, 2, 2, 3], [4, 4, 5, 6]])
    Y = torch.tensor([[2, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 5, 5, 1]])
    p = logits.softmax(-1)
    # kept: answer positions whose next token is not the current one; (0, 1) and (1, 2) repeat (青青), (0, 3) and (1, 0) are ignored
    kept = [(0, 0), (0, 2), (1, 1), (1, 3)]
    expected = sum(-torch.log(1 - p[i, j, X[i, j]]) for i, j in kept) / len(kept)
    assert repeat_unlikelihood(logits, X, Y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert repeat_unlikelihood(logits, X, torch.full_like(Y, IGNORE_INDEX)).item() == 0


def test_sft_objective_adds_the_weighted_unlikelihood_and_logs_the_cross_entropy():
    from ddp_sft import repeat_unlikelihood, sft_objective
    from harness import lm_loss
    from k_model import ModelConfig, Transformer
    assert sft_objective(0.0) is lm_loss  # weight 0: exactly the chapter's loss
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16))
    X = torch.randint(0, 50, (2, 8))
    Y = torch.roll(X, -1, dims=1)
    stats = {}
    loss = sft_objective(2.0)(model, X, Y, stats)
    out = model(X, Y)
    assert loss.item() == pytest.approx((out.loss + 2.0 * repeat_unlikelihood(out.logits, X, Y)).item(), rel=1e-5)
    assert (stats["loss_sum"] / stats["weight"]).item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert stats["unlikelihood"].item() > 0


def test_sft_refuses_a_negative_unlikelihood_weight(capsys):
    import ddp_sft
    with pytest.raises(SystemExit) as exit_:
        ddp_sft.main(["--unlikelihood", "-1"])
    assert exit_.value.code == 2 and "--unlikelihood must be >= 0" in capsys.readouterr().err
