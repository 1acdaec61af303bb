"""run_demo.sh --seed N: the seed reaches every stage. The same seed twice gives the same demo
files, token file and losses; another seed gives others, while the held-out poems stay."""
import os
import shutil

import pytest

from conftest import CODE
from test_poetry import as_package_poem, make_tarball, quantangshi, synthetic_poems

TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64",
        "--batch_size", "4", "--accumulation_steps", "1", "--warmup_iters", "2", "--log_interval", "1",
        "--eval_interval", "0", "--save_interval", "0", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    poems = synthetic_poems(n_per_form=60)
    return make_tarball(tmp_path_factory.mktemp("npm") / "p.tgz", {quantangshi(0): [as_package_poem(p) for p in poems]})


def demo_run(root, tarball, seed, monkeypatch):
    """The demo's first five stages, tiny, in root: what each stage wrote."""
    import ddp_pretrain
    import ddp_sft
    import deal_dataset
    import poetry
    from pretokenize import pretokenize
    from test_training import read_metrics
    from train_tokenizer import train_tokenizer
    data, tok = root / "data", str(root / "tok")
    data.mkdir(parents=True)
    shutil.copy(tarball, data / poetry.TARBALL)
    monkeypatch.setattr(poetry, "SHA256", poetry.sha256_of(tarball))
    deal_dataset.build_demo(str(data), seed=seed)
    train_tokenizer([str(data / "demo_pretrain.jsonl"), str(data / "demo_sft.jsonl")], tok, vocab_size=500,
                    split_cjk=True)
    pretokenize(str(data / "demo_pretrain.jsonl"), tok, str(data / "train.bin"), num_proc=1)
    ddp_pretrain.main(["--data_path", str(data / "train.bin"), "--tokenizer_path", tok, "--out_dir", str(root / "pre"),
                       "--max_steps", "6", "--learning_rate", "3e-3", "--seed", str(seed), *TINY])
    ddp_sft.main(["--data_path", str(data / "demo_sft.jsonl"), "--tokenizer_path", tok, "--pretrained_path",
                  str(root / "pre"), "--out_dir", str(root / "sft"), "--max_steps", "4", "--learning_rate", "3e-3",
                  "--pack_chats", "--seed", str(seed), *TINY])

    def read(name):
        with open(data / name, "rb") as f:
            return f.read()
    return {"files": {name: read(name) for name in ("demo_pretrain.jsonl", "demo_sft.jsonl", "demo_eval.jsonl",
                                                    "demo_pretrain_val.jsonl", "train.bin")},
            "pretrain": read_metrics(root / "pre", "loss"), "sft": read_metrics(root / "sft", "loss")}


def test_one_seed_repeats_every_stage_and_another_differs(tmp_path, tarball, monkeypatch):
    first = demo_run(tmp_path / "a", tarball, 1, monkeypatch)
    again = demo_run(tmp_path / "b", tarball, 1, monkeypatch)
    other = demo_run(tmp_path / "c", tarball, 2, monkeypatch)
    assert first == again
    for name in ("demo_pretrain.jsonl", "demo_sft.jsonl", "train.bin"):
        assert first["files"][name] != other["files"][name], name
    # the same test for every seed: held-out poems and eval requests depend on poetry.SPLIT_SEED only
    for name in ("demo_eval.jsonl", "demo_pretrain_val.jsonl"):
        assert first["files"][name] == other["files"][name], name
    assert first["pretrain"] != other["pretrain"] and first["sft"] != other["sft"]
    assert len(first["pretrain"]) == 6 and len(first["sft"]) == 4


def test_run_demo_passes_the_seed_to_every_stage():
    with open(os.path.join(CODE, "run_demo.sh"), encoding="utf-8") as f:
        script = f.read()
    for stage in ("deal_dataset.py", "ddp_pretrain.py", "ddp_sft.py", "eval_model.py", "model_sample.py --mode pretrain",
                  "model_sample.py --mode chat"):
        command = script[script.index(stage):].split("\n  stage ")[0].split("\nstage ")[0]
        logical = command.replace("\\\n", " ").split("\n")[0]
        assert '--seed "$SEED"' in logical, stage
