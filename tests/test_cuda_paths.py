"""The CUDA paths, proved on CPU: one compiled graph for trimmed SFT batches, a compiled decode
step with static shapes, the dtype and compile choices per GPU, multi-node resume without
shared storage, fp16 resumed from bf16, bf16 generation, and imports that go one way."""
import subprocess
import sys

import pytest
import torch

from conftest import CODE, SENTENCES, write_jsonl
from test_resume import ENV, TRAIN
from test_training import pretrain_argv


def graph_breaks():
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def test_trimmed_batches_of_many_lengths_compile_without_graph_breaks(tiny_config):
    """Each new length used to break the graph at SDPA (is_causal became a symbolic bool)."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters
    from k_model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()  # counts the graphs Dynamo hands to the compiler
    compiled = torch.compile(model, backend=backend)
    for length in (16, 24, 40, 56, 64):
        X = torch.randint(5, tiny_config.vocab_size, (2, length))
        compiled(X, X).loss.backward()
    assert graph_breaks() == 0
    assert backend.frame_count <= 2  # the first length, then one dynamic-shape graph for all others


def test_trimmed_lengths_round_up_to_the_multiple_and_keep_the_loss():
    from dataset import trim_padding
    from k_model import IGNORE_INDEX
    X = torch.arange(2 * 200).view(2, 200)
    Y = torch.full((2, 200), IGNORE_INDEX)
    Y[0, :70] = 1
    batch = [(X[i], Y[i], (Y[i] != IGNORE_INDEX).long()) for i in range(2)]
    assert trim_padding(batch)[0].shape[1] == 70
    x, y, mask = trim_padding(batch, multiple=64)
    assert x.shape[1] == 128 and torch.equal(y[:, 70:], torch.full((2, 58), IGNORE_INDEX))
    assert mask.sum() == 70  # the added columns are not trained on
    assert trim_padding(batch, multiple=256)[0].shape[1] == 200  # never past max_length


def test_compiled_decode_step_equals_eager_and_compiles_once(tiny_config):
    from torch._dynamo.testing import CompileCounter
    from k_model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    torch._dynamo.reset()
    backend = CompileCounter()
    model._compiled_decode_step = torch.compile(model.decode_step, backend=backend, fullgraph=True, dynamic=False)
    idx = torch.randint(5, tiny_config.vocab_size, (3, 10))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)):
        eager = model.generate(idx, max_new_tokens=20, attention_mask=mask, **kwargs)
        compiled = model.generate(idx, max_new_tokens=20, attention_mask=mask, compile_decode=True, **kwargs)
        assert torch.equal(eager, compiled)
    # another prompt length and a second call: the same graph (static shapes, the cache's addresses marked)
    compiled = model.generate(idx[:, 3:], max_new_tokens=20, attention_mask=mask[:, 3:], temperature=0.0,
                              compile_decode=True)
    assert torch.equal(compiled, model.generate(idx[:, 3:], max_new_tokens=20, attention_mask=mask[:, 3:],
                                                temperature=0.0))
    assert backend.frame_count == 1 and graph_breaks() == 0


def test_cast_for_inference_keeps_rope_tables_in_float32(tiny_config):
    from k_model import Transformer, cast_for_inference, precompute_freqs_cis
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    idx = torch.randint(5, tiny_config.vocab_size, (1, 12))
    fp32_logits = model(idx).logits
    cast_for_inference(model, torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    cos, sin = precompute_freqs_cis(tiny_config.dim // tiny_config.n_heads, tiny_config.max_seq_len)
    assert model.freqs_cos.dtype == torch.float32 and torch.equal(model.freqs_cos, cos)
    assert torch.equal(model.freqs_sin, sin)
    bf16_logits = model(idx).logits
    assert bf16_logits.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_logits.float(), fp32_logits, atol=0.05, rtol=0.05)
    assert model.generate(idx, max_new_tokens=5, temperature=0.0).shape == (1, 5)


def test_cpu_auto_dtype_follows_the_kernels_aten_runs_not_only_the_chip(monkeypatch):
    import harness
    # a chip with AVX512-BF16, run as ATEN_CPU_CAPABILITY=avx2 (or a CPU without AVX-512) runs:
    # bf16 would be emulated, ~20x slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert harness.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert harness.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert harness.resolve_dtype("auto", "cpu") == torch.float32


def test_emulated_bf16_falls_back_to_fp16_and_old_cards_are_not_compiled(monkeypatch):
    import harness
    # a V100/T4: bf16 "supported" only through emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert harness.resolve_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert harness.resolve_dtype("auto", "cuda") == torch.bfloat16
    for capability, compiled in (((6, 1), False), ((7, 0), True), ((9, 0), True)):  # P40, V100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert harness.compile_by_default("cuda:0") is compiled
    assert harness.compile_by_default("cpu") is False


def test_each_process_seeing_one_gpu_uses_device_0(monkeypatch):
    """Slurm --gpus-per-task=1: LOCAL_RANK 3, but the process sees a single GPU."""
    import harness
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(harness, "cuda_setup_problem", lambda: None)
    monkeypatch.setattr(harness, "check_one_rank_per_gpu", lambda *args: None)  # needs a real GPU's UUID
    monkeypatch.setattr(harness.dist, "init_process_group", lambda **kwargs: chosen.append(kwargs))
    monkeypatch.setattr(harness.dist, "new_group", lambda **kwargs: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    launcher_store = torch.distributed.HashStore()
    monkeypatch.setattr(harness.dist, "rendezvous", lambda *args, **kwargs: iter([(launcher_store, 3, 4)]))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    ctx = harness.Dist("cuda")
    assert ctx.device == "cuda:0" and chosen[0] == "cuda:0"
    assert chosen[1]["timeout"].total_seconds() >= 30 * 60  # a generous collective timeout
    # the third attempt (two restarts) keeps its keys apart from the attempts before it
    chosen[1]["store"].set("address", "x")
    assert launcher_store.get("attempt_2/address") == b"x"


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": s * 3} for s in SENTENCES * 6])


def test_fp16_run_resumes_from_a_bf16_checkpoint(tokenizer_dir, data, tmp_path):
    """A bf16 run saves an empty GradScaler state; fp16 used to crash loading it."""
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, TRAIN, *pretrain_argv(tokenizer_dir, data, out, "--max_steps", "6",
                                                                   "--save_interval", "3", "--dtype", "bfloat16")],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = subprocess.run([sys.executable, TRAIN, *pretrain_argv(
        tokenizer_dir, data, out, "--max_steps", "8", "--dtype", "float16",
        "--resume", str(out / "checkpoints" / "step_00000003.pt"))], env=ENV, capture_output=True, text=True,
        timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout


def two_nodes(tokenizer_dir, data, out_dirs, port, *extra):
    """torchrun --nnodes 2 on 127.0.0.1, each node with its own --out_dir (no shared storage)."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "tinyk",
         TRAIN, *pretrain_argv(tokenizer_dir, data, out, "--max_steps", "8", "--save_interval", "4", *extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for out in out_dirs]
    outputs = [p.communicate(timeout=240) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_multi_node_resume_needs_the_checkpoint_on_every_node(tokenizer_dir, data, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1: both ranks have local rank 0, so anything keyed on the
    local rank (saving, logging, sharding) would show up: the run must equal one process with twice
    the accumulation. Without shared storage, a resume stops every node at once, naming the file;
    with the checkpoint copied to every node, it resumes."""
    import shutil
    from test_training import read_metrics
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    first = two_nodes(tokenizer_dir, data, [node0, node1], 29561)
    assert all(code == 0 for code, _, _ in first), [err[-1500:] for _, _, err in first]
    saved = [n for n in (node0, node1) if (n / "checkpoints").is_dir()]
    assert len(saved) == 1  # rank 0 alone writes checkpoints, on its own node
    assert [n for n in (node0, node1) if (n / "metrics.jsonl").exists()] == saved  # ... and logs
    single = subprocess.run([sys.executable, TRAIN, *pretrain_argv(tokenizer_dir, data, tmp_path / "one", "--max_steps", "8",
                                                                   "--accumulation_steps", "2")],
                            env=ENV, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    one, two = read_metrics(tmp_path / "one", "loss"), read_metrics(saved[0], "loss")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    # resume: the node without the checkpoint must not leave rank 0 waiting for the collective timeout
    results = two_nodes(tokenizer_dir, data, [node0, node1], 29562, "--resume", "auto", "--max_steps", "10")
    assert all(code != 0 for code, _, _ in results)
    errors = "".join(err for _, _, err in results)
    assert "cannot read the checkpoint that rank 0 resumes from" in errors
    assert "step_00000004.pt" in errors and "on storage every node shares" in errors

    other = node1 if saved[0] == node0 else node0
    shutil.copytree(saved[0] / "checkpoints", other / "checkpoints", dirs_exist_ok=True)
    results = two_nodes(tokenizer_dir, data, [node0, node1], 29563, "--resume", "auto", "--max_steps", "10")
    assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    outs = "".join(out for _, out, _ in results)
    assert "resumed from" in outs and "step 10/10" in outs, "".join(err[-1500:] for _, _, err in results)


def test_using_a_model_never_imports_the_training_scripts():
    code = ("import sys; sys.path.insert(0, %r); import model_sample, export_model, serve; "
            "bad = [m for m in ('ddp_pretrain', 'ddp_sft') if m in sys.modules]; print(bad); sys.exit(bool(bad))" % CODE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-1000:]


def fake_nvidia_smi(tmp_path, monkeypatch, line):
    """An nvidia-smi on PATH that lists one GPU: 'name, driver, compute capability'."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho '{line}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{__import__('os').environ['PATH']}")


@pytest.mark.parametrize("build, line, expected", [
    # the default CUDA 13 wheel on a driver older than 580: name the driver, the build and a cu126 wheel
    ("13.0", "Tesla V100-SXM2-32GB, 535.104.05, 7.0", ["driver 535.104.05", "CUDA 13", ">= 580", "whl/cu126"]),
    # a CPU-only wheel on a GPU node with a new driver: the CUDA 13 wheel fits
    (None, "NVIDIA H100 80GB HBM3, 580.65.06, 9.0", ["CPU-only build", "install a CUDA build", "whl/cu130"]),
])
def test_auto_device_stops_when_nvidia_smi_lists_gpus_torch_cannot_use(tmp_path, monkeypatch, build, line, expected):
    import harness
    fake_nvidia_smi(tmp_path, monkeypatch, line)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", build)
    with pytest.raises(SystemExit) as info:
        harness.Dist("auto")
    message = info.value.code
    assert message.startswith("error: nvidia-smi lists 1 GPU(s)") and line.split(",")[0] in message
    assert "pip uninstall -y torch && pip install torch --index-url https://download.pytorch.org/whl/" in message
    for part in expected:
        assert part in message
    assert harness.Dist("cpu").device == "cpu"  # asking for the CPU still trains there


def test_no_nvidia_smi_means_cpu_without_a_word(tmp_path, monkeypatch):
    import harness
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.Dist("auto").device == "cpu"


def test_a_gpu_without_kernels_in_the_build_is_named():
    from cuda_env import gpu_has_kernels
    cuda13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert not gpu_has_kernels(7, 0, cuda13)  # V100: dropped by CUDA 13
    assert gpu_has_kernels(8, 9, cuda13)  # L40S/4090 run sm_86 code
    assert gpu_has_kernels(9, 0, ["sm_90a"]) and gpu_has_kernels(12, 1, cuda13)
    assert gpu_has_kernels(13, 0, ["compute_90"])  # PTX is compiled for newer GPUs
    assert not gpu_has_kernels(8, 0, ["sm_86"])  # a newer minor's code does not run on an older one


def test_more_ranks_than_gpus_fail_with_one_message():
    import harness
    with pytest.raises(SystemExit) as info:
        harness.gpu_for_rank(0, local_world_size=4, visible=2)
    assert "--nproc_per_node 4" in info.value.code and "2 GPUs" in info.value.code
    assert harness.gpu_for_rank(3, 4, 1) == "cuda:0"  # each rank sees only its own GPU
    assert harness.gpu_for_rank(1, 2, 2) == "cuda:1"
    # every rank sees one GPU, the same one: found by comparing UUIDs before NCCL starts
    gpus = ["node1 GPU-aa NVIDIA A100", "node1 GPU-aa NVIDIA A100", "node2 GPU-aa NVIDIA A100"]
    message = harness.shared_gpu_message(gpus)
    assert message.startswith("ranks 0, 1 would share one GPU (NVIDIA A100 on node1)")
    assert harness.shared_gpu_message(["node1 GPU-aa A100", "node1 GPU-bb A100"]) == ""


def test_resume_restores_this_ranks_gpu_rng_only(monkeypatch):
    import checkpoint
    base = checkpoint.rng_state()  # on this CPU machine: no GPU state
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state)))
    checkpoint.set_rng_state(dict(base, cuda=[torch.tensor([i]) for i in range(8)]))  # an older, all-GPU checkpoint
    checkpoint.set_rng_state(dict(base, cuda=[torch.tensor([i]) for i in range(2)]))  # fewer GPUs now than device 3
    checkpoint.set_rng_state(dict(base, cuda=torch.tensor([7])))  # this rank's own, as saved now
    assert restored == [3, 7]
