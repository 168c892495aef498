#!/usr/bin/env bash
# The README's main job: train LoCoCo compressors on the embedded SmolLM2 (recipe quickstart, <= 25 min of training
# on 2 cores), then score the trained adapter against the untrained one and the training-free baselines at the same
# cache size (128 entries per layer and KV head) on held-out 4K-token chunked perplexity and passkey retrieval. Every
# method sees the prompt in chunks of 512 tokens, compressed between chunks, as LoCoCo does. Ends with the verdict:
# how much of the gap between the best training-free method (the lowest perplexity of them all) and the full cache
# training closed, and what compression costs against the full cache with the same trained LoRA (a control row).
#   scripts/quickstart.sh                               # into outputs/quickstart
#   SAMPLES=2 scripts/quickstart.sh                     # quicker evaluation
#   FIT_ARGS="trainer.max_steps=2" SAMPLES=1 scripts/quickstart.sh     # a smoke run of the whole pipeline
#   REUSE_TRAINED=1 scripts/quickstart.sh               # evaluate OUT/trained again without retraining
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/quickstart}
SAMPLES=${SAMPLES:-8}
read -r -a FIT <<< "recipe=quickstart ${FIT_ARGS:-}"
if [ "${REUSE_TRAINED:-0}" = 1 ]; then
  rm -rf "$OUT/untrained" "$OUT/eval" "$OUT/sweeps"
else
  rm -rf "$OUT"
  $BIN/kvtune fit "${FIT[@]}" hydra.run.dir="$OUT/trained"
fi
# the same adapter before any step (the recipe's initialisation, same seed): what training adds
$BIN/kvtune fit "${FIT[@]}" trainer.max_steps=0 hydra.run.dir="$OUT/untrained"
EVAL=(budget=128 context_length=4096 samples="$SAMPLES" results_dir="$OUT/eval")
for adapter in trained untrained; do
  $BIN/kvtune eval "${EVAL[@]}" task=perplexity,passkey method=lococo adapter="$OUT/$adapter/adapter" \
    label="lococo_$adapter" hydra.sweep.dir="$OUT/sweeps/$adapter" -m
done
$BIN/kvtune eval "${EVAL[@]}" task=perplexity,passkey method=full hydra.sweep.dir="$OUT/sweeps/full" -m
# control: the trained LoRA with the full cache, i.e. what training changed in the model itself, apart from compression
$BIN/kvtune eval "${EVAL[@]}" task=perplexity method=full adapter="$OUT/trained/adapter" label=full_with_trained_lora \
  hydra.sweep.dir="$OUT/sweeps/control" -m
# every training-free method issue 11 names, plus tova (the strongest question-agnostic one on passkey)
$BIN/kvtune eval "${EVAL[@]}" task=perplexity,passkey method=h2o,snapkv,adakv_snapkv,streaming_llm,kvmerger,tova \
  +method_kwargs.prefill_chunk=512 \
  hydra.sweep.dir="$OUT/sweeps/baselines" -m
rm -rf "$OUT/sweeps" "$OUT"/*/checkpoints   # job logs and training states: the adapters and results stay
$BIN/kvtune report "$OUT/eval"
$BIN/python scripts/lococo_verdict.py "$OUT/eval"
