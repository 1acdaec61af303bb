"""README.md (Chinese) and README_en.md (English) stay in step: the same headings, the same
code blocks (comments aside), the same two commands first; one is Chinese, the other is not."""
import os
import re

import pytest

from conftest import ROOT

ZH = os.path.join(ROOT, "README.md")
EN = os.path.join(ROOT, "README_en.md")
FENCE = re.compile(r"^(```|~~~)")
CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f\u3000-\u303f\uff00-\uffef]")


def parse(path):
    """(heading levels, code blocks as (language, lines), prose lines) of a markdown file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    levels, blocks, prose = [], [], []
    block = None
    for line in lines:
        if FENCE.match(line):
            if block is None:
                block = (line[3:].strip(), [])
            else:
                blocks.append(block)
                block = None
            continue
        if block is not None:
            block[1].append(line)
            continue
        prose.append(line)
        heading = re.match(r"^(#{1,6})\s", line)
        if heading:
            levels.append(len(heading.group(1)))
    assert block is None, f"{path}: a code block is not closed"
    return levels, blocks, prose


def strip_comment(line):
    """A bash/python line without its # comment: from a leading '#' or from ' #' to the end."""
    if line.lstrip().startswith("#"):
        return ""
    cut = line.find(" #")
    return (line[:cut] if cut >= 0 else line).rstrip()


def comparable(block):
    language, lines = block
    if language in ("bash", "sh", "python"):
        lines = [strip_comment(line) for line in lines]
    return language, lines


def cjk_share(prose_lines):
    text = re.sub(r"`[^`]*`", "", "\n".join(prose_lines))  # inline code is not prose
    chars = [c for c in text if not c.isspace()]
    return sum(1 for c in chars if CJK.match(c)) / max(len(chars), 1)


@pytest.fixture(scope="module")
def readmes():
    return parse(ZH), parse(EN)


def test_same_headings(readmes):
    (zh_levels, _, _), (en_levels, _, _) = readmes
    assert zh_levels == en_levels, "README.md and README_en.md must have the same heading levels in the same order"
    assert len(zh_levels) > 10


def test_same_code_blocks(readmes):
    (_, zh_blocks, _), (_, en_blocks, _) = readmes
    assert len(zh_blocks) == len(en_blocks)
    for i, (zh, en) in enumerate(zip(zh_blocks, en_blocks)):
        assert comparable(zh) == comparable(en), f"code block {i + 1} differs beyond its comments"


def test_the_same_two_commands_come_first(readmes):
    (_, zh_blocks, _), (_, en_blocks, _) = readmes
    zh_first = [line for line in comparable(zh_blocks[0])[1] if line][:2]
    en_first = [line for line in comparable(en_blocks[0])[1] if line][:2]
    assert zh_first == en_first == [
        "pip install -r requirements.txt && bash code/run_demo.sh",
        "pip install -r requirements.txt && python -m pytest -q tests",
    ]


def test_each_links_to_the_other():
    with open(ZH, encoding="utf-8") as f:
        assert "README_en.md" in f.readline()
    with open(EN, encoding="utf-8") as f:
        assert "README.md" in f.readline()


def test_languages(readmes):
    (_, _, zh_prose), (_, _, en_prose) = readmes
    assert cjk_share(zh_prose) > 0.3, "README.md should be written in Chinese"
    assert cjk_share(en_prose) < 0.1, "README_en.md should be written in English"


def test_the_files_named_in_the_chapter_table_exist():
    with open(EN, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Chapter to code", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    files = {name for row in rows for name in re.findall(r"`([\w.]+\.(?:py|sh))`", row[2])}
    assert files, "no files found in the chapter-to-code table"
    for name in files:
        assert os.path.isfile(os.path.join(ROOT, "code", name)), f"code/{name} is named but missing"
