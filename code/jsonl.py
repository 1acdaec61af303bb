"""Reading jsonl corpora line by line, skipping bad lines with one warning.

Every script reads its data through `iter_jsonl`: a malformed line, a missing key or an
empty text is skipped and counted; the warning names the file and the first few line
numbers. A missing file, or one with no usable line, raises JsonlError naming the path.
"""
import contextlib
import json
import os
import sys
from typing import Callable, Iterator, Tuple, TypeVar

from tqdm import tqdm

T = TypeVar("T")
SHOW_BAD_LINES = 5        # how many bad line numbers the warning names
PROGRESS_BYTES = 64 << 20  # show a progress bar for files larger than this


class JsonlError(ValueError):
    """A data file that cannot be used at all (missing, empty, nothing valid)."""


class DataChangedError(OSError):
    """A data file that changed under a running job (truncated or rewritten): the message names
    the file and the line or window, and says how to go on."""


def changed_while_training(path: str, where: str, size_then: int) -> DataChangedError:
    try:
        now = f"{os.path.getsize(path):,} bytes now"
    except OSError:
        now = "gone now"
    return DataChangedError(f"{path}: {where} cannot be read: the file changed while training ({size_then:,} bytes "
                            f"when training started, {now}); restore it and continue with --resume auto")


def iter_jsonl(path: str, parse: Callable[[object], T]) -> Iterator[Tuple[int, T]]:
    """Yield (byte offset of the line, parse(record)) for every usable line of `path`.

    `parse` receives the decoded JSON value and raises ValueError/KeyError/TypeError for a
    record it cannot use; such lines are skipped. Blank lines are ignored silently.
    """
    if not os.path.isfile(path):
        raise JsonlError(f"{path}: file not found")
    size = os.path.getsize(path)
    n_good, n_bad, examples = 0, 0, []
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path),
                                     disable=size < PROGRESS_BYTES, file=sys.stderr) as progress:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            progress.update(len(raw))
            if not raw.strip():
                continue
            try:
                value = parse(json.loads(raw))
            except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                n_bad += 1
                if len(examples) < SHOW_BAD_LINES:
                    examples.append(f"{lineno} ({type(e).__name__}: {e})")
                continue
            n_good += 1
            yield start, value
    if n_bad:
        print(f"warning: {path}: skipped {n_bad} unusable line(s); first at line "
              + ", ".join(examples), file=sys.stderr)
    if n_good == 0:
        raise JsonlError(f"{path}: no usable line (expected one JSON record per line)")


def text_of(record) -> str:
    """The "text" of a pretraining record; raises (so the line is skipped) if it has none."""
    text = record["text"]
    if not isinstance(text, str):
        raise TypeError("'text' is not a string")
    if not text.strip():
        raise ValueError("empty text")
    return text


def read_jsonl(path: str, parse: Callable[[object], T]) -> Iterator[T]:
    """Like iter_jsonl, without the offsets."""
    for _, value in iter_jsonl(path, parse):
        yield value


def read_line_at(f, offset: int):
    """Decode the JSON line that starts at byte `offset` of the binary file object `f`."""
    f.seek(offset)
    return json.loads(f.readline())


def line_number_at(path: str, offset: int) -> int:
    """The 1-based line number of the byte offset (for error messages only: it reads the file)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


@contextlib.contextmanager
def atomic_writer(path: str):
    """Open `path` for writing through a temporary file that is renamed into place on success,
    so an interrupted run never leaves a half-written file under the final name."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dump_line(record) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
