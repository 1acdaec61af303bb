"""Loss curves and a report card: what a training run did, at a glance.

Every training run ends by drawing OUT_DIR/loss_curve.png from OUT_DIR/metrics.jsonl; with
--report it also writes OUT_DIR/report.md. run_demo.sh ends with

    python code/report.py --out output/report.md --runs output/pretrain output/sft \
        --stage_times times.txt --samples samples.txt --eval output/sft/eval.json
"""
import argparse
import json
import os
import platform
import sys

import torch

from cli import HelpFormatter


def read_metrics(out_dir: str):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def plot_losses(out_dir: str) -> str:
    """Train and validation loss against the step (from step 0, before training), and beside it
    the learning rate schedule, from metrics.jsonl, as loss_curve.png."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    metrics = read_metrics(out_dir)
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    lr = [(m["step"], m["lr"]) for m in metrics if "lr" in m]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(os.path.basename(os.path.normpath(out_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate (warmup, cosine)")
    ax_lr.grid(alpha=0.3)
    path = os.path.join(out_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {device}; Python {platform.python_version()}, torch {torch.__version__}"


def run_summary(out_dir: str, report_dir: str) -> str:
    """A markdown section: parameters, steps, time, tokens/s, final losses, the curve."""
    from k_model import ModelConfig, Transformer, count_parameters
    metrics = read_metrics(out_dir)
    train = [m for m in metrics if "tokens_per_s" in m]  # the log lines of training steps (not step 0)
    val = [m for m in metrics if "val_loss" in m]
    with torch.device("meta"):  # count parameters without allocating them
        n_params = count_parameters(Transformer(ModelConfig.from_pretrained(out_dir)))
    lines = [f"### {out_dir}", "", "| | |", "| --- | --- |", f"| parameters | {n_params / 1e6:.2f}M |"]
    if train:
        speed = sum(m["tokens_per_s"] for m in train) / len(train)
        lines += [f"| optimizer steps | {train[-1]['step']} |", f"| training time | {train[-1]['time']:.0f} s |",
                  f"| tokens/s (mean of the log lines) | {speed:,.0f} |", f"| final train loss | {train[-1]['loss']:.4f} |"]
    if val:
        lines.append(f"| final validation loss | {val[-1]['val_loss']:.4f} |")
    curve = os.path.join(out_dir, "loss_curve.png")
    if os.path.isfile(curve):
        lines += ["", f"![loss curve of {out_dir}]({os.path.relpath(curve, report_dir)})"]
    return "\n".join(lines)


def eval_summary(path: str, n_poems: int = 3) -> str:
    """A markdown section from eval_model.py's eval.json: bits per character, the table, and
    n_poems poems the model wrote (greedy), with their requests."""
    from eval_model import format_table
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    bpc = result["bits_per_char"]
    lines = [f"## Eval: {result['n']} held-out requests ({result['checkpoint']})", "",
             "Bits per character on the held-out poems: "
             + ", ".join(f"{name} {value:.3f}" for name, value in bpc.items() if name not in ("n_texts", "n_chars")), "",
             "```", format_table(result["metrics"]), "```", "",
             f"greedy/sampled: {result['checkpoint']}; "
             + "".join(f"{os.path.basename(os.path.normpath(p))}_*: {p}; " for p in result.get("compare", []))
             + ("pretrain_*: the pretrained model given the request as plain text; " if result.get("baseline") else "")
             + "ceiling: the real poems; floor: random lines of the right shape.", ""]
    seeds = result["sampling"].get("seeds", 1)
    if seeds > 1:
        lines += [f"sampled columns: the mean of {seeds} seeds; their standard deviation of the mean score: "
                  + ", ".join(f"{column} {sd['mean_score']:.3f}" for column, sd in result["sampled_sd"].items()), ""]
    lines += ["Poems the model wrote:", ""]
    for example in result["examples"][:n_poems]:
        lines += [f"> {example['request']}", "", "```", example["greedy"], "```", ""]
    return "\n".join(lines)


def write_report(path: str, runs, stage_times: str = "", samples: str = "", eval_path: str = None) -> None:
    report_dir = os.path.dirname(os.path.abspath(path))
    parts = ["# Tiny-K run report", "", f"Machine: {machine()}", ""]
    if stage_times:
        parts += ["## Wall time per stage", "", "```", stage_times.strip("\n"), "```", ""]
    if eval_path:
        parts += [eval_summary(eval_path), ""]
    parts += ["## Training runs", ""] + [run_summary(r, report_dir) + "\n" for r in runs]
    if samples:
        parts += ["## Samples", "", "```", samples.strip("\n"), "```", ""]
    os.makedirs(report_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="output/report.md", help="the report to write")
    parser.add_argument("--runs", nargs="+", required=True, help="training output directories")
    parser.add_argument("--stage_times", help="a text file of stage wall times")
    parser.add_argument("--samples", help="a text file of sample generations")
    parser.add_argument("--eval", help="an eval.json of eval_model.py (default: none)")
    args = parser.parse_args(argv)

    def read(path):
        return open(path, encoding="utf-8").read() if path and os.path.isfile(path) else ""
    missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "metrics.jsonl"))]
    if missing:
        sys.exit(f"error: {missing[0]}: no metrics.jsonl (not a training output directory)")
    if args.eval and not os.path.isfile(args.eval):
        sys.exit(f"error: {args.eval}: no such eval file (run code/eval_model.py first)")
    write_report(args.out, args.runs, read(args.stage_times), read(args.samples), args.eval)


if __name__ == "__main__":
    main()
