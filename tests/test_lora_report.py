"""LoRA fine-tuning with PEFT (adapters only, merge equals base + adapter, torchrun), and the
metrics, loss curve and report every run leaves behind."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE, write_jsonl
from test_training import CHATS, pretrain_argv


@pytest.fixture
def pretrained(tokenizer_dir, tmp_path):
    import ddp_pretrain
    from conftest import SENTENCES
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s} for s in SENTENCES * 4])
    ddp_pretrain.main(pretrain_argv(tokenizer_dir, data, tmp_path / "pre", "--max_steps", "3", "--max_seq_len", "80",
                                    "--report"))
    return tmp_path / "pre"


def sft_argv(tokenizer_dir, pretrained, out, data, *extra):
    return ["--data_path", data, "--tokenizer_path", tokenizer_dir, "--pretrained_path", str(pretrained),
            "--out_dir", str(out), "--batch_size", "8", "--accumulation_steps", "1", "--learning_rate", "1e-2",
            "--warmup_iters", "2", "--max_steps", "15", "--log_interval", "5", "--device", "cpu", "--dtype", "float32",
            "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", *extra]


def test_lora_trains_only_adapters_and_the_merge_equals_base_plus_adapter(tokenizer_dir, pretrained, tmp_path):
    import ddp_sft
    from k_model import load_model
    from peft import PeftModel
    out = tmp_path / "lora"
    ddp_sft.main(sft_argv(tokenizer_dir, pretrained, out, write_jsonl(tmp_path / "sft.jsonl", CHATS * 4)))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "adapter"))

    base = load_model(str(pretrained)).eval()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: trained adapters moved
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[k], base_weights[k]) for k in frozen)  # the base did not change

    merged = load_model(str(out)).eval()
    tokens = torch.randint(5, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens, torch.zeros_like(tokens)).logits,
                                   peft_model(tokens, torch.zeros_like(tokens)).logits, atol=1e-5, rtol=1e-5)
        layer = peft_model.base_model.model.layers[0].attention.wq
        expected = base_weights["layers.0.attention.wq.weight"] + \
            layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged.state_dict()["layers.0.attention.wq.weight"], expected)


def test_lora_under_torchrun(tokenizer_dir, pretrained, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", CHATS * 4)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29553", os.path.join(CODE, "ddp_sft.py"),
                          *sft_argv(tokenizer_dir, pretrained, tmp_path / "lora", data, "--max_steps", "4")],
                         capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 process(es)" in run.stdout and "trainable parameters" in run.stdout
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()


def test_every_run_writes_metrics_a_loss_curve_and_on_request_a_report(pretrained, tmp_path):
    lines = [json.loads(line) for line in open(pretrained / "metrics.jsonl")]
    assert [m["step"] for m in lines if "loss" in m] == [0, 1, 2, 3]  # step 0: before training, lr 0
    assert lines[0]["lr"] == 0.0 and "tokens_per_s" not in lines[0]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "time"} <= m.keys() for m in lines[1:] if "loss" in m)
    assert (pretrained / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (pretrained / "report.md").read_text()
    assert "final train loss" in report and "![loss curve" in report and "0.04M" in report
    assert "## Samples" in report

    import report as report_cli
    out = tmp_path / "all" / "report.md"
    (tmp_path / "times.txt").write_text("1. data: 3s")
    report_cli.main(["--out", str(out), "--runs", str(pretrained), "--stage_times", str(tmp_path / "times.txt")])
    text = out.read_text()
    assert "1. data: 3s" in text and "Machine:" in text and "../pre/loss_curve.png" in text
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report_cli.main(["--runs", str(tmp_path)])
