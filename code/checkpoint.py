"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one file, out_dir/checkpoints/step_00001000.pt, holding the model, the
optimizer, the grad scaler, the step, the data position (epoch and batch within it), the RNG
states of every rank, the model config, the tokenizer's sha256 and the tracking run id. It
is written to a temporary file, flushed to disk and renamed, so a crash mid-save leaves the
previous checkpoint intact; the newest `keep` are kept.
"""
import glob
import os
import random
import shutil
import sys

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or from another model or tokenizer."""


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINT_DIR, f"step_{step:08d}.pt")


def list_checkpoints(out_dir: str):
    """Checkpoint files of out_dir, newest first."""
    return sorted(glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "step_*.pt")), reverse=True)


def rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: torch.load(weights_only=True) refuses numpy arrays
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict, keep: int) -> None:
    """Write atomically (temporary file, fsync, rename), then delete all but the newest `keep`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    for old in list_checkpoints(os.path.dirname(os.path.dirname(path)))[keep:]:
        os.remove(old)


REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "rng", "config",
                 "tokenizer_sha256", "world_size")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only: a .pt file is a pickle, and this refuses any code object in it (tensors,
        # numbers, strings and containers only: what save_checkpoint writes)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or overwritten file fails inside torch's zip reader
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt, or not written by this "
                              f"trainer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return state


def find_checkpoint(resume: str, out_dir: str):
    """(path, state) to resume from: `resume` is a file, or "auto" for the newest readable one
    in out_dir (an unreadable one is reported and the one before it tried). (None, None) when
    "auto" finds nothing."""
    if resume != "auto":
        return resume, load_checkpoint(resume)
    for path in list_checkpoints(out_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
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
