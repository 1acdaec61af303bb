#!/usr/bin/env bash
# Fetch the chapter's real corpora into data/ and convert them for the trainers.
# Needs internet and ~40 GB of disk. Run from the repository root: bash code/download_dataset.sh
#   pretraining: seq-monkey general corpus (Mobvoi), from ModelScope
#   SFT:         BelleGroup train_3.5M_CN, from the Hugging Face hub
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data
pip install -q modelscope huggingface_hub

# seq-monkey: a .tar.bz2 holding mobvoi_seq_monkey_general_open_corpus.jsonl ({"text": ...} per line)
modelscope download --dataset ddzhu123/seq-monkey mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2 --local_dir data
tar -xjf data/mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2 -C data

# BelleGroup: train_3.5M_CN.json ({"conversations": [{"from": "human", "value": ...}, ...]} per line)
# (set HF_ENDPOINT=https://hf-mirror.com where the hub is slow)
hf download BelleGroup/train_3.5M_CN --repo-type dataset --local-dir data/BelleGroup

python code/deal_dataset.py --pretrain_src data/mobvoi_seq_monkey_general_open_corpus.jsonl --pretrain_out data/pretrain.jsonl
python code/deal_dataset.py --sft_src data/BelleGroup/train_3.5M_CN.json --sft_out data/sft.jsonl
