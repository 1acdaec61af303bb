#!/usr/bin/env bash
# The whole chapter on the demo data, on CPU, in under 10 minutes:
# demo data (Tang poems, dialogs) -> tokenizer -> token files -> pretrain -> SFT -> eval -> samples.
# Run from the repository root: bash code/run_demo.sh [--seed N]
# --seed N (default 42) reaches every stage: the training poems' order and the SFT requests, the
# model's initialisation and batch order, the sampling. The held-out poems stay the same.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
SEED=42
while [ $# -gt 0 ]; do
  case $1 in
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    *) echo "usage: bash code/run_demo.sh [--seed N]" >&2; exit 2 ;;
  esac
done

stage() {  # stage NAME COMMAND...: run a step and report its wall time
  local name=$1; shift
  echo; echo "==== $name: $*"
  local start=$SECONDS
  "$@"
  echo "==== $name took $((SECONDS - start))s"
  TIMES+=("$name: $((SECONDS - start))s")
}
TIMES=()

stage "1. demo data" python code/deal_dataset.py --demo --seed "$SEED"
stage "2. tokenizer" python code/train_tokenizer.py --split_cjk \
  --data_path data/demo_pretrain.jsonl data/demo_sft.jsonl --save_dir tokenizer_k --vocab_size 6144
stage "3. pretokenize" python code/pretokenize.py \
  --data_path data/demo_pretrain.jsonl data/demo_pretrain_val.jsonl --tokenizer_path tokenizer_k
stage "4. pretrain" python code/ddp_pretrain.py --preset demo \
  --data_path data/demo_pretrain.bin --val_data_path data/demo_pretrain_val.bin --out_dir output/pretrain --seed "$SEED"
stage "5. SFT" python code/ddp_sft.py --preset demo \
  --data_path data/demo_sft.jsonl --val_data_path data/demo_sft_val.jsonl \
  --pretrained_path output/pretrain --out_dir output/sft --seed "$SEED"
stage "6. eval" python code/eval_model.py --checkpoint output/sft --baseline output/pretrain --seed "$SEED"
samples() {  # the samples go to the terminal and into the report
  python code/model_sample.py --mode pretrain --checkpoint output/pretrain --max_new_tokens 80 --seed "$SEED"
  python code/model_sample.py --mode chat --checkpoint output/sft --max_new_tokens 80 --seed "$SEED"
}
stage "7. samples and chat" eval 'samples | tee output/samples.txt'

echo; echo "==== wall time per stage"
printf '  %s\n' "${TIMES[@]}" "total: ${SECONDS}s" | tee output/stage_times.txt
# each seed's results kept apart: python code/eval_model.py --summarize output/seeds/*/eval.json
mkdir -p "output/seeds/$SEED" && cp output/sft/eval.json output/stage_times.txt "output/seeds/$SEED/"
python code/report.py --out output/report.md --runs output/pretrain output/sft \
  --stage_times output/stage_times.txt --samples output/samples.txt --eval output/sft/eval.json
