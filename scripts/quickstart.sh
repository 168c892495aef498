#!/usr/bin/env bash
# The README's main job: train LoCoCo compressors on the embedded SmolLM2 (recipe quickstart, ~15 min on 2 cores),
# then score the trained adapter against the untrained one and the training-free baselines at the same cache size
# (128 entries per layer and KV head) on held-out 4K-token chunked perplexity and passkey retrieval.
#   scripts/quickstart.sh                 # into outputs/quickstart
#   OUT=docs/results/quickstart SAMPLES=8 scripts/quickstart.sh    # what docs/results.md shows
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/quickstart}
SAMPLES=${SAMPLES:-8}
rm -rf "$OUT"
$BIN/kvtune fit recipe=quickstart hydra.run.dir="$OUT/trained"
# the same adapter before any step (the recipe's initialisation, same seed): what training adds
$BIN/kvtune fit recipe=quickstart trainer.max_steps=0 hydra.run.dir="$OUT/untrained"
EVAL=(task=perplexity,passkey budget=128 context_length=4096 samples="$SAMPLES" results_dir="$OUT/eval")
for adapter in trained untrained; do
  $BIN/kvtune eval "${EVAL[@]}" method=lococo adapter="$OUT/$adapter/adapter" label="lococo_$adapter" \
    hydra.sweep.dir="$OUT/sweeps/$adapter" -m
done
$BIN/kvtune eval "${EVAL[@]}" method=full,h2o,streaming_llm hydra.sweep.dir="$OUT/sweeps/baselines" -m
rm -rf "$OUT/sweeps" "$OUT"/*/checkpoints   # job logs and training states: the adapters and results stay
$BIN/kvtune report "$OUT/eval"
