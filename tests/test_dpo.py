"""DPO: the loss against a hand computation, log 2 when the reference is the policy, masks that
keep prompts and padding out, training that widens the margin (one process and torchrun), pairs
from the checkers, and the result exports like any model."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl
from test_training import pretrain_argv, read_metrics

CHAT = [{"role": "system", "content": "你是一个AI助手"}, {"role": "user", "content": "你好，今天天气怎么样？"}]


def test_dpo_loss_equals_a_hand_computation():
    from ddp_dpo import dpo_loss
    beta = 0.5
    policy_chosen, policy_rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -2.0])
    reference_chosen, reference_rejected = torch.tensor([-3.5, -9.0]), torch.tensor([-3.0, -2.5])
    losses, chosen_reward, rejected_reward = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                      reference_rejected, beta)
    # pair 1: rewards 0.5*0.5 = 0.25 and 0.5*-1 = -0.5, margin 0.75; pair 2: -0.5 and 0.25, margin -0.75
    expected = [-math.log(1 / (1 + math.exp(-0.75))), -math.log(1 / (1 + math.exp(0.75)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen_reward.tolist() == pytest.approx([0.25, -0.5]) and rejected_reward.tolist() == pytest.approx([-0.5, 0.25])


def test_sequence_logps_sums_the_trained_tokens_only():
    from ddp_dpo import sequence_logps
    from k_model import IGNORE_INDEX
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    Y = torch.tensor([[IGNORE_INDEX, 3, 5, IGNORE_INDEX], [1, IGNORE_INDEX, IGNORE_INDEX, 6]])
    logp = torch.log_softmax(logits, dim=-1)
    expected = [logp[0, 1, 3] + logp[0, 2, 5], logp[1, 0, 1] + logp[1, 3, 6]]
    assert sequence_logps(logits, Y).tolist() == pytest.approx([float(e) for e in expected], rel=1e-6)


@pytest.fixture
def pairs_file(tmp_path):
    records = [{"prompt": CHAT, "chosen": "今天是晴天，很好。", "rejected": "下雨"},
               {"prompt": CHAT[:1] + [{"role": "user", "content": "写一句诗。"}], "chosen": "床前明月光。",
                "rejected": "我不知道你在说什么，真的不知道。"}] * 8
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def test_preference_rows_train_only_the_answers(tokenizer, pairs_file):
    from dataset import PreferenceDataset
    from k_model import IGNORE_INDEX
    dataset = PreferenceDataset(pairs_file, tokenizer, max_length=256)
    X, Y, mask = PreferenceDataset.collate([dataset[0], dataset[1]])
    assert X.shape[0] == 4  # chosen of pair 0 and 1, then rejected of pair 0 and 1
    answers = ["今天是晴天，很好。", "床前明月光。", "下雨", "我不知道你在说什么，真的不知道。"]
    for row, answer in zip(range(4), answers):
        trained = Y[row][Y[row] != IGNORE_INDEX].tolist()
        # exactly the answer and the <|im_end|> that closes it: no prompt, no padding
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert mask[row].sum() == len(trained)
    assert X.shape[1] == int((Y != IGNORE_INDEX).nonzero()[:, 1].max()) + 1  # padding columns cut


def tiny_model(tokenizer, seed=0):
    from k_model import ModelConfig, Transformer
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer), max_seq_len=256))


def test_a_reference_identical_to_the_policy_gives_log_2_and_no_margin(tokenizer, pairs_file):
    import copy
    from dataset import PreferenceDataset
    from ddp_dpo import DPOObjective
    from harness import Dist, mean_stats
    dataset = PreferenceDataset(pairs_file, tokenizer, max_length=256)
    policy = tiny_model(tokenizer)
    objective = DPOObjective(copy.deepcopy(policy).eval(), beta=0.1)
    X, Y, _ = PreferenceDataset.collate([dataset[i] for i in range(4)])
    stats = {}
    loss = objective(policy.eval(), X, Y, stats)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    means = mean_stats(stats, Dist("cpu"))
    assert means["reward_margin"] == pytest.approx(0, abs=1e-6) and means["kl"] == pytest.approx(0, abs=1e-5)
    assert means["reward_accuracy"] == 0  # no pair's margin is positive yet
    loss.backward()  # the gradient flows to the policy only
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in objective.reference.parameters())


@pytest.fixture
def sft_model(tokenizer_dir, tmp_path):
    """A tiny model, pretrained a few steps: the start of the policy and the reference."""
    import ddp_pretrain
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s} for s in SENTENCES * 4])
    out = tmp_path / "sft"
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, data, out, "--max_steps", "5", "--max_seq_len", "256"))
    return str(out)


def dpo_argv(tokenizer_dir, sft_model, pairs_file, out, *extra):
    return ["--data_path", pairs_file, "--val_data_path", pairs_file, "--tokenizer_path", tokenizer_dir,
            "--pretrained_path", sft_model, "--out_dir", str(out), "--batch_size", "4", "--learning_rate", "1e-3",
            "--warmup_iters", "1", "--max_steps", "12", "--log_interval", "2", "--eval_interval", "12",
            "--save_interval", "1000", "--beta", "0.1", "--device", "cpu", "--dtype", "float32", "--seed", "0", *extra]


def test_dpo_training_prefers_the_chosen_answers(tokenizer_dir, sft_model, pairs_file, tmp_path):
    import ddp_dpo
    from k_model import load_model
    out = tmp_path / "dpo"
    ddp_dpo.main(dpo_argv(tokenizer_dir, sft_model, pairs_file, out))
    (step0, loss0), = read_metrics(out, "loss", first_step=0)[:1]
    assert step0 == 0 and loss0 == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert read_metrics(out, "val_loss", first_step=0)[0][1] == pytest.approx(math.log(2), abs=1e-5)
    margins = [m for _, m in read_metrics(out, "reward_margin")]
    assert len(margins) == 6 and margins[-1] > margins[0] > 0
    (_, val_loss), = read_metrics(out, "val_loss")
    (_, val_accuracy), = read_metrics(out, "val_reward_accuracy")
    (_, val_kl), = read_metrics(out, "val_kl")
    assert val_loss < math.log(2) - 0.1 and val_accuracy == 1.0 and val_kl > 0
    load_model(str(out))  # a plain model directory, like SFT's


def test_dpo_under_torchrun(tokenizer_dir, sft_model, pairs_file, tmp_path):
    out = tmp_path / "dpo2"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                          os.path.join(CODE, "ddp_dpo.py"), *dpo_argv(tokenizer_dir, sft_model, pairs_file, out, "--batch_size", "2")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    margins = [m for _, m in read_metrics(out, "reward_margin")]
    assert margins[-1] > margins[0] > 0 and (out / "model.safetensors").is_file()


def test_the_dpo_model_exports_to_hugging_face(tokenizer_dir, sft_model, pairs_file, tmp_path):
    import ddp_dpo
    import export_model
    from transformers import AutoModelForCausalLM
    out = tmp_path / "dpo"
    ddp_dpo.main(dpo_argv(tokenizer_dir, sft_model, pairs_file, out, "--max_steps", "2"))
    export_model.main(["--checkpoint", str(out), "--save_dir", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_hidden_layers == 2


def test_best_and_worst_answers_make_the_pair():
    from make_preferences import best_and_worst
    meta = {"task": "form", "form": "五言绝句", "title": "春晓", "keyword": None, "acrostic": None, "first_line": None}
    good = "五言绝句《春晓》\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"
    bad = "五言绝句《春晓》\n春眠不觉晓，处处闻啼鸟。"  # half a poem: wrong form
    chosen, rejected, chosen_score, rejected_score = best_and_worst([bad, good], [True, True], meta)
    assert (chosen, rejected) == (good, bad) and chosen_score > rejected_score
    # the same score for every answer: no pair
    assert best_and_worst([good, good], [True, True], meta) is None
    # an answer that never stopped scores 0, however good its text
    other = "五言绝句《春晓》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert best_and_worst([good, other], [False, True], meta)[:2] == (other, good)
