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
# sliding window, legal TTT) at 4 x 128: ~2.5 min of training and ~2 min of eval on 2 CPU cores.
export DATA_PATH="${DATA_PATH:-./data/datasets/pdmix_sp1024}" TOKENIZER_PATH="${TOKENIZER_PATH:-./data/tokenizers/pdmix_1024_bpe.model}"
export RUN_ID="${RUN_ID:-main_job_$(date +%Y%m%d_%H%M%S)}" ARTIFACT_PATH="${ARTIFACT_PATH:-final_model.int6.ptz}"
for kv in NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=3 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \
          ITERATIONS=100000 MAX_WALLCLOCK_SECONDS=150 WARMUP_STEPS=0 WARMDOWN_ITERS=100 VAL_LOSS_EVERY=0 \
          TRAIN_LOG_EVERY=50 VE_LAYERS=2,3 VE_DIM=64 XSA_LAST_N=2 BIGRAM_VOCAB_SIZE=1024 BIGRAM_DIM=64 \
          ROPE_DIMS=16 EMA_DECAY=0.98 EVAL_STRIDE=128 VAL_BATCH_SIZE=8192 TTT_CHUNK_TOKENS=16384 TTT_EPOCHS=1 \
          TTT_LR=0.005 EVAL_BUDGET_SECONDS=240; do
  name="${kv%%=*}"; export "$name=${!name:-${kv#*=}}"  # an env var already set wins
done
"$PY" train_gpt.py
echo "---- $RUN_ID: logs/$RUN_ID.txt, logs/$RUN_ID.json, $ARTIFACT_PATH"
grep -E "^(final_int6_roundtrip_exact|final_int6_sliding_window_exact|legal_ttt_exact|Total submission size)" "logs/$RUN_ID.txt"
