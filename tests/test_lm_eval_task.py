"""The lm-evaluation-harness task code/lm_eval_tasks/tiny_k_poems.yaml, checked without lm-eval:
it reads the file eval_model.py reads and scores the same tokens, and its aggregate is the
bits per character eval_model.py prints."""
import importlib.util
import math
import os

import pytest
import yaml

from conftest import CODE

TASK_DIR = os.path.join(CODE, "lm_eval_tasks")


class TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML: "!function module.name" names a function in a .py file beside the YAML."""


TaskLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


@pytest.fixture(scope="module")
def task():
    with open(os.path.join(TASK_DIR, "tiny_k_poems.yaml"), encoding="utf-8") as f:
        return yaml.load(f, Loader=TaskLoader)


def task_function(reference):
    kind, dotted = reference
    module, name = dotted.rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(module, os.path.join(TASK_DIR, module + ".py"))
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return getattr(code, name)


def test_task_reads_the_held_out_poems_of_eval_model(task):
    import eval_model
    assert task["task"] == "tiny_k_poems" and task["output_type"] == "loglikelihood_rolling"
    assert task["dataset_path"] == "json"
    assert task["dataset_kwargs"]["data_files"][task["test_split"]] == eval_model.BPC_DATA
    assert callable(task_function(task["process_results"]))


def test_target_is_tokenized_as_eval_model_reads_a_poem(task, tokenizer):
    """lm-eval puts bos in front of the target; "<s> text </s>" must be the ids eval_model scores."""
    from jinja2 import Template
    text = "五言绝句《春晓》\n春眠不觉晓，处处闻啼鸟。"
    target = Template(task["doc_to_target"]).render(text=text)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_aggregate_is_eval_models_bits_per_character(task):
    import eval_model
    process = task_function(task["process_results"])
    docs = [{"text": "春眠不觉晓，处处闻啼鸟。"}, {"text": "Hello\n你好"}]
    logliks = [-40.5, -17.25]
    per_doc = [process(doc, (ll,)) for doc, ll in zip(docs, logliks)]
    metrics = {m["metric"]: m for m in task["metric_list"]}
    assert set(metrics) == set(per_doc[0]) == {"bits_per_char", "bits_per_byte"}
    assert all(m["aggregation"] == "bits_per_byte" and m["higher_is_better"] is False for m in metrics.values())

    def aggregate(name):  # lm-eval's bits_per_byte aggregation: -weighted mean / ln 2
        pairs = [d[name] for d in per_doc]
        return -sum(ll for ll, _ in pairs) / sum(n for _, n in pairs) / math.log(2)
    n_chars = sum(len(d["text"]) for d in docs)
    assert aggregate("bits_per_char") == pytest.approx(eval_model.bits_per_char_from_nats(-sum(logliks), n_chars))
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    assert aggregate("bits_per_byte") == pytest.approx(aggregate("bits_per_char") * n_chars / n_bytes)
