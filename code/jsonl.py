"""Reading jsonl corpora line by line, skipping bad lines with one warning.

Every script reads its data through `iter_jsonl`: a malformed line, a missing key or an
empty text is skipped and counted; the warning names the file and the first few line
numbers. A missing file, or one with no usable line, raises JsonlError naming the path.
"""
import contextlib
import json
import os
import sys
import tempfile
from typing import Callable, Iterator, Tuple, TypeVar

import numpy as np
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


def print_warning(message: str) -> None:
    print(message, file=sys.stderr)


def iter_jsonl(path: str, parse: Callable[[object], T],
               warn: Callable[[str], None] = print_warning) -> Iterator[Tuple[int, T]]:
    """Yield (byte offset of the line, parse(record)) for every usable line of `path`.

    `parse` receives the decoded JSON value and raises ValueError/KeyError/TypeError for a
    record it cannot use; such lines are skipped. Blank lines are ignored silently.
    `warn` receives the one warning about skipped lines (dataset.py keeps it with its index).
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
        warn(f"warning: {path}: skipped {n_bad} unusable line(s); first at line " + ", ".join(examples))
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


# ---------------------------------------------------------------- the line index and its cache

INDEX_VERSION = 1  # bump when the index format or a dataset's parse rules change: old indexes are rebuilt


def index_path(data_path: str) -> str:
    """The index cache beside the data: data/sft.jsonl -> data/sft.jsonl.index.npz."""
    return data_path + ".index.npz"


def build_index(data_path: str, parse):
    """(byte offsets of the usable lines, int64; the warning about skipped lines) by reading every line."""
    warnings = []  # printed as usual, and kept in the cache so that every later start repeats it

    def warn(message):
        print(message, file=sys.stderr)
        warnings.append(message)
    offsets = np.fromiter((offset for offset, _ in iter_jsonl(data_path, parse, warn)), dtype=np.int64)
    return offsets, "\n".join(warnings)


def read_index(cache: str, key: str):
    """The cached (offsets, warning); None if there is none, it does not read, or its key differs."""
    try:
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return saved["offsets"], str(saved["warning"])
    except Exception:  # missing, another format, damaged: all just mean "build it again"
        pass
    return None


def write_index(cache: str, key: str, offsets, warning: str) -> None:
    """Written to a temporary file in the same directory, then renamed: a crash never leaves half an
    index, and ranks writing it at once each put a whole (identical) file in place."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(cache) + ".", suffix=".tmp", dir=os.path.dirname(cache) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; an index is as readable as its data
            np.savez(f, key=key, offsets=offsets, warning=warning)
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_index(data_path: str, parse):
    """Byte offsets of data_path's usable lines: from the cache when it matches the file (size,
    modification time, parse and format version), else read line by line and cached. A directory
    that cannot be written still works: indexed at every start, with one warning."""
    if not os.path.isfile(data_path):
        raise JsonlError(f"{data_path}: file not found")
    # the file's state before indexing: if it changes meanwhile, the key will not match it next time
    stat = os.stat(data_path)
    key = json.dumps({"version": INDEX_VERSION, "parse": f"{parse.__module__}.{parse.__qualname__}",
                      "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    cache = index_path(data_path)
    cached = read_index(cache, key)
    if cached is not None:
        offsets, warning = cached
        if warning:
            print(warning, file=sys.stderr)
        return offsets
    offsets, warning = build_index(data_path, parse)
    try:
        write_index(cache, key, offsets, warning)
    except OSError as e:  # a read-only directory, a full disk: training works without the cache
        print(f"warning: {cache}: cannot save the index of {data_path} beside it ({e.strerror or e}); "
              "it is built again at every start", file=sys.stderr)
    return offsets
