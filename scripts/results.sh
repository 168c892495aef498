#!/usr/bin/env bash
# Regenerates every measured table of docs/results.md on the embedded model (2-core CPU: about 90 minutes).
#   scripts/results.sh            # everything (about 3 hours)
#   scripts/results.sh bench      # one part: grid | perplexity | passkey | bench | example | quickstart | lococo_memory
# Each part writes a folder under docs/results/ (results.jsonl, samples.jsonl, results.md, results.png or bench.json;
# results only: Hydra's job folders and logs go under outputs/results/), then
# scripts/fill_results.py pastes the tables between the markers of docs/results.md. Commentary outside the
# markers is written by hand: reread it when numbers move.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=docs/results
JOBS=outputs/results  # Hydra's job folders (configs, logs): never under docs/
# `full` ignores the budget (the dashed line of the plots): a sweep computes it once per task and reuses it
FREE=full,random,streaming_llm,h2o,snapkv,pyramidkv,adakv_snapkv,adakv_pyramidkv,kvmerger,lighttransfer
METHODS=$FREE,lighttransfer+adakv_snapkv
PARTS=${*:-passkey bench grid perplexity example quickstart lococo_memory}

for part in $PARTS; do
  case $part in
    grid)  # the quality grid: 4 needle tasks x every method x 4 budgets on 4K-token prompts (one prefill per sample)
      rm -rf $OUT/grid_4k $JOBS/grid_4k
      $BIN/kvtune eval task=passkey,niah_single,niah_multikey,variable_tracking method=$FREE \
        budget=128,256,512,1024 context_length=4096 samples=4 \
        results_dir=$OUT/grid_4k hydra.sweep.dir=$JOBS/grid_4k -m ;;
    perplexity)  # chunked perplexity (512-token chunks, compression between them) on 4K-token stdlib windows
      rm -rf $OUT/perplexity_4k $JOBS/perplexity_4k
      $BIN/kvtune eval task=perplexity method=$FREE budget=128,256,512,1024 context_length=4096 samples=1 \
        results_dir=$OUT/perplexity_4k hydra.sweep.dir=$JOBS/perplexity_4k -m ;;
    passkey)  # issue 2's report: passkey at ~3.5K tokens, question-agnostic and question-aware
      rm -rf $OUT/passkey_3500 $JOBS/passkey_3500
      $BIN/kvtune eval task=passkey question_aware=false,true method=$METHODS budget=256,512,1024 \
        context_length=3500 samples=10 results_dir=$OUT/passkey_3500 hydra.sweep.dir=$JOBS/passkey_3500 -m ;;
    bench)  # speed and memory at 8K tokens against the stock model and a 512-token reference, in one run
      mkdir -p $OUT/bench_8k
      $BIN/kvtune bench "methods=[full,random,streaming_llm,h2o,snapkv,adakv_snapkv,pyramidkv,kvmerger,tova,adakv_tova,lighttransfer,kvzip]" \
        budgets=[512] context_lengths=[8192] batch_sizes=[1] decode_tokens=64 "prefill_chunks=[null,512]" \
        output=$OUT/bench_8k/bench.json ;;
    example)  # the README's multirun example, exactly as printed there (20 samples)
      rm -rf $OUT/readme_example $JOBS/readme_example
      $BIN/kvtune eval model=embedded task=niah_single,passkey method=full,snapkv,adakv_snapkv,streaming_llm \
        budget=128,256,512 context_length=4096 samples=20 \
        results_dir=$OUT/readme_example hydra.sweep.dir=$JOBS/readme_example -m ;;
    quickstart)  # issue 4's main job (= make demo): train, then trained vs untrained vs baselines at 128 entries
      OUT=outputs/quickstart BIN=$BIN scripts/quickstart.sh
      rm -rf $OUT/quickstart && mkdir -p $OUT/quickstart
      cp outputs/quickstart/eval/results.* outputs/quickstart/eval/samples.jsonl $OUT/quickstart/
      cp outputs/quickstart/trained/metrics.json $OUT/quickstart/train_metrics.json ;;
    lococo_memory)  # peak memory of LoCoCo training at 4K/8K/16K against full-sequence fine-tuning
      $BIN/python scripts/bench_lococo_memory.py --out $OUT/lococo_memory ;;
    *) echo "unknown part $part (grid | perplexity | passkey | bench | example | quickstart | lococo_memory)"; exit 2 ;;
  esac
done
$BIN/python scripts/fill_results.py
