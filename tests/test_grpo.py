"""GRPO: the loss against a hand computation, no gradient when a group's rewards are equal, masks
that keep prompts and padding out, stops detected, rewards from the checkers, and a torchrun run on
2 gloo ranks equal to one process on the same requests."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl
from test_training import pretrain_argv, read_metrics

SYSTEM = {"role": "system", "content": "你是一个AI助手"}
POEM = "五言绝句《春晓》\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"


def request(content, form="五言绝句", keyword=None):
    meta = {"task": "keyword" if keyword else "form", "form": form, "title": "春晓", "keyword": keyword,
            "acrostic": None, "first_line": None}
    return {"messages": [SYSTEM, {"role": "user", "content": content}], "plain_prompt": content + "\n",
            "header_prompt": "五言绝句《春晓》\n", "reference": POEM, "meta": meta}


@pytest.fixture
def requests_file(tmp_path):
    records = [request("写一首五言绝句，题目是《春晓》。"), request("作五绝一首，要求出现“花”字。", keyword="花"),
               request("以《春晓》为题，作一首五绝。"), request("写一首五绝，诗中要用到“鸟”字。", keyword="鸟")] * 4
    return write_jsonl(tmp_path / "requests.jsonl", records)


def test_grpo_loss_equals_a_hand_computation():
    from ddp_grpo import grpo_loss
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    sampling = torch.tensor([[-1.2, -2.0, -0.5], [-0.2, -2.5, 0.0]])  # ratios e^0.2, 1, 1 and 1, e^-0.5
    reference = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -3.0, 0.0]])
    advantages = torch.tensor([0.5, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the third token is padding
    clip, beta = 0.1, 0.2

    def token(lp, s, ref, a):
        ratio = math.exp(lp - s)
        clipped = min(max(ratio, 1 - clip), 1 + clip)
        log_r = ref - lp
        return -min(ratio * a, clipped * a) + beta * (math.exp(log_r) - log_r - 1)
    # answer 1: ratio e^0.2 = 1.22 is clipped to 1.1 (a > 0: the smaller gain); answer 2: e^-0.5 = 0.61
    # with a < 0 is not clipped up (min picks 0.61 * -1 ... the larger loss of the two)
    per_answer = [sum(token(logp[i, t].item(), sampling[i, t].item(), reference[i, t].item(), advantages[i].item())
                      for t in range(2)) / 2 for i in range(2)]
    loss, kl = grpo_loss(logp, sampling, reference, advantages, mask, clip, beta)
    assert loss.item() == pytest.approx(sum(per_answer) / 2, rel=1e-6)
    expected_kl = [sum(math.exp(reference[i, t] - logp[i, t]) - (reference[i, t] - logp[i, t]) - 1 for t in range(2)) / 2
                   for i in range(2)]
    assert kl.tolist() == pytest.approx([float(k) for k in expected_kl], rel=1e-6)


def test_group_advantages_center_each_group_and_scale_on_request():
    from ddp_grpo import group_advantages
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    assert group_advantages(rewards, scale=False).view(-1).tolist() == pytest.approx([0.5, -0.5, 0, 0, 0, 0, 0, 0], abs=1e-7)
    scaled = group_advantages(rewards, scale=True)
    std = torch.tensor([1.0, 0.0, 0.5, 0.5]).std().item()
    assert scaled[0].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0, 0], rel=1e-5)
    assert scaled[1].abs().max() < 1e-3  # equal rewards: nothing to learn, and no division by 0


def tiny_policy(tokenizer, seed=0):
    from k_model import ModelConfig, Transformer
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer), max_seq_len=256))


def objective_for(tokenizer, requests_file, policy, **overrides):
    import copy
    from argparse import Namespace
    from ddp_grpo import DEFAULTS, GRPOObjective, RequestDataset
    args = Namespace(**{**DEFAULTS, "seed": 0, "group_size": 4, "max_new_tokens": 12, **overrides})
    dataset = RequestDataset(requests_file, tokenizer)
    return GRPOObjective(policy, copy.deepcopy(policy).eval(), dataset, args), dataset


NONE_PASSED = dict.fromkeys(("form", "rhyme", "keyword", "acrostic", "first_line"), 0)


def test_equal_rewards_give_no_gradient_without_kl(tokenizer, requests_file, monkeypatch):
    from ddp_grpo import GRPOObjective
    policy = tiny_policy(tokenizer)
    objective, dataset = objective_for(tokenizer, requests_file, policy, beta=0.0)
    monkeypatch.setattr(GRPOObjective, "rewards", lambda self, Y, answers, stopped: (
        torch.full((len(Y), self.args.group_size), 0.7), NONE_PASSED, NONE_PASSED))
    X, Y, _ = dataset.collate([dataset[i] for i in range(2)])
    loss = objective(policy, X, Y, {})
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.parameters())
    # the same answers with different rewards do move the policy
    policy.zero_grad()
    monkeypatch.setattr(GRPOObjective, "rewards", lambda self, Y, answers, stopped: (
        torch.arange(len(Y) * self.args.group_size, dtype=torch.float).view(len(Y), -1), NONE_PASSED, NONE_PASSED))
    objective(policy, X, Y, {}).backward()
    assert max(p.grad.abs().max() for p in policy.parameters() if p.grad is not None) > 0


def test_only_answer_tokens_are_trained(tokenizer, requests_file):
    from k_model import IGNORE_INDEX
    objective, dataset = objective_for(tokenizer, requests_file, tiny_policy(tokenizer))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [dataset[0][0], dataset[1][0]]
    answers = [tokenizer.encode("春眠不觉晓", add_special_tokens=False) + [im_end],
               tokenizer.encode("花", add_special_tokens=False)]  # the second never stopped
    inputs, targets = objective.batch(prompts, answers, "cpu")
    for row in range(2):
        trained = targets[row][targets[row] != IGNORE_INDEX].tolist()
        assert trained == answers[row]  # no prompt token, no padding
        first = int((targets[row] != IGNORE_INDEX).nonzero()[0])
        assert inputs[row, :first + 1].tolist() == prompts[row]  # each answer token follows its whole prefix


def test_the_policy_is_the_model_at_the_sampling_temperature(tokenizer, requests_file, monkeypatch):
    import ddp_grpo
    from k_model import IGNORE_INDEX
    policy = tiny_policy(tokenizer)
    objective, dataset = objective_for(tokenizer, requests_file, policy, beta=0.0, temperature=0.5)
    seen, original_loss, original_batch = {}, ddp_grpo.grpo_loss, objective.batch
    monkeypatch.setattr(ddp_grpo, "grpo_loss",  # rest: sampling, reference, advantages, mask, clip, beta
                        lambda logp, *rest: seen.update(logp=logp, reference=rest[1]) or original_loss(logp, *rest))
    monkeypatch.setattr(objective, "batch", lambda *a, **k: seen.setdefault("batch", original_batch(*a, **k)))
    X, Y, _ = dataset.collate([dataset[i] for i in range(2)])
    objective(policy, X, Y, {})
    inputs, targets = seen["batch"]
    logits = policy(inputs, all_logits=True).logits
    mask = targets != IGNORE_INDEX
    picked = targets.clamp(min=0)[..., None]
    at_half = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, picked)[..., 0]
    at_one = torch.log_softmax(logits, dim=-1).gather(-1, picked)[..., 0]
    assert torch.allclose(seen["logp"][mask], at_half[mask], atol=1e-5)  # softmax(logits / T): what was sampled from
    assert not torch.allclose(seen["logp"][mask], at_one[mask], atol=1e-3)
    assert torch.allclose(seen["reference"][mask], at_half[mask], atol=1e-5)  # the reference at the same temperature


def sft_chats_file(tmp_path):
    chats = [[SYSTEM, {"role": "user", "content": "写一首五言绝句，题目是《春晓》。"}, {"role": "assistant", "content": POEM}],
             [SYSTEM, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，很高兴见到你。"}]] * 3
    return write_jsonl(tmp_path / "sft.jsonl", chats)


def test_sft_coef_adds_the_sft_loss_of_sft_chats_to_the_same_answers_loss(tokenizer, requests_file, tmp_path, monkeypatch):
    from ddp_grpo import GRPOObjective
    from k_model import IGNORE_INDEX
    policy = tiny_policy(tokenizer)
    plain, dataset = objective_for(tokenizer, requests_file, policy, beta=0.0)
    with_sft, _ = objective_for(tokenizer, requests_file, policy, beta=0.0, sft_coef=0.5, sft_rows=3,
                                sft_data=sft_chats_file(tmp_path))
    drawn = []
    original = GRPOObjective.sft_rows
    monkeypatch.setattr(GRPOObjective, "sft_rows", lambda self: drawn.append(original(self)) or drawn[-1])
    X, Y, _ = dataset.collate([dataset[i] for i in range(2)])
    stats = {}
    loss = with_sft(policy, X, Y, stats)  # samples the same answers as `plain` (same seed, first call)
    assert len(drawn[0]) == 3
    nats, count = 0.0, 0
    for x, y in drawn[0]:
        trained = y[y != IGNORE_INDEX].tolist()
        assert tokenizer.decode(trained).endswith("<|im_end|>") and "写一首" not in tokenizer.decode(trained)  # the answer only
        logits = policy(x[None], y[None]).logits[0]
        nats += torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += len(trained)
    assert loss.item() == pytest.approx(plain(policy, X, Y, {}).item() + 0.5 * nats / count, rel=1e-4, abs=1e-5)
    assert (stats["sft"] / stats["weight"]).item() == pytest.approx(nats / count, rel=1e-4)


def test_sft_coef_names_a_missing_chat_file(tokenizer, tokenizer_dir, requests_file, tmp_path):
    import ddp_grpo
    model_dir = str(tmp_path / "sft")
    tiny_policy(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(SystemExit) as exit_info:
        ddp_grpo.main(["--data_path", requests_file, "--tokenizer_path", tokenizer_dir, "--device", "cpu",
                       "--pretrained_path", model_dir, "--sft_coef", "1", "--sft_data", str(tmp_path / "nope.jsonl")])
    assert str(exit_info.value).startswith("error: ") and "nope.jsonl" in str(exit_info.value)


def test_stops_are_read_from_the_generated_rows():
    from ddp_grpo import answers_and_stops
    stop = 9
    out = torch.tensor([[5, 6, stop, stop], [5, 6, 7, 8]])
    assert answers_and_stops(out, stop, max_new_tokens=4) == ([[5, 6, stop], [5, 6, 7, 8]], [True, False])
    # generation ended before the limit: every row had stopped, the last one at the step not returned
    assert answers_and_stops(out, stop, max_new_tokens=10) == ([[5, 6, stop], [5, 6, 7, 8, stop]], [True, True])


def test_rewards_are_the_requests_own_checks(tokenizer, requests_file):
    objective, dataset = objective_for(tokenizer, requests_file, tiny_policy(tokenizer), group_size=2)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    half = "五言绝句《春晓》\n春眠不觉晓，处处闻啼鸟。"
    answers = [encode(POEM), encode(half), encode(POEM), encode(POEM)]
    Y = torch.tensor([0, 1])  # a form request, then a keyword request (花)
    rewards, passed, asked = objective.rewards(Y, answers, [True, True, True, False])
    # form request: form and rhyme (少/鸟 rhyme); the half poem fails form and has no second couplet
    # keyword request: form, rhyme and 花; the last answer never stopped: 0
    assert rewards.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert asked["keyword"] == 2 and passed["keyword"] == 1 and asked["form"] == 4 and passed["form"] == 2


def test_max_char_uses_adds_a_check_against_leaning_on_one_character(tokenizer, requests_file):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    formula = "五言绝句《春晓》\n不是一千年，不知不可怜。\n不知人不得，花落一千年。"  # 不 five times; form and rhyme pass
    answers = [encode(POEM), encode(formula)]
    Y = torch.tensor([0])
    for limit, expected in ((0, [1.0, 1.0]), (2, [1.0, 2 / 3]), (5, [1.0, 1.0]), (4, [1.0, 2 / 3])):
        objective, _ = objective_for(tokenizer, requests_file, tiny_policy(tokenizer), group_size=2, max_char_uses=limit)
        rewards, passed, asked = objective.rewards(Y, answers, [True, True])
        assert rewards[0].tolist() == pytest.approx(expected), limit
        assert (asked.get("varied"), passed.get("varied")) == ((2, 2 - (expected[1] < 1)) if limit else (None, None))


def fixed_sample(self, X, Y):
    """GRPOObjective.sample with answers fixed by request and place in the group, not by rank or
    batch: a run on 2 ranks and a run in one process see the same answers."""
    g, tok = self.args.group_size, self.dataset.tokenizer
    mask = X != tok.pad_token_id
    prompts = [row[m].tolist() for row, m in zip(X, mask) for _ in range(g)]
    poems = ["春眠不觉晓，处处闻啼鸟。", "花落知多少", "夜来风雨声，花落知多少。", "鸟"]
    answers = [tok.encode(poems[(int(y) + j) % 4], add_special_tokens=False) + [self.stop_id] for y in Y for j in range(g)]
    return prompts, answers, [True] * len(answers)


FIXED_SAMPLE_RUN = """
import sys
sys.path[:0] = [{code!r}, {tests!r}]
import ddp_grpo
from test_grpo import fixed_sample
ddp_grpo.GRPOObjective.sample = fixed_sample
ddp_grpo.main(sys.argv[1:])
"""


def test_torchrun_on_two_ranks_equals_one_process_on_the_same_requests(tokenizer_dir, requests_file, tmp_path,
                                                                         monkeypatch):
    import ddp_pretrain
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s} for s in SENTENCES * 4])
    start = tmp_path / "start"
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, data, start, "--max_steps", "3", "--max_seq_len", "256"))
    script = tmp_path / "fixed_answers.py"
    script.write_text(FIXED_SAMPLE_RUN.format(code=CODE, tests=os.path.dirname(os.path.abspath(__file__))))

    def argv(out, batch_size):
        return ["--data_path", requests_file, "--tokenizer_path", tokenizer_dir, "--pretrained_path",
                str(start), "--out_dir", str(out), "--batch_size", str(batch_size), "--group_size", "4",
                "--learning_rate", "1e-3", "--warmup_iters", "1", "--max_steps", "3", "--log_interval", "1",
                "--save_interval", "1000", "--beta", "0.1", "--temperature", "0.7", "--device", "cpu", "--dtype", "float32",
                "--seed", "0"]
    import ddp_grpo
    monkeypatch.setattr(ddp_grpo.GRPOObjective, "sample", fixed_sample)
    ddp_grpo.main(argv(tmp_path / "one", 4))  # one process, 4 requests a step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                          str(script), *argv(tmp_path / "two", 2)], capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    moved = max((a[k] - load_file(str(start / "model.safetensors"))[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the fixed answers' rewards differ: training moved the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    rewards = [[v for _, v in read_metrics(tmp_path / run, "reward")] for run in ("one", "two")]
    assert len(rewards[0]) == 3 and rewards[0] == pytest.approx(rewards[1])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["n_layers"] == 2  # a plain model directory


def test_the_reward_does_not_let_one_character_rhyme_with_itself():
    from ddp_grpo import reward_checks
    from eval_model import score_answer
    meta = request("写一首五言绝句，题目是《春晓》。")["meta"]
    hack = "五言绝句《山行》\n古人无处处，一枝一枝飞。\n不是无人去，不知何处飞。"  # what a long run learned
    assert score_answer(hack, meta)["rhyme"] and not reward_checks(hack, meta)["rhyme"]
    assert reward_checks(POEM, meta) == score_answer(POEM, meta)  # 鸟 and 少: a real rhyme still counts


def test_a_group_of_one_is_refused(capsys):
    import ddp_grpo
    with pytest.raises(SystemExit):
        ddp_grpo.main(["--group_size", "1"])
    assert "--group_size must be >= 2" in capsys.readouterr().err
