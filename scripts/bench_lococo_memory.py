"""Peak memory of one LoCoCo training step against sequence length, beside full-sequence fine-tuning.

    python scripts/bench_lococo_memory.py [--lengths 4096 8192 16384] [--mem-size 512] [--block-size 512]
    python scripts/bench_lococo_memory.py --objectives distill --full-lengths   # the distillation objective only

Each configuration runs in its own process and trains one sequence with compressors plus LoRA r=8 (the extension
recipe's trainable set). It reports the peak (RSS on CPU, the CUDA allocator's peak on GPU) and the peak above what
the loaded model already held (on CPU its weights are paged in first: the snapshot is memory-mapped). LoCoCo feeds
the sequence chunk by chunk with a backward per chunk, so its peak should not grow with the length.
``--objectives distill`` (or ``distill+lm``) adds the full-cache teacher: one no-grad pass over the sequence before
the student's chunks keeps its top-k log-probabilities per token and drops its uncompressed cache, so the student's
chunks run as with ``lm``. That pass is inference with a full cache (2 x layers x KV heads x head_dim x 4 bytes per
token); a ``teacher_pass`` row measures it alone, so the step's peak can be read as the larger of the two.
Full-sequence fine-tuning (the same trainable tensors, one forward and backward over the whole sequence with full
attention) grows with it. Positions beyond the model's trained context use linear interpolation (PI). Prints a
markdown table and writes it with the raw rows to ``--out`` (``.md``, ``.json``).
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
    """Runs in a fresh process: build the model, train one sequence, report the peak.

    ``mode``: ``lococo`` (objective lm), ``lococo_distill``, ``lococo_distill+lm``, ``teacher_pass`` (the
    distillation targets alone), or ``full_sequence``.
    """
    import psutil
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    import kvtune
    from kvtune.eval.corpus import corpus_text
    from kvtune.lococo import LoCoCoConfig
    from kvtune.train.module import chunked_losses, teacher_targets

    model, tokenizer = kvtune.load_model("embedded")
    factor = max(1.0, length / model.config.max_position_embeddings)
    if factor > 1.0:
        model, tokenizer = kvtune.load_model("embedded", position_interpolation=factor)
    # the extension recipe's trainable set: compressors plus LoRA r=8 on q/k/v/o
    model = get_peft_model(model, LoCoCoConfig(mem_size=mem_size, block_size=block_size, init_std=0.02, lora_r=8))
    model.train()
    stream = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    ids = torch.tensor(stream[:length])[None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        for parameter in model.parameters():  # page the weights in: the snapshot is memory-mapped, read on first use
            parameter.detach().sum()
        base = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    if mode.startswith("lococo"):
        objective = mode.partition("_")[2] or "lm"
        losses = chunked_losses(model, ids, block_size, backward=torch.Tensor.backward, objective=objective)
        loss = sum(losses) / len(losses)
    elif mode == "teacher_pass":
        logprobs, _ = teacher_targets(model, ids, block_size, top_k=128)
        loss = float(-logprobs[0, :-1, 0].mean())  # no loss here: the column shows the teacher's top-1 NLL
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
    return {
        "mode": mode,
        "length": length,
        "peak_mib": peak,
        "above_model_mib": peak - base,
        "seconds": seconds,
        "loss": loss,
        "device": device.type,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--full-lengths", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--objectives", nargs="+", default=["lm"], choices=["lm", "distill", "distill+lm"])
    parser.add_argument("--mem-size", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_lococo_memory"), help="writes OUT.json, OUT.md")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.one[0], int(args.one[1]), args.mem_size, args.block_size)))
        return
    modes = ["lococo" if o == "lm" else f"lococo_{o}" for o in args.objectives]
    runs = [(m, n) for m in modes for n in args.lengths]
    if any("distill" in m for m in modes):
        runs += [("teacher_pass", n) for n in args.lengths]
    runs += [("full_sequence", n) for n in args.full_lengths]
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
    table = markdown(rows, args.mem_size, args.block_size)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(rows: list[dict], mem_size: int, block_size: int) -> str:
    """Peak memory per (training, length), and each LoCoCo peak against its shortest sequence's."""
    firsts = {}
    for r in rows:
        if r["mode"].startswith("lococo") and "error" not in r:
            firsts.setdefault(r["mode"], r["above_model_mib"])
    lines = [
        f"| training (M={mem_size}, B={block_size}) | sequence | device | peak MiB | above the model, MiB | "
        "vs LoCoCo at the shortest | seconds | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row['length']} | | failed: {row['error']} | | | | |")
            continue
        first = firsts.get(row["mode"], next(iter(firsts.values()), None))
        ratio = f"{row['above_model_mib'] / first:.2f}x" if first else ""
        cells = (
            f"{row['peak_mib']:.0f} | {row['above_model_mib']:.0f} | {ratio} | {row['seconds']:.1f} | {row['loss']:.3f}"
        )
        lines.append(f"| {row['mode']} | {row['length']} | {row['device']} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
