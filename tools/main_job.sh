#!/usr/bin/env bash
# The main job, from a fresh clone: install, build the embedded corpus's tokenizer and shards if
# missing, train the full stack at laptop scale (a GPU is used when present: same wallclock, more
# steps), export the int6 artifact, score it from disk, print val_bpb and the artifact bytes.
# Every knob can be overridden from the environment, e.g. MAX_WALLCLOCK_SECONDS=60 bash tools/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
PY=.venv/bin/python
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0  # CPU wheel; a GPU box keeps its torch
"$PY" -m pip install -q -r requirements.txt
"$PY" data/prepare_data.py --if-missing

# The record stack (BigramHash, SmearGate, XSA, VE, partial RoPE, EMA, late QAT, int6 GPTQ-lite,
# sliding window, legal TTT) at 4 x 128 (tools/cpu_scale.env): ~2.5 min of training and ~2.5 min of
# eval on 2 CPU cores.
export DATA_PATH="${DATA_PATH:-./data/datasets/pdmix_sp1024}" TOKENIZER_PATH="${TOKENIZER_PATH:-./data/tokenizers/pdmix_1024_bpe.model}"
export RUN_ID="${RUN_ID:-main_job_$(date +%Y%m%d_%H%M%S)}" ARTIFACT_PATH="${ARTIFACT_PATH:-final_model.int6.ptz}"
# PRESET=configs/X.env: that record's system shrunk to this scale (tools/preset_cpu.env wins over the preset)
files=(tools/cpu_scale.env)
[[ -n "${PRESET:-}" ]] && files=(tools/preset_cpu.env "$PRESET")
for file in "${files[@]}"; do
  while IFS='=' read -r name value; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    export "$name=${!name-$value}"  # an env var already set (even to "") wins
  done < "$file"
done
"$PY" train_gpt.py
echo "---- $RUN_ID: logs/$RUN_ID.txt, logs/$RUN_ID.json, $ARTIFACT_PATH"
grep -E "^(final_int6_roundtrip_exact|final_int6_sliding_window_exact|legal_ttt_exact|Total submission size)" "logs/$RUN_ID.txt"
