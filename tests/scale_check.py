"""The real path's data steps on a synthetic corpus of real size: time, MB/s and peak memory.

    python tests/scale_check.py --gib 2                                # ~20 min on 2 cores; ~7 GB of disk under --work_dir
    python tests/scale_check.py --gib 2 --parts index,data,sweep,train  # everything (~35 min)

Builds, from the demo's Tang poems (data/demo_pretrain.jsonl; run `python code/deal_dataset.py
--demo` first), a corpus in the shape of seq-monkey ({"text": ...} documents of a few hundred to a
few thousand characters) and one in the shape of BelleGroup ({"conversations": [...]} per line),
together --gib GiB. The characters follow the poems' frequencies, in clauses of random length, so
almost every clause is new, as in a real corpus (the tokenizer trainer's memory grows with distinct
clauses). Then it runs every data step of the real path as a user would, each as its own process,
and prints one row per step: input size, time, MB/s, and the peak memory of the step's processes
(their summed proportional set size, workers included). Training runs a tiny model for
--train_steps steps and reports its highest memory over steps 100-400 and over the last 300
steps: it must stay flat.

Not part of the test suite (too long); tests/test_scale.py runs a small version and asserts that
memory does not grow with the input.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")

# ---- hyperparameters (CLI flags override) ----
GIB = 2.0
WORK_DIR = "data/scale_check"
SOURCE = "data/demo_pretrain.jsonl"
SFT_SHARE = 0.13      # BelleGroup's 4.85 GB beside seq-monkey's ~33 GB
TRAIN_STEPS = 2000
SEED = 0
PUNCTUATION = {"，": 6, "。": 3, "、": 1, "；": 0.3, "？": 0.3, "！": 0.2, "：": 0.2}


# ---------------------------------------------------------------- the synthetic corpora

def character_table(source: str):
    """Characters of the source text and their frequencies (punctuation and line breaks left out)."""
    counts = {}
    with open(source, encoding="utf-8") as f:
        for line in f:
            for ch in json.loads(line)["text"]:
                if ch not in PUNCTUATION and not ch.isspace():
                    counts[ch] = counts.get(ch, 0) + 1
    chars = np.array([ord(c) for c in counts], dtype=np.uint32)
    weights = np.array(list(counts.values()), dtype=np.float64)
    return chars, weights / weights.sum()


class TextMaker:
    """Random clauses: 2 to 15 characters drawn by frequency, each closed by a punctuation mark."""

    def __init__(self, source: str, seed: int):
        self.chars, self.p = character_table(source)
        self.punct = np.array([ord(c) for c in PUNCTUATION], dtype=np.uint32)
        self.punct_p = np.array(list(PUNCTUATION.values())) / sum(PUNCTUATION.values())
        self.rng = np.random.default_rng(seed)

    def block(self, n_clauses: int) -> list:
        """n_clauses clauses as a list of strings."""
        lengths = self.rng.integers(2, 16, n_clauses)
        ends = np.cumsum(lengths + 1)
        codes = self.chars[self.rng.choice(len(self.chars), ends[-1], p=self.p)]
        codes[ends - 1] = self.punct[self.rng.choice(len(self.punct), n_clauses, p=self.punct_p)]
        text = codes.astype("<u4").tobytes().decode("utf-32-le")
        starts = np.concatenate([[0], ends[:-1]])
        return [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())]

    def documents(self, clauses_per_doc):
        """Documents of the given numbers of clauses, with a paragraph break now and then."""
        clauses = self.block(int(sum(clauses_per_doc)))
        docs, i = [], 0
        for n in clauses_per_doc:
            doc = clauses[i:i + n]
            for j in range(8, len(doc), 9):  # a paragraph every ~9 clauses
                doc[j] += "\n"
            docs.append("".join(doc))
            i += n
        return docs


def write_corpus(path: str, n_bytes: int, make_lines, desc: str):
    """Append lines from make_lines() until the file holds n_bytes."""
    from tqdm import tqdm
    tmp = path + ".tmp"
    with open(tmp, "wb") as f, tqdm(total=n_bytes, unit="B", unit_scale=True, desc=desc,
                                                       file=sys.stderr, disable=None) as progress:
        written = 0
        while written < n_bytes:
            chunk = "".join(make_lines()).encode("utf-8")
            f.write(chunk)
            written += len(chunk)
            progress.update(len(chunk))
    os.replace(tmp, path)


def make_seq_monkey(maker: TextMaker, path: str, n_bytes: int):
    """{"text": ...} per line; lengths spread like web documents (median ~500 characters, a long tail)."""
    def lines():
        n_clauses = np.clip(maker.rng.lognormal(3.9, 0.9, 200).astype(int), 1, 2000)  # ~0.5 MB a call
        return [json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in maker.documents(n_clauses)]
    write_corpus(path, n_bytes, lines, "seq-monkey-like")


def make_belle(maker: TextMaker, path: str, n_bytes: int):
    """{"conversations": [{"from": "human", ...}, {"from": "assistant", ...}, ...]} per line: one to
    three turns, short questions, answers of a few hundred characters."""
    def lines():
        out = []
        for _ in range(100):
            n_turns = int(maker.rng.choice([1, 1, 1, 2, 3]))
            lengths = []
            for _ in range(n_turns):
                lengths += [int(maker.rng.integers(1, 6)), int(np.clip(maker.rng.lognormal(3.0, 0.8), 1, 300))]
            texts = maker.documents(lengths)
            turns = [{"from": "human" if i % 2 == 0 else "assistant", "value": t} for i, t in enumerate(texts)]
            out.append(json.dumps({"conversations": turns, "id": str(maker.rng.integers(1 << 40))},
                                  ensure_ascii=False) + "\n")
        return out
    write_corpus(path, n_bytes, lines, "BelleGroup-like")


# ---------------------------------------------------------------- measuring a step

def process_tree(pid: int):
    """pid and all its descendants (Linux /proc)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # the process ended meanwhile
            pass
    return pids


def tree_memory_bytes(pid: int) -> int:
    """Summed proportional set size of pid and its descendants: shared pages (the forked workers'
    copy-on-write libraries, the page cache of a file they all map) are counted once overall."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class MemoryWatch:
    """Polls a process tree's memory in a thread; .peak is the highest sum seen, .samples the series."""

    def __init__(self, pid: int, interval: float = 0.1, on_sample=None):
        self.pid, self.interval, self.on_sample = pid, interval, on_sample
        self.peak, self.samples, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            used = tree_memory_bytes(self.pid)
            self.peak = max(self.peak, used)
            self.samples.append(used)
            if self.on_sample:
                self.on_sample(used)
            # reading smaps costs CPU: poll often at first (short steps), then once a second
            self._stop.wait(min(1.0, self.interval * len(self.samples)))

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_step(argv, env=None, on_sample=None, quiet=True):
    """Run a command; return (seconds, peak bytes of its process tree, MemoryWatch)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    watch = MemoryWatch(proc.pid, on_sample=on_sample)
    _, stderr = proc.communicate()
    watch.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr[-3000:]}")
    return time.time() - t0, watch.peak, watch


def python(script, *args):
    return [sys.executable, os.path.join(CODE, script), *map(str, args)]


def row(step, input_bytes, seconds, peak, note=""):
    mb = input_bytes / 1e6
    return {"step": step, "input": f"{mb / 1e3:.2f} GB" if mb >= 1000 else f"{mb:.0f} MB",
            "time": f"{seconds:.0f} s", "MB/s": f"{mb / seconds:.1f}" if input_bytes else "",
            "peak memory": f"{peak / 2**30:.2f} GiB", "note": note}


def print_table(rows):
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n| " + " | ".join("---" for _ in keys) + " |")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


# ---------------------------------------------------------------- the steps

def data_steps(work, max_chars=None):
    """Conversion, tokenizer training, pre-tokenization and the SFT index, as the README runs them."""
    raw_pretrain, raw_sft = f"{work}/seq_monkey.jsonl", f"{work}/belle.json"
    pretrain, sft, tok, bin_path = f"{work}/pretrain.jsonl", f"{work}/sft.jsonl", f"{work}/tokenizer", f"{work}/pretrain.bin"
    size = os.path.getsize
    rows = []
    t, peak, _ = run_step(python("deal_dataset.py", "--pretrain_src", raw_pretrain, "--pretrain_out", pretrain))
    rows.append(row("deal_dataset --pretrain_src", size(raw_pretrain), t, peak, "1 process"))
    t, peak, _ = run_step(python("deal_dataset.py", "--sft_src", raw_sft, "--sft_out", sft))
    rows.append(row("deal_dataset --sft_src", size(raw_sft), t, peak, "1 process"))
    tokenizer_args = ["--max_chars", max_chars] if max_chars is not None else []
    t, peak, _ = run_step(python("train_tokenizer.py", "--data_path", pretrain, "--save_dir", tok, *tokenizer_args))
    rows.append(row("train_tokenizer" + (f" --max_chars {max_chars}" if max_chars is not None else ""),
                    size(pretrain), t, peak, "sampled, 2 threads"))
    num_proc = os.cpu_count()
    t, peak, _ = run_step(python("pretokenize.py", "--data_path", pretrain, "--tokenizer_path", tok,
                                 "--out_path", bin_path, "--num_proc", num_proc))
    rows.append(row(f"pretokenize --num_proc {num_proc}", size(pretrain), t, peak, f"{num_proc} worker(s)"))
    index_code = ("import sys; sys.path.insert(0, 'code'); from dataset import SFTDataset; "
                  "from train_tokenizer import load_tokenizer; "
                  f"d = SFTDataset({sft!r}, load_tokenizer({tok!r}), 512); print(len(d), d.offsets.nbytes)")
    t, peak, _ = run_step([sys.executable, "-c", index_code])
    rows.append(row("SFTDataset index (per rank)", size(sft), t, peak, "byte offsets, 8 bytes a line"))
    return rows


def last_step(out_dir):
    """The step of the last line of out_dir/metrics.jsonl (0 before the first)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), "rb") as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1]).get("step", 0) if lines else 0
    except (OSError, ValueError):
        return 0


def training_memory(work, steps=TRAIN_STEPS, nproc=1, sft=False, num_workers=2):
    """A tiny model trained for `steps` steps; the memory of all its processes early and late in the run."""
    out = f"{work}/train_{'sft' if sft else 'pretrain'}_{nproc}"
    data = f"{work}/sft.jsonl" if sft else f"{work}/pretrain.bin"
    args = ["--data_path", data, "--tokenizer_path", f"{work}/tokenizer", "--out_dir", out,
            "--dim", 64, "--n_layers", 2, "--n_heads", 4, "--n_kv_heads", 2, "--max_seq_len", 128,
            "--batch_size", 4, "--accumulation_steps", 1, "--max_steps", steps, "--log_interval", 50, "--eval_interval", 0,
            "--save_interval", 0, "--num_workers", num_workers, "--dtype", "float32", "--no-compile", "--val_data_path", ""]
    script = "ddp_sft.py" if sft else "ddp_pretrain.py"
    if sft:  # fine-tune the model of the pretraining run
        args += ["--pretrained_path", f"{work}/train_pretrain_1"]
    argv = (python(script, *args) if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), os.path.join(CODE, script), *map(str, args)])
    series = []  # (step, memory) of every poll

    def note(used):
        series.append((last_step(out), used))
    t, peak, _ = run_step(argv, env={"OMP_NUM_THREADS": "1"} if nproc > 1 else None, on_sample=note)
    # memory swings within a step (activations come and go): compare the highest of a window of
    # steps early in the run with the highest of the last steps
    early = max((used for step, used in series if 100 <= step <= 400), default=0)
    late = max((used for step, used in series if steps - 300 <= step < steps), default=0)  # not the final save
    growth = (late - early) / early * 100 if early else float("nan")
    return {"run": f"{'SFT jsonl' if sft else 'packed .bin'}, {nproc} process(es) x {num_workers} workers",
            "data": f"{os.path.getsize(data) / 1e9:.2f} GB", "steps": steps, "time": f"{t:.0f} s",
            "memory, steps 100-400": f"{early / 2**30:.2f} GiB", f"steps {steps - 300}-{steps}": f"{late / 2**30:.2f} GiB",
            "change": f"{growth:+.1f}%"}


def tokenizer_sweep(work, gib):
    """Tokenizer training's peak memory and time against --max_chars (whole input), and against
    the input size (prefixes of the corpus, fixed --max_chars)."""
    from train_tokenizer import MAX_CHARS
    pretrain = f"{work}/pretrain.jsonl"
    rows = []
    for max_chars in (2_500_000, 5_000_000, 10_000_000, 20_000_000):
        t, peak, _ = run_step(python("train_tokenizer.py", "--data_path", pretrain, "--save_dir", f"{work}/tok_sweep",
                                     "--max_chars", max_chars))
        rows.append(row(f"--max_chars {max_chars / 1e6:.0f}M", os.path.getsize(pretrain), t, peak))
    size = os.path.getsize(pretrain)
    for fraction in (0.25, 0.5):
        prefix = f"{work}/prefix.jsonl"
        with open(pretrain, "rb") as src, open(prefix, "wb") as dst:
            dst.write(src.read(int(size * fraction)))
            dst.write(src.readline())  # end on a whole line
        t, peak, _ = run_step(python("train_tokenizer.py", "--data_path", prefix, "--save_dir", f"{work}/tok_sweep"))
        rows.append(row(f"--max_chars {MAX_CHARS / 1e6:.0f}M (default), {fraction:.0%} of the corpus",
                        os.path.getsize(prefix), t, peak))
        os.remove(prefix)
    return rows


def sampler_memory(n=10_000_000, world_size=4):
    """Memory of one epoch's index on one rank, for n samples (packed windows): DistributedSampler's
    list, as a loader that resumes mid-epoch uses it, against ShardSampler's tensor."""
    ways = {"DistributedSampler, list(sampler)": ("from torch.utils.data import DistributedSampler",
                "s = DistributedSampler(range(N), num_replicas=W, rank=0, shuffle=True, drop_last=True); "
                "s.set_epoch(0); held = list(s)[0:]"),
            "ShardSampler (dataset.py)": ("sys.path.insert(0, 'code'); from dataset import ShardSampler",
                                          "held = ShardSampler(N, W, 0); first = list(zip(range(10), held))")}
    rows = []
    for name, (setup, build) in ways.items():
        script = (f"import resource, sys, torch; N, W = {n}, {world_size}; {setup}; "
                  f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; {build}; "
                  "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append({"index of one epoch": name, "samples": f"{n / 1e6:.0f}M", "ranks": world_size,
                     "peak memory per rank": f"{int(done.stdout) / 2**20:.0f} MiB"})
    return rows


def build_corpora(work, gib, source=SOURCE, seed=SEED):
    if not os.path.isfile(source):
        sys.exit(f"error: {source}: not found; run `python code/deal_dataset.py --demo` first")
    os.makedirs(work, exist_ok=True)
    maker = TextMaker(source, seed)
    total = int(gib * 2**30)
    t0 = time.time()
    make_seq_monkey(maker, f"{work}/seq_monkey.jsonl", int(total * (1 - SFT_SHARE)))
    make_belle(maker, f"{work}/belle.json", int(total * SFT_SHARE))
    print(f"synthetic corpora: {total / 2**30:.2f} GiB in {time.time() - t0:.0f} s", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=GIB, help=f"size of the two synthetic corpora together (default: {GIB})")
    parser.add_argument("--work_dir", default=WORK_DIR, help=f"where the corpora and outputs go (default: {WORK_DIR})")
    parser.add_argument("--source", default=SOURCE, help=f"jsonl text whose characters the corpora use (default: {SOURCE})")
    parser.add_argument("--train_steps", type=int, default=TRAIN_STEPS, help=f"steps of each training run; 0 = none (default: {TRAIN_STEPS})")
    parser.add_argument("--parts", default="data,train",
                        help="what to measure, comma-separated: index (sampler memory), data (every data step), sweep "
                             "(tokenizer memory and time against --max_chars and input size), train (memory over a "
                             "long run) (default: data,train)")
    parser.add_argument("--reuse", action="store_true", help="keep corpora (and outputs) already in --work_dir")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"index", "data", "sweep", "train"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    work = args.work_dir
    if not (args.reuse and os.path.isfile(f"{work}/belle.json")):
        build_corpora(work, args.gib, args.source)
    if "index" in parts:
        print_table(sampler_memory(10_000_000, 1) + sampler_memory(10_000_000, 4))
    if "data" in parts or not os.path.isfile(f"{work}/pretrain.bin"):
        print_table(data_steps(work))
    if "sweep" in parts:
        sys.path.insert(0, CODE)
        print_table(tokenizer_sweep(work, args.gib))
    if "train" in parts and args.train_steps:
        runs = [training_memory(work, args.train_steps, nproc, sft) for sft in (False, True) for nproc in (1, 2)]
        print_table(runs)


if __name__ == "__main__":
    main()
