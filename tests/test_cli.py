"""What a new user meets first: every flag of every script has a help that names its default,
bad values stop with one line that says what to do, and sampling prints no false alarm."""
import argparse
import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE

SCRIPTS = ["train_tokenizer", "deal_dataset", "pretokenize", "ddp_pretrain", "ddp_sft", "model_sample",
           "export_model", "report", "bench_train", "bench_generate", "gpu_check", "serve", "eval_model", "poetry",
           "ddp_dpo", "ddp_grpo", "make_preferences", "checkpoint", "cuda_env"]


class Captured(Exception):
    pass


def script_parser(name, monkeypatch):
    """The parser a script's main() builds, caught when it parses."""
    caught = []

    def capture(self, *args, **kwargs):
        caught.append(self)
        raise Captured
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Captured):
        importlib.import_module(name).main([])
    return caught[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_help_that_names_its_default(name, monkeypatch):
    parser = script_parser(name, monkeypatch)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{name}: {action.option_strings} has no help"
        has_default = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
        if has_default and action.dest != "api_key":
            shown = parser._get_formatter()._get_help_string(action) % dict(vars(action), prog=parser.prog)
            assert "default" in shown, f"{name}: {action.option_strings} does not say its default"
    assert "usage:" in text


def test_choices_are_listed_for_preset_and_dtype(monkeypatch):
    parser = script_parser("ddp_pretrain", monkeypatch)
    actions = {a.dest: a for a in parser._actions}
    assert set(actions["preset"].choices) == {"chapter", "demo"}
    assert "float32" in actions["dtype"].choices and "float8" not in actions["dtype"].choices


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(CODE, script), *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TRANSFORMERS_VERBOSITY="warning"))


def test_bad_sizes_and_dtypes_stop_with_one_line(tokenizer_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好"}\n')
    done = run("ddp_pretrain.py", "--preset", "demo", "--dim", "100", "--tokenizer_path", tokenizer_dir,
               "--data_path", str(data), "--out_dir", str(tmp_path / "o"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "dim 100 is not a multiple of n_heads 8" in done.stderr
    done = run("ddp_pretrain.py", "--dtype", "float8")
    assert done.returncode == 2 and "invalid choice: 'float8'" in done.stderr and "float32" in done.stderr


def test_sampling_refuses_a_negative_temperature_and_a_checkpoint_file_without_tokenizer(tmp_path, tiny_config, capsys):
    import model_sample  # in this process: the same exits as from the command line, without two interpreter starts

    def exit_message(*argv):
        with pytest.raises(SystemExit) as exit_:
            model_sample.main(list(argv))
        assert exit_.value.code not in (0, None)
        return str(exit_.value.code) + capsys.readouterr().err
    assert "temperature -1.0 < 0" in exit_message("--temperature", "-1")
    from k_model import Transformer
    with pytest.raises(ValueError, match="top_p"):
        Transformer(tiny_config).generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, top_p=0.0)
    fake = tmp_path / "step_00000010.pt"
    fake.write_bytes(b"not used")
    message = exit_message("--checkpoint", str(fake))
    assert "add --tokenizer_path tokenizer_k" in message
    assert "train_tokenizer.py" not in message  # the old, misleading advice


def test_sampling_a_model_directory_prints_no_model_type_warning(tokenizer_dir, tiny_config, tmp_path):
    """Loading the tokenizer from a model directory used to warn "model of type 'Tiny-K' ... type ''"."""
    import shutil
    from k_model import Transformer
    model_dir = tmp_path / "model"
    Transformer(tiny_config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), model_dir)
    done = run("model_sample.py", "--checkpoint", str(model_dir), "--prompt", "你好", "--max_new_tokens", "4",
               "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model of type" not in done.stderr and "model of type" not in done.stdout
