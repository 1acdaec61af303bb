"""The poetry eval: the checkers on hand-made answers, rhyme on known poems, bits per
character against a hand computation, stop detection, and the CLI end to end."""
import json
import math
import os
import random
import shutil

import pytest
import torch

import eval_model
from eval_model import (acrostic_ok, answer_score, bits_per_char, bits_per_char_from_nats, check_form,
                        first_line_ok, generate_batch, keyword_ok, parse_answer_lines, random_lines, rhymes,
                        answer_body, has_repeat, header_of, most_uses, score_answer, summarize)
from k_model import ModelConfig, Transformer
from model_sample import TextGenerator
from poetry import eval_records, poem_text
from test_poetry import synthetic_poems

JINGYESI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
DENGGAO = ("风急天高猿啸哀，渚清沙白鸟飞回。\n无边落木萧萧下，不尽长江滚滚来。\n"
           "万里悲秋常作客，百年多病独登台。\n艰难苦恨繁霜鬓，潦倒新停浊酒杯。")


# ---------------------------------------------------------------- checkers

def test_parse_answer_lines_cuts_at_any_mark_and_line_break():
    assert parse_answer_lines(" 床前明月光,疑是 地上霜.\n举头望明月！低头思故乡？\n\n") == \
        ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]
    assert parse_answer_lines("") == []


@pytest.mark.parametrize("text, form, ok", [
    (JINGYESI, "五言绝句", True),
    ("床前明月光\n疑是地上霜\n举头望明月\n低头思故乡", "五言绝句", True),  # line breaks for marks
    (JINGYESI, "七言绝句", False),
    (JINGYESI, "五言律诗", False),
    (DENGGAO, "七言律诗", True),
    (DENGGAO.split("\n", 2)[2], "七言律诗", False),                       # 4 lines of 8
    ("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n床前明月光，", "五言绝句", False),  # a fifth line
    ("床前明月光，疑是地上霜。\n举头望明月，低头思故乡里。", "五言绝句", False),  # 6 characters
    ("床前明月a，疑是地上霜。\n举头望明月，低头思故乡。", "五言绝句", False),     # not CJK
    ("床前明月光疑是地上霜举头望明月低头思故乡", "五言绝句", False),            # no line ends
])
def test_check_form(text, form, ok):
    assert check_form(text, form) is ok


@pytest.mark.parametrize("poem", [
    JINGYESI,                                                # 霜 乡: ang
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",          # 流 楼: iou / ou
    "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",          # 鸟 少: iao / ao
    DENGGAO,                                                 # 回 来 台 杯: uei with ai (灰)
    "登高迎送远，春恨并依依。\n不得沧洲信，空看白鹤归。",          # 依 归: i with uei (微)
])
def test_real_poems_rhyme(poem):
    assert rhymes(parse_answer_lines(poem))


@pytest.mark.parametrize("lines", [
    ["床前明月光", "疑是地上霜", "举头望明月", "低头思故水"],          # 霜 水
    ["青山横北郭", "白水绕东城", "此地一为别", "孤蓬万里征", "浮云游子意", "落日故人情", "挥手自兹去", "萧萧班马月"],
    ["床前明月光", "疑是地上霜"],                                       # one even line is no rhyme
    ["床前明月光", "疑是地上a", "举头望明月", "低头思故a"],              # not characters
])
def test_lines_that_do_not_rhyme(lines):
    assert not rhymes(lines)


def test_keyword_acrostic_and_first_line():
    assert keyword_ok(JINGYESI, "霜") and not keyword_ok(JINGYESI, "雪")
    assert acrostic_ok(JINGYESI, "床疑举低")
    assert not acrostic_ok(JINGYESI, "床举疑低")                       # order matters
    assert not acrostic_ok(JINGYESI, "床疑举")                          # one line too many
    assert not acrostic_ok(JINGYESI + "\n明月，", "床疑举低")
    assert first_line_ok(JINGYESI, "床前明月光") and not first_line_ok(JINGYESI, "疑是地上霜")
    assert not first_line_ok("", "床前明月光")


def test_score_answer_checks_only_what_was_asked():
    meta = {"task": "acrostic", "form": "五言绝句", "title": "静夜思", "keyword": None, "acrostic": "床疑举低",
            "first_line": None}
    checks = score_answer(JINGYESI, meta)
    assert checks == {"form": True, "rhyme": True, "keyword": None, "acrostic": True, "first_line": None}
    assert answer_score(checks) == 1.0
    bad = score_answer("床前明月光，疑是地上霜。", {**meta, "acrostic": "春江花月"})
    assert bad["form"] is False and bad["acrostic"] is False and answer_score(bad) == 0.0
    assert answer_score({"form": True, "rhyme": False, "keyword": True}) == pytest.approx(2 / 3)


def test_summarize_counts_each_rate_over_the_requests_that_ask_for_it():
    base = {"form": "五言绝句", "title": "t", "keyword": None, "acrostic": None, "first_line": None}
    ask = [{"role": "user", "content": "写一首五言绝句。"}]
    records = [{"meta": {**base, "task": "keyword", "keyword": "霜"}, "messages": ask},
               {"meta": {**base, "task": "keyword", "keyword": "雪"}, "messages": ask},
               {"meta": {**base, "task": "form"}, "messages": ask},
               {"meta": {**base, "task": "form", "form": "七言绝句"}, "messages": ask}]
    m = summarize([JINGYESI] * 4, records, stopped=[True, False, True, True])
    assert m["form_accuracy"] == 0.75 and m["keyword_rate"] == 0.5 and m["stop_rate"] == 0.75
    assert m["acrostic_accuracy"] is None and m["first_line_rate"] is None and m["rhyme_rate"] == 1.0
    assert m["form_accuracy_by_form"]["七言绝句"] == 0.0 and m["form_accuracy_by_form"]["五言律诗"] is None
    assert summarize([JINGYESI], records[:1])["stop_rate"] is None


def test_header_agreement_counts_form_names_and_asked_titles():
    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    meta = {"task": "form", "form": "五言绝句", "title": "静夜思", "keyword": None, "acrostic": None, "first_line": None}
    titled = {"meta": meta, "messages": [{"role": "user", "content": "写一首五言绝句，题目是《静夜思》。"}]}
    untitled = {"meta": {**meta, "task": "keyword", "keyword": "霜"},
                "messages": [{"role": "user", "content": "请写一首含有“霜”字的五绝。"}]}
    assert header_of("五言绝句《静夜思》\n" + poem) == ("五言绝句", "静夜思") and header_of(poem) == (None, None)
    answers = ["五言绝句《静夜思》\n" + poem,   # both right
               "五绝《春晓》\n" + poem,         # the short name counts; another title does not
               "七言绝句《静夜思》\n" + poem,   # wrong form, right title
               poem]                             # no header
    m = summarize(answers, [titled] * 4)
    assert m["header_form_rate"] == 0.5 and m["header_title_rate"] == 0.5
    # a request that names no title is answered under 无题
    m = summarize(["五言绝句《静夜思》\n" + poem, "五言律诗《秋》\n" + poem, "五绝《无题》\n" + poem],
                  [titled, untitled, untitled])
    assert m["header_form_rate"] == m["header_title_rate"] == round(2 / 3, 4)


def test_distinct_share_and_repeat_rate():
    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    records = [{"meta": {"form": "五言绝句", "title": "t", "keyword": None, "acrostic": None, "first_line": None},
                "messages": [{"role": "user", "content": "写诗"}]}] * 4
    # the same body under two headers is one distinct answer: a collapsed model copies titles too
    answers = ["五言绝句《甲》\n" + poem, "五言绝句《乙》\n" + poem, "一子无无，清尘不不开。", "青青河畔草。"]
    m = summarize(answers, records)
    assert m["distinct_share"] == 0.75
    assert m["repeat_rate"] == 0.5                     # 无无 and 青青 repeat; the poem does not
    assert not has_repeat(poem) and has_repeat("一子无无")
    assert not has_repeat("明月，月明")                # across lines is no repeat
    assert answer_body("五言绝句《甲》\n 床前 明月光") == "床前明月光"


def test_reuse_rate_counts_answers_leaning_on_one_character():
    records = [{"meta": {"form": "五言绝句", "title": "t", "keyword": None, "acrostic": None, "first_line": None},
                "messages": [{"role": "user", "content": "写诗"}]}] * 2
    formula = "五言绝句《不不》\n不是一千年，不知不可怜。"  # 不 three times in the poem; the header's do not count
    assert most_uses(formula) == 3 and most_uses("五言绝句《不不不》\n床前明月光，疑是地上霜。") == 1
    assert summarize([formula, "床前明月光，举头望明月。"], records)["reuse_rate"] == 0.5  # 明 and 月 twice: not a formula


def test_random_lines_have_the_asked_shape_from_other_poems():
    records = eval_records(synthetic_poems(n_per_form=4), random.Random(0))
    answers = random_lines(records, seed=1)
    for record, answer in zip(records, answers):
        assert check_form(answer, record["meta"]["form"])
        own = set(parse_answer_lines(record["reference"]))
        assert not own & set(parse_answer_lines(answer))
    assert random_lines(records, seed=1) == answers


# ---------------------------------------------------------------- bits per character

def test_bits_per_char_from_nats_by_hand():
    # 3 tokens of loss ln 8 each = 9 bits, over 6 characters
    assert bits_per_char_from_nats(3 * math.log(8), 6) == pytest.approx(1.5)


@pytest.mark.parametrize("max_seq_len", [64, 8])  # 8: texts longer than the context go in windows
def test_bits_per_char_of_a_uniform_model(tokenizer, tiny_config, max_seq_len):
    model = Transformer(ModelConfig(**{**tiny_config.to_dict(), "max_seq_len": max_seq_len})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: each next token costs ln V
    texts = ["床前明月光，疑是地上霜。", "今天天气很好。"]
    predicted = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # and </s>
    expected = math.log2(len(tokenizer)) * predicted / sum(len(t) for t in texts)
    assert bits_per_char(model, tokenizer, texts, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert bits_per_char(model, tokenizer, texts, batch_size=8) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- generation

class FakeTokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))



class FakeGenerator(TextGenerator):
    """A TextGenerator whose model returns prepared tokens, as Transformer.generate would."""

    def __init__(self, out):
        self.tokenizer, self.device, self.max_seq_len = FakeTokenizer(), "cpu", 64
        self.model = self
        self.out = torch.tensor(out)

    def generate(self, idx, **kwargs):
        return self.out


def test_a_row_stopped_when_it_made_the_stop_token_or_generation_ended_early():
    stop = 4
    answers, stopped = generate_batch(FakeGenerator([[7, 8, stop, stop], [7, 8, 9, 10]]), [[5], [5, 6]], stop,
                                      max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    assert answers == ["7 8", "7 8 9 10"] and stopped == [True, False]
    # every row ended: the last rows' stop tokens are not returned, the output is just shorter
    answers, stopped = generate_batch(FakeGenerator([[7, stop], [7, 8]]), [[5], [5]], stop,
                                      max_new_tokens=10, temperature=0.0, top_p=1.0, seed=0)
    assert answers == ["7", "7 8"] and stopped == [True, True]


@pytest.mark.parametrize("stop_step", [0, 2, 9])
def test_stop_detection_on_a_real_model(stop_step):
    from test_generate import peaky_model
    generator = FakeGenerator([])
    generator.model = peaky_model()
    prompts = [[5, 6, 7], [40, 41, 42, 43]]
    solo = [generator.model.generate(torch.tensor([p]), max_new_tokens=10, temperature=0.0)[0].tolist()
            for p in prompts]
    stop = solo[0][stop_step]
    answers, stopped = generate_batch(generator, prompts, stop, max_new_tokens=10, temperature=0.0, top_p=1.0, seed=0)
    for answer, row_stopped, expected in zip(answers, stopped, solo):
        assert row_stopped == (stop in expected)
        assert answer == " ".join(map(str, expected[:expected.index(stop) if row_stopped else 10]))


class EchoGenerator(FakeGenerator):
    """Answers each plain-text prompt with the number of characters it had."""

    def __init__(self):
        super().__init__([])
        self.tokenizer.bos_token_id, self.tokenizer.eos_token_id = 1, 2
        self.tokenizer.__class__ = type("EchoTokenizer", (FakeTokenizer,), {
            "__call__": lambda self, text, add_special_tokens=False: {"input_ids": [len(text)]}})

    def generate(self, idx, **kwargs):
        return idx[:, -1:]


def test_answers_come_back_in_the_order_of_the_records():
    # batched shortest form first, but each answer must land on its own request
    records = eval_records(synthetic_poems(n_per_form=3), random.Random(0))
    for i, r in enumerate(records):
        r["plain_prompt"] = "x" * (i + 10)
    args = eval_model.build_parser().parse_args(["--batch_size", "5"])
    runs = eval_model.run_model(EchoGenerator(), records, chat=False, args=args)
    for answers, stopped in runs.values():
        assert answers == [str(i + 10) for i in range(len(records))]


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def eval_files(tmp_path):
    poems = synthetic_poems(n_per_form=3)
    records = eval_records(poems, random.Random(0))
    paths = {"eval": tmp_path / "eval.jsonl", "bpc": tmp_path / "val.jsonl"}
    paths["eval"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    paths["bpc"].write_text("".join(json.dumps({"text": poem_text(p)}, ensure_ascii=False) + "\n" for p in poems),
                            encoding="utf-8")
    return paths


def save_model(path, tokenizer_dir, tiny_config, seed):
    torch.manual_seed(seed)
    Transformer(ModelConfig(**{**tiny_config.to_dict(), "max_seq_len": 256})).save_pretrained(str(path))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return str(path)


def test_summarize_gives_the_mean_and_range_of_several_runs(tmp_path, capsys):
    def run(path, form, bpc):
        metrics = {name: 0.5 for name in eval_model.METRICS}
        path.write_text(json.dumps({"bits_per_char": {"n_texts": 2, "n_chars": 9, "model": bpc},
                                    "metrics": {"greedy": {**metrics, "form_accuracy": form, "stop_rate": None}}}))
        return str(path)
    paths = [run(tmp_path / "a.json", 0.6, 7.0), run(tmp_path / "b.json", 0.9, 6.0), run(tmp_path / "c.json", 0.9, 6.5)]
    eval_model.main(["--summarize", *paths])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 runs: mean [min, max]"
    assert next(l for l in lines if l.startswith("form_accuracy")).split()[1:] == ["0.800", "[0.60,", "0.90]"]
    assert next(l for l in lines if l.startswith("bits/char model")).split()[2:] == ["6.500", "[6.00,", "7.00]"]
    assert next(l for l in lines if l.startswith("stop_rate")).split()[1:] == ["-"]
    with pytest.raises(SystemExit, match="missing.json"):
        eval_model.main(["--summarize", str(tmp_path / "missing.json")])


def test_eval_cli_writes_every_metric(tmp_path, eval_files, tokenizer_dir, tiny_config, capsys):
    sft = save_model(tmp_path / "sft", tokenizer_dir, tiny_config, seed=0)
    pretrain = save_model(tmp_path / "pretrain", tokenizer_dir, tiny_config, seed=1)
    eval_model.main(["--checkpoint", sft, "--baseline", pretrain, "--eval_data", str(eval_files["eval"]),
                     "--bpc_data", str(eval_files["bpc"]), "--n", "10", "--max_new_tokens", "12", "--device", "cpu"])
    result = json.loads((tmp_path / "sft" / "eval.json").read_text(encoding="utf-8"))
    assert result["n"] == 10 and result["mode"] == "chat" and result["baseline"] == pretrain
    assert set(result["metrics"]) == {"greedy", "sampled", "pretrain_greedy", "pretrain_sampled", "ceiling", "floor"}
    for column, metrics in result["metrics"].items():
        for name in eval_model.METRICS:
            value = metrics[name]
            assert value is None if (name == "stop_rate" and column in ("ceiling", "floor")) else 0 <= value <= 1
    ceiling, floor = result["metrics"]["ceiling"], result["metrics"]["floor"]
    assert ceiling["form_accuracy"] == ceiling["keyword_rate"] == ceiling["acrostic_accuracy"] == 1.0
    assert ceiling["first_line_rate"] == floor["form_accuracy"] == 1.0
    assert set(ceiling["form_accuracy_by_form"].values()) == {1.0}
    bpc = result["bits_per_char"]
    assert bpc["model"] > 0 and bpc["pretrain"] > 0 and bpc["n_texts"] == 12
    assert len(result["examples"]) == 8
    assert {"request", "greedy", "pretrain_sampled", "checks"} <= set(result["examples"][0])
    out = capsys.readouterr().out
    assert "bits per character" in out and "form_accuracy" in out and "pretrain_greedy" in out


def test_eval_cli_of_a_pretrained_model_uses_plain_prompts(tmp_path, eval_files, tokenizer_dir, tiny_config):
    pretrain = save_model(tmp_path / "pretrain", tokenizer_dir, tiny_config, seed=1)
    out = tmp_path / "e" / "pt.json"
    eval_model.main(["--checkpoint", pretrain, "--mode", "pretrain", "--plain_prompt", "header", "--eval_data",
                     str(eval_files["eval"]), "--bpc_data", str(eval_files["bpc"]), "--n", "4",
                     "--max_new_tokens", "8", "--out", str(out)])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["metrics"]) == {"greedy", "sampled", "ceiling", "floor"} and result["baseline"] is None
    assert result["plain_prompt"] == "header" and "pretrain" not in result["bits_per_char"]


def test_eval_cli_without_data_says_which_file(tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_model.main(["--checkpoint", str(tmp_path), "--eval_data", str(tmp_path / "none.jsonl")])
    assert "none.jsonl" in str(e.value) and str(e.value).startswith("error:")
