"""Peak memory of one LoCoCo training step against sequence length, beside full-sequence fine-tuning.

    python scripts/bench_lococo_memory.py [--lengths 4096 8192 16384] [--mem-size 512] [--block-size 512]

Each configuration runs in its own process (peak RSS on CPU, the CUDA allocator's peak on GPU) and trains one
sequence: LoCoCo feeds it chunk by chunk with a backward per chunk, so its peak should not grow with the length;
full-sequence fine-tuning (the same trainable compressors, one forward and backward over the whole sequence with
full attention) grows with it. Positions beyond the model's trained context use linear interpolation (PI).
Prints a markdown table and writes ``outputs/bench_lococo_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_step(mode: str, length: int, mem_size: int, block_size: int) -> dict:
    """Runs in a fresh process: build the model, train one sequence, report the peak."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    import kvtune
    from kvtune.eval.corpus import corpus_text
    from kvtune.lococo import LoCoCoConfig
    from kvtune.train.module import chunked_losses

    model, tokenizer = kvtune.load_model("embedded")
    factor = max(1.0, length / model.config.max_position_embeddings)
    if factor > 1.0:
        model, tokenizer = kvtune.load_model("embedded", position_interpolation=factor)
    model = get_peft_model(model, LoCoCoConfig(mem_size=mem_size, block_size=block_size, init_std=0.02))
    model.train()
    stream = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    ids = torch.tensor(stream[:length])[None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "lococo":
        losses = chunked_losses(model, ids, block_size, backward=torch.Tensor.backward)
        loss = sum(losses) / len(losses)
    else:
        logits = model(input_ids=ids, use_cache=False).logits
        loss_tensor = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss_tensor.backward()
        loss = float(loss_tensor)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "length": length, "peak_mib": peak, "seconds": seconds, "loss": loss, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--full-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--mem-size", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.one[0], int(args.one[1]), args.mem_size, args.block_size)))
        return
    runs = [("lococo", n) for n in args.lengths] + [("full_sequence", n) for n in args.full_lengths]
    rows = []
    for mode, length in runs:
        command = [sys.executable, __file__, "--one", mode, str(length)]
        command += ["--mem-size", str(args.mem_size), "--block-size", str(args.block_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"mode": mode, "length": length, "error": done.stderr.strip().splitlines()[-1][:120]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n| training | sequence | peak MiB | seconds | loss |  (M={args.mem_size}, B={args.block_size})")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['length']} | failed: {row['error']} | | |")
        else:
            cells = f"{row['peak_mib']:.0f} | {row['seconds']:.1f} | {row['loss']:.3f}"
            print(f"| {row['mode']} | {row['length']} | {cells} |")
    out = ROOT / "outputs" / "bench_lococo_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
