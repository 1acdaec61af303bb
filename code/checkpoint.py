"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one file, out_dir/checkpoints/step_00001000.pt, holding the model, the
optimizer, the grad scaler, the step, the data position (epoch and batch within it), the RNG
states of every rank, the model config, the tokenizer's sha256 and the tracking run id. It
is written to a temporary file, flushed to disk, renamed and read back, so a crash or a full disk
mid-save leaves the previous checkpoint intact.

Nothing a run cannot read is ever deleted or overwritten (it is moved to checkpoints/unreadable/):
each checkpoint carries its run's
`lineage` (an id a fresh run draws and a resumed run inherits), and pruning to the newest
`keep` removes only files of this lineage that still load. A checkpoint refused for its
format (an older torch or an older Tiny-K) can be converted once, if you trust the file:

    python code/checkpoint.py --convert out/checkpoints/step_00001000.pt
"""
import argparse
import errno
import glob
import os
import pickle
import random
import shutil
import sys
import uuid
import zipfile

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable"  # inside CHECKPOINT_DIR: newer files a fallback resume moved aside, kept


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or from another model or tokenizer."""


class CheckpointWriteError(OSError):
    """A checkpoint or final model that could not be written (the message names path and space)."""


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINT_DIR, f"step_{step:08d}.pt")


def list_checkpoints(out_dir: str):
    """Checkpoint files of out_dir, newest first."""
    return sorted(glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "step_*.pt")), reverse=True)


def rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: torch.load(weights_only=True) refuses numpy arrays
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            # this rank's GPU only: a resume may see fewer GPUs (CUDA_VISIBLE_DEVICES per rank, a smaller node)
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, (list, tuple)):  # checkpoints before the per-device state: every visible GPU's
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the current device's, which Dist has set to this rank's GPU


def new_lineage() -> str:
    """The id a fresh run writes into its checkpoints; a resumed run keeps its checkpoint's."""
    return uuid.uuid4().hex


def space_note(directory: str) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free on {directory}"
    except OSError:
        return f"{directory} is not there any more"


def save_checkpoint(path: str, state: dict, keep: int) -> None:
    """Write atomically (temporary file, fsync, rename), read it back, then prune (prune()).

    A failed write (disk full, read-only or vanished directory) removes its temporary file and
    raises CheckpointWriteError naming the path and the free space: the previous checkpoints stay.
    """
    directory = os.path.dirname(path)
    out_dir = os.path.dirname(directory)
    if not os.path.isdir(out_dir):  # an unmounted or deleted out_dir: recreating it would write elsewhere
        raise CheckpointWriteError(f"{path}: not saved: {out_dir} vanished while training (deleted or unmounted?)")
    tmp = f"{path}.tmp"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        set_aside_if_unreadable(path)
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports ENOSPC as a RuntimeError
        with_space = write_failure(tmp, e, directory)
        raise CheckpointWriteError(f"{path}: not saved ({with_space}); the earlier checkpoints are intact") from e
    load_checkpoint(path, mmap=True)  # a checkpoint that does not read back is an error now, not at resume time
    prune(out_dir, state.get("lineage"), keep)


def set_aside_if_unreadable(path: str) -> None:
    """A file of that name this run cannot read (another run's, an older format, a half-synced
    copy) is moved to checkpoints/unreadable/, never overwritten."""
    if not os.path.exists(path):
        return
    try:
        load_checkpoint(path, mmap=True)
    except CheckpointError:
        aside = move_aside(path)
        print(f"warning: {path} does not load; moved to {aside}/ before writing a new one there", file=sys.stderr)


def move_aside(path: str) -> str:
    """Move a checkpoint that does not load into checkpoints/unreadable/ (kept byte for byte); that folder."""
    aside = os.path.join(os.path.dirname(path), UNREADABLE_DIR)
    os.makedirs(aside, exist_ok=True)
    os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def write_failure(tmp: str, error: Exception, directory: str) -> str:
    """Remove a partial file; the reason in words, with the free space."""
    try:
        os.remove(tmp)
    except OSError:
        pass
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        reason = os.strerror(errno.ENOSPC)  # what inline_container's "unexpected pos" means in practice
    return f"{reason}; {space_note(directory)}"


def lineage_of(path: str):
    """The lineage a checkpoint was written by, or None if it does not load (or has none)."""
    try:
        return load_checkpoint(path, mmap=True).get("lineage")
    except CheckpointError:
        return None


def prune(out_dir: str, lineage: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of this lineage; files of other runs and
    files that do not load are never touched."""
    if not lineage:
        return
    ours = [p for p in list_checkpoints(out_dir) if lineage_of(p) == lineage]
    for old in ours[max(keep, 1):]:
        os.remove(old)


REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "rng", "config",
                 "tokenizer_sha256", "world_size")


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """The checkpoint's state; CheckpointError naming the file and why it cannot be used.
    mmap: map the tensors instead of reading them (cheap, to look at the small fields)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only: a .pt file is a pickle, and this refuses any code object in it (tensors,
        # numbers, strings and containers only: what save_checkpoint writes)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives: this is no checkpoint at all
            raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt, or not written by this "
                                  "trainer (not a zip archive)") from e
        # readable, but holds objects weights_only refuses
        raise CheckpointError(f"{path}: refused for its format (written by an older torch or Tiny-K?); if you "
                              f"trust the file, convert it once: python code/checkpoint.py --convert {path}") from e
    except Exception as e:  # a truncated or overwritten file fails inside torch's zip reader
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt, or not written by this "
                              f"trainer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return state


def find_checkpoint(resume: str, out_dir: str):
    """(path, state) to resume from: `resume` is a file, or "auto" for the newest readable one
    in out_dir. (None, None) when "auto" finds no checkpoint at all.

    "auto" never starts over while checkpoints exist: if none loads it raises, listing each
    file and why. If only newer ones fail, it resumes from the newest that loads, says so, and
    moves the newer ones to checkpoints/unreadable/ (kept, and out of the way of new saves).
    """
    if resume != "auto":
        return resume, load_checkpoint(resume)
    failures = []
    for path in list_checkpoints(out_dir):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            failures.append((path, str(e)))
            continue
        if failures:
            aside = [move_aside(bad) for bad, _ in failures][0]
            print(f"warning: resuming from {path}, an older checkpoint, because the newer ones do not load:\n"
                  + "".join(f"  {why}\n" for _, why in failures)
                  + f"  they are kept, moved to {aside}/", file=sys.stderr)
        return path, state
    if failures:
        raise CheckpointError(
            f"--resume auto: none of the {len(failures)} checkpoint(s) in {os.path.join(out_dir, CHECKPOINT_DIR)} "
            "loads, and nothing was trained, changed or deleted:\n" + "".join(f"  {why}\n" for _, why in failures)
            + "  to go on: --resume FILE (one you can read or have converted), or start over on purpose with "
              "--resume none or a new --out_dir")
    return None, None


def load_weights(model, weights: dict, path: str):
    """Strict load: a missing, unexpected or misshapen weight is an error naming the keys."""
    missing = sorted(model.state_dict().keys() - weights.keys())
    unexpected = sorted(weights.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[-1].strip()})") from e


def check_writable(out_dir: str, need_bytes: int) -> None:
    """Fail now, not after hours of training, if out_dir cannot take the checkpoints."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise OSError(f"{out_dir}: cannot write checkpoints there ({e.strerror or e})") from e
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise OSError(f"{out_dir}: {free / 2**30:.2f} GiB free, but the checkpoints need about "
                      f"{need_bytes / 2**30:.2f} GiB; free some space or lower --keep_checkpoints")


def convert(path: str) -> None:
    """Load a checkpoint with full trust (torch.load(weights_only=False): it may run code from
    the file) and write it back in the format load_checkpoint reads; the original is kept as
    PATH.orig."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for rng in state.get("rng") or []:  # older Tiny-K: numpy's key array, which weights_only refuses
        name, keys, pos, has_gauss, cached = rng["numpy"]
        if isinstance(keys, np.ndarray):
            rng["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state.setdefault("lineage", None)
    os.replace(path, path + ".orig")
    torch.save(state, path)
    load_checkpoint(path)
    print(f"converted {path} (the original is {path}.orig)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert", metavar="FILE", required=True,
                        help="rewrite a checkpoint that torch.load(weights_only=True) refuses; only for files you trust")
    args = parser.parse_args(argv)
    try:
        convert(args.convert)
    except (OSError, CheckpointError, pickle.UnpicklingError, RuntimeError) as e:
        sys.exit(f"error: {args.convert}: {e}")


if __name__ == "__main__":
    main()
