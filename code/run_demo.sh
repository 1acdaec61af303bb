#!/usr/bin/env bash
# The whole chapter on the demo data, on CPU, in under 10 minutes:
# demo data (Tang poems, dialogs) -> tokenizer -> token files -> pretrain -> SFT -> eval -> samples.
# Run from the repository root: bash code/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1

stage() {  # stage NAME COMMAND...: run a step and report its wall time
  local name=$1; shift
  echo; echo "==== $name: $*"
  local start=$SECONDS
  "$@"
  echo "==== $name took $((SECONDS - start))s"
  TIMES+=("$name: $((SECONDS - start))s")
}
TIMES=()

stage "1. demo data" python code/deal_dataset.py --demo
stage "2. tokenizer" python code/train_tokenizer.py \
  --data_path data/demo_pretrain.jsonl data/demo_sft.jsonl --save_dir tokenizer_k --vocab_size 6144
stage "3. pretokenize" python code/pretokenize.py \
  --data_path data/demo_pretrain.jsonl data/demo_pretrain_val.jsonl --tokenizer_path tokenizer_k
stage "4. pretrain" python code/ddp_pretrain.py --preset demo \
  --data_path data/demo_pretrain.bin --val_data_path data/demo_pretrain_val.bin --out_dir output/pretrain
stage "5. SFT" python code/ddp_sft.py --preset demo \
  --data_path data/demo_sft.jsonl --val_data_path data/demo_sft_val.jsonl \
  --pretrained_path output/pretrain --out_dir output/sft
stage "6. eval" python code/eval_model.py --checkpoint output/sft --baseline output/pretrain
samples() {  # the samples go to the terminal and into the report
  python code/model_sample.py --mode pretrain --checkpoint output/pretrain --max_new_tokens 80
  python code/model_sample.py --mode chat --checkpoint output/sft --max_new_tokens 80
}
stage "7. samples and chat" eval 'samples | tee output/samples.txt'

echo; echo "==== wall time per stage"
printf '  %s\n' "${TIMES[@]}" | tee output/stage_times.txt
python code/report.py --out output/report.md --runs output/pretrain output/sft \
  --stage_times output/stage_times.txt --samples output/samples.txt --eval output/sft/eval.json
