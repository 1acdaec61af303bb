"""The poem corpus: fetching (npm missing, checksum), reading the tarball, the strict forms,
titles, the split (no held-out poem in training data), and the instruction builder."""
import io
import json
import random
import re
import tarfile

import pytest

import poetry
from eval_model import check_form, parse_answer_lines
from poetry import (COMMON_CHARS, FORMS, REQUESTS, SHORT_NAMES, TASKS, PoetryError, build_demo_data,
                    build_instructions, clean_title, eval_records, fetch_poetry, load_poems, make_instruction,
                    poem_body, poem_form, poem_text, read_tang_poems, split_poems)

# 静夜思 in traditional characters, as the package has it
JINGYESI = {"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}
DENGGAO = ["风急天高猿啸哀，渚清沙白鸟飞回。", "无边落木萧萧下，不尽长江滚滚来。",
           "万里悲秋常作客，百年多病独登台。", "艰难苦恨繁霜鬓，潦倒新停浊酒杯。"]
POOL = [chr(0x4E00 + 37 * i) for i in range(400)]  # arbitrary CJK characters, none of them common


def synthetic_poems(n_per_form=12, seed=0):
    """Poems of every strict form from random characters, each with its own first line."""
    rng = random.Random(seed)
    poems, firsts = [], set()
    for form, (n_lines, n_chars) in FORMS.items():
        for k in range(n_per_form):
            while True:
                lines = ["".join(rng.choice(POOL) for _ in range(n_chars)) for _ in range(n_lines)]
                if lines[0] not in firsts:
                    break
            firsts.add(lines[0])
            poems.append({"author": f"诗人{k}", "title": f"题{form}{k}", "form": form, "lines": lines})
    return poems


def as_package_poem(poem):
    return {"author": poem["author"], "title": poem["title"], "paragraphs": poem_body(poem["lines"]).split("\n"),
            "id": "x"}


def make_tarball(path, files):
    """A .tgz laid out like the npm package: {member name: JSON value}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, value in files.items():
            data = json.dumps(value, ensure_ascii=False).encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def quantangshi(number):
    return f"package/dist/quantangshi/poet.tang.{number}.json"


# ---------------------------------------------------------------- fetching

def test_npm_missing_is_one_line_saying_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(poetry.shutil, "which", lambda name: None)
    with pytest.raises(PoetryError) as e:
        fetch_poetry(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith("npm not found") and "apt-get install npm" in message
    with pytest.raises(SystemExit) as e:  # the CLI says it as one error line
        poetry.main(["--data_dir", str(tmp_path)])
    assert str(e.value).startswith("error: npm not found") and "\n" not in str(e.value)


def test_a_cached_tarball_is_verified_and_used_without_npm(tmp_path, monkeypatch):
    path = make_tarball(tmp_path / poetry.TARBALL, {quantangshi(0): [JINGYESI]})
    monkeypatch.setattr(poetry.shutil, "which", lambda name: None)
    monkeypatch.setattr(poetry, "SHA256", poetry.sha256_of(path))
    assert fetch_poetry(str(tmp_path)) == path


def test_a_tarball_with_another_checksum_is_refused_and_kept(tmp_path):
    path = make_tarball(tmp_path / poetry.TARBALL, {quantangshi(0): [JINGYESI]})
    with pytest.raises(PoetryError, match=re.escape(path) + ".*sha256"):
        fetch_poetry(str(tmp_path))
    assert (tmp_path / poetry.TARBALL).exists()


def test_npm_pack_is_called_with_the_pinned_package(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        make_tarball(tmp_path / "d" / poetry.TARBALL, {quantangshi(0): [JINGYESI]})
        return poetry.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(poetry.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(poetry.subprocess, "run", fake_run)
    with pytest.raises(PoetryError, match="sha256"):  # the fake tarball is not the real one
        fetch_poetry(str(tmp_path / "d"))
    assert calls == [["/usr/bin/npm", "pack", "chinese-poetry@2.0.1", "--pack-destination", str(tmp_path / "d")]]


# ---------------------------------------------------------------- reading and parsing

def test_read_tang_poems_streams_the_tarball_in_simplified_characters(tmp_path):
    other = {"author": "杜甫", "title": "登高", "paragraphs": DENGGAO}
    path = make_tarball(tmp_path / "p.tgz", {
        quantangshi(1000): [other],
        "package/dist/quantangshi/authors.tang.json": [{"name": "x"}],  # not a poem file
        "package/dist/songci/ci.song.0.json": [{"author": "y"}],
        quantangshi(0): [JINGYESI],
    })
    poems = list(read_tang_poems(path))
    assert [p["title"] for p in poems] == ["静夜思", "登高"]  # file 0 before file 1000
    assert poems[0] == {"author": "李白", "title": "静夜思", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]}
    assert not list(tmp_path.glob("package"))  # nothing extracted


def test_a_tarball_without_poems_is_an_error(tmp_path):
    path = make_tarball(tmp_path / "p.tgz", {"package/README.md": "hi"})
    with pytest.raises(PoetryError, match="poet.tang"):
        list(read_tang_poems(path))


@pytest.mark.parametrize("paragraphs, form", [
    (["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"], "五言绝句"),
    (["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。"], "五言绝句"),   # one line a paragraph
    (DENGGAO, "七言律诗"),
    (DENGGAO[:2], "七言绝句"),
    (["床前明月光，疑是地上霜。", "举头望明月？低头思故乡。"], None),             # another mark
    (["床前明月光。疑是地上霜，", "举头望明月，低头思故乡。"], None),             # marks not alternating
    (["床前明月光，疑是地上霜。", "举头望明月，低头思故乡"], None),               # text after the last mark
    (["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "床前明月光，疑是地上霜。"], None),  # 6 lines
    (["床前明月光，疑是地上霜。", "举头望明月，低头思故乡中。"], None),           # mixed lengths
    (["床前明月□，疑是地上霜。", "举头望明月，低头思故乡。"], None),             # a lost character
    (["床前明月光，疑是地上霜。", "举头望明月，囗囗囗囗囗。"], None),             # lost, written as 囗
    (["床前明月光，疑是地上霜。"], None),                                        # 2 lines
    (["床前明月光好，疑是地上霜好。", "举头望明月好，低头思故乡好。"], None),       # 6 characters
])
def test_poem_form(paragraphs, form):
    assert poem_form(paragraphs)[0] == form
    if form:
        assert len(poem_form(paragraphs)[1]) == FORMS[form][0]


@pytest.mark.parametrize("raw, clean", [
    ("帝京篇十首 一", "帝京篇"), ("相和歌辞 乌栖曲", "乌栖曲"), ("旅舍书怀寄所知二首 二", "旅舍书怀寄所知"),
    ("偈颂（并序○序为南岳齐己撰） 十八", "偈颂"), ("十八", "无题"), ("三冬季月[龙]年", "三冬季月龙年"),
    ("同颜使君真卿岘山送李法曹阳冰西上献书时会有诏征赴京", "同颜使君真卿岘山送李法曹"), ("静夜思", "静夜思"),
])
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


def test_load_poems_keeps_strict_forms_once(tmp_path):
    variant = {"author": "某", "title": "静夜思", "paragraphs": ["床前看月光，疑是地上雪。", "举头望山月，低头思故乡。"]}
    same_start = {"author": "某", "title": "夜思", "paragraphs": ["床前明月光，照我白玉堂。", "夜深人未寝，独坐到天光。"]}
    long_poem = {"author": "某", "title": "长诗", "paragraphs": DENGGAO + DENGGAO[:1]}
    path = make_tarball(tmp_path / "p.tgz", {quantangshi(0): [JINGYESI, variant, same_start, long_poem,
                                                              {"author": "杜甫", "title": "登高", "paragraphs": DENGGAO}]})
    poems = load_poems(path)
    assert [(p["title"], p["form"]) for p in poems] == [("静夜思", "五言绝句"), ("登高", "七言律诗")]
    assert poems[0]["lines"] == ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]


def test_poem_text_is_header_then_one_couplet_a_line():
    poem = {"form": "五言绝句", "title": "静夜思", "lines": ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]}
    assert poem_text(poem) == "五言绝句《静夜思》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"


# ---------------------------------------------------------------- the split

def test_split_holds_out_balanced_poems_by_seed():
    poems = synthetic_poems()
    train, held = split_poems(poems, seed=1, n_eval=8)
    assert sorted(p["lines"][0] for p in train + held) == sorted(p["lines"][0] for p in poems)
    assert not {p["lines"][0] for p in train} & {p["lines"][0] for p in held}
    assert [p["form"] for p in held].count("五言绝句") == 2 and {p["form"] for p in held} == set(FORMS)
    assert split_poems(poems, seed=1, n_eval=8) == (train, held)           # deterministic
    assert split_poems(poems, seed=2, n_eval=8)[1] != held                  # another seed, other poems


def test_split_refuses_too_few_poems():
    with pytest.raises(PoetryError, match="too few"):
        split_poems(synthetic_poems(n_per_form=2), n_eval=8)


def test_no_held_out_poem_reaches_the_training_data(tmp_path):
    poems = synthetic_poems(n_per_form=30)
    path = make_tarball(tmp_path / "p.tgz", {quantangshi(0): [as_package_poem(p) for p in poems]})
    data = build_demo_data(path, seed=3, n_eval=20, n_per_cell=10)
    assert len(data["eval"]) == len(data["pretrain_val"]) == 20
    assert len(data["pretrain"]) == len(poems) - 20 and len(data["sft"]) == 10 * 4 * 4
    training_text = "\n".join([r["text"] for r in data["pretrain"]]
                              + [m["content"] for chat in data["sft"] for m in chat])
    for record in data["eval"]:
        for line in parse_answer_lines(record["reference"]):
            assert line not in training_text
    held_text = "\n".join(r["text"] for r in data["pretrain_val"])
    body = lambda record: record["reference"].split("\n", 1)[1]  # the header may say 无题
    assert all(body(record) in held_text for record in data["eval"])
    # the DPO requests come from training poems only, a balanced share of each form
    assert data["preference"] and all(body(record) not in held_text for record in data["preference"])
    forms = [record["meta"]["form"] for record in data["preference"]]
    assert len({forms.count(form) for form in set(forms)}) == 1


# ---------------------------------------------------------------- instructions

def template_of(task, request):
    """Which wording of REQUESTS[task] a request uses."""
    for i, template in enumerate(REQUESTS[task]):
        pattern = re.escape(template)
        pattern = re.sub(r"\\\{\w+\\\}", ".+?", pattern)
        if re.fullmatch(pattern, request):
            return i
    raise AssertionError(f"{request!r} matches no {task} wording")


def test_instructions_are_balanced_varied_and_consistent_with_their_answers():
    poems = synthetic_poems()
    pairs = build_instructions(poems, random.Random(0), n_per_cell=12)
    assert len(pairs) == 12 * len(TASKS) * len(FORMS)
    cells = {(meta["task"], meta["form"]) for _, meta in pairs}
    assert cells == {(t, f) for t in TASKS for f in FORMS}
    used = {task: set() for task in TASKS}
    for chat, meta in pairs:
        assert [m["role"] for m in chat] == ["system", "user", "assistant"]
        assert chat[0]["content"] == poetry.SYSTEM_PROMPT
        request, answer = chat[1]["content"], chat[2]["content"]
        lines = parse_answer_lines(answer)
        assert check_form(answer, meta["form"])
        # the header names the full form and the request's title, or 无题 when it names none
        title = meta["title"] if f"《{meta['title']}》" in request else poetry.UNTITLED
        assert answer.split("\n")[0] == f"{meta['form']}《{title}》"
        assert meta["form"] in request or SHORT_NAMES[meta["form"]] in request
        used[meta["task"]].add(template_of(meta["task"], request))
        if meta["task"] == "keyword":
            assert meta["keyword"] in answer and meta["keyword"] in request and meta["keyword"] not in COMMON_CHARS
        if meta["task"] == "acrostic":
            assert meta["acrostic"] == "".join(line[0] for line in lines)
            assert meta["acrostic"] in request or "、".join(meta["acrostic"]) in request
        if meta["task"] == "continue":
            assert lines[0] == meta["first_line"] and meta["first_line"] in request
        if meta["task"] != "keyword":
            assert meta["keyword"] is None
    for task in TASKS:
        assert len(REQUESTS[task]) >= 5 and used[task] == set(range(len(REQUESTS[task])))
    assert any(SHORT_NAMES[m["form"]] in c[1]["content"] for c, m in pairs)  # short names too
    assert any(m["form"] in c[1]["content"] for c, m in pairs)
    assert any(c[2]["content"].startswith(m["form"] + "《" + poetry.UNTITLED) for c, m in pairs)   # both kinds
    assert any(f"《{m['title']}》" in c[2]["content"] for c, m in pairs)


def test_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        make_instruction(synthetic_poems(1)[0], "limerick", random.Random(0))


def test_eval_records_cover_every_task_and_form_early():
    poems = synthetic_poems(n_per_form=8)
    records = eval_records(poems, random.Random(0))
    assert len(records) == len(poems)
    assert {(r["meta"]["task"], r["meta"]["form"]) for r in records[:16]} == {(t, f) for t in TASKS for f in FORMS}
    for r in records:
        assert r["messages"][-1]["role"] == "user" and r["plain_prompt"] == r["messages"][-1]["content"] + "\n"
        assert r["header_prompt"] == f"{r['meta']['form']}《{r['meta']['title']}》\n"
        assert check_form(r["reference"], r["meta"]["form"])
