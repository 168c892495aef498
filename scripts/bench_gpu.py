"""GPU benchmark at real scale: a Llama-3.1-8B-shaped model (random bf16 weights: speed does not depend on them) at
32K and 128K tokens, batch 1 and 8, `full` (the stock model: transformers' own cache and attention) against
kvtune's compressed caches, with each decode speed set against the bandwidth floor measured in the same run.

Sized for one command of at most 8 minutes on one H100/H200; combinations that cannot fit are skipped and say why.

    python scripts/bench_gpu.py --out outputs/bench_gpu                  # the GPU run (writes table.md, rows.json)
    python scripts/bench_gpu.py --tiny                                   # the same pipeline on CPU, 2 layers, seconds
    python scripts/bench_gpu.py --tiny --device cuda                     # ... on the GPU: a check before the real run

Figures per row: prefill seconds, decode tokens/s, the cache's storage bytes after prefill (`untyped_storage`,
deduplicated), peak allocated memory above the weights, and decode against its floor: a decode step must read the
streamed weights (all but the input embedding, of which it reads B rows) and the whole cache once, so it takes at
least ``(weight bytes + KV bytes) / copy bandwidth``, the bandwidth being that of a large device copy timed here.
Timings are single runs after one warm-up pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from kvtune.bench import measure, synchronize
from kvtune.cache import storage_bytes
from kvtune.methods import available

GIB = 2**30
LLAMA_3_1_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=4096,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
)
METHODS = ["full", "snapkv", "adakv_snapkv", "lighttransfer", "streaming_llm"]


@dataclass
class Settings:
    """One run's grid. The defaults are the GPU run; `tiny()` is the CPU smoke run."""

    contexts: list[int] = field(default_factory=lambda: [32768, 131072])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    budget: int = 1024
    prefill_chunk: int = 2048  # compressed methods prefill chunk by chunk, compressing between chunks
    decode_tokens: int = 32
    time_limit_s: float = 380.0  # rows not started by then are skipped (the whole command must stay under 8 min)
    tiny: bool = False

    @classmethod
    def tiny_run(cls) -> Settings:
        return cls(contexts=[256], batches=[1, 2], budget=32, prefill_chunk=64, decode_tokens=4, tiny=True)


def llama_config(tiny: bool = False) -> LlamaConfig:
    """Llama-3.1-8B's shape (or a 2-layer miniature of it), SDPA attention so that kvtune can route it."""
    return LlamaConfig(**(TINY if tiny else LLAMA_3_1_8B), attn_implementation="sdpa")


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model built directly on ``device`` in ``dtype`` with transformers' random init: nothing is downloaded."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def streamed_weight_bytes(model: PreTrainedModel) -> int:
    """Weight bytes a decode step reads: every parameter but the input embedding (unless tied to the output)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    kept = [p for p in model.parameters() if p is not embedding or embedding is output]
    return sum(storage_bytes(kept).values())


def full_kv_bytes(config: LlamaConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed cache: K and V for every layer, KV head, token and head dimension."""
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * context * batch * torch.finfo(dtype).bits // 8


def decode_floor(weight_bytes: int, kv_bytes: int, bandwidth: float, batch: int) -> float:
    """Tokens/s a decode step cannot beat: it reads the streamed weights and the whole cache once per step."""
    return batch * bandwidth / (weight_bytes + kv_bytes)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + written) by a large device-to-device copy."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row_key(method: str, context: int, batch: int, settings: Settings) -> dict[str, Any]:
    """What identifies a row (measured or skipped)."""
    compressed = method != "full"
    return {
        "method": method,
        "budget": settings.budget if compressed else None,
        "context": context,
        "batch": batch,
        "prefill_chunk": settings.prefill_chunk if compressed else None,
    }


def measure_row(model, ids, method: str, settings: Settings, weights: int, bandwidth: float) -> dict[str, Any]:
    """One configuration: prefill, decode, and the figures of one table row."""
    batch, context = ids.shape
    row = {**row_key(method, context, batch, settings), "status": "ok"}
    chunk = settings.prefill_chunk if method != "full" else None
    measured = measure(model, ids, method, settings.budget, settings.decode_tokens, chunk)
    floor = decode_floor(weights, measured["kv_bytes"], bandwidth, batch)
    row.update(
        prefill_s=measured["prefill_s"],
        decode_tok_s=measured["decode_tok_s"],
        kv_bytes=measured["kv_bytes"],
        peak_above_weights_bytes=measured["peak_bytes"],
        floor_tok_s=floor,
        floor_ratio=measured["decode_tok_s"] / floor,
    )
    return row


def skip_reason(method: str, context: int, batch: int, config, dtype, free_bytes: int | None, deadline: float):
    """Why a row is not run: the uncompressed cache alone cannot fit, or the time limit has passed."""
    if time.perf_counter() > deadline:
        return "skipped: time limit"
    full = full_kv_bytes(config, context, batch, dtype)
    if method == "full" and free_bytes is not None and full > free_bytes:
        return f"does not fit: its cache alone is {full / GIB:.0f} GiB, {free_bytes / GIB:.0f} GiB free"
    return None


def run(settings: Settings, device: torch.device) -> dict[str, Any]:
    """Every row of the grid, plus what the rows are measured against (bandwidth, weight bytes, device)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, (64 if settings.tiny else 2048) * 2**20)
    config = llama_config(settings.tiny)
    model = random_model(config, device, dtype)
    weights = streamed_weight_bytes(model)
    vocab = config.vocab_size
    warm = torch.randint(vocab, (1, settings.prefill_chunk + 8), device=device)  # two chunks
    for method in ("full", settings.methods[-1]):  # first-call costs (allocator, kernels) stay out of the table
        measure_row(model, warm, method, Settings(**{**asdict(settings), "decode_tokens": 2}), weights, bandwidth)
    deadline = time.perf_counter() + settings.time_limit_s
    rows = []
    for batch in settings.batches:
        # first the decode reference: the stock model whose whole context is as long as the budget
        for context, methods in [(settings.budget, ["full"])] + [(c, settings.methods) for c in settings.contexts]:
            ids = torch.randint(vocab, (batch, context), device=device)
            for method in methods:
                _free(device)
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
                reason = skip_reason(method, context, batch, config, dtype, free, deadline)
                if reason is None:
                    try:
                        rows.append(measure_row(model, ids, method, settings, weights, bandwidth))
                        continue
                    except torch.cuda.OutOfMemoryError:
                        reason = "out of memory"
                _free(device)
                rows.append({**row_key(method, context, batch, settings), "status": reason})
            del ids
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "config": "tiny" if settings.tiny else "llama-3.1-8b",
        "weight_bytes": weights,
        "copy_bandwidth_bytes_s": bandwidth,
        "settings": asdict(settings),
        "rows": rows,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table, skipped rows included with their reason."""
    lines = [
        f"{result['config']} ({result['dtype']}) on {result['device']}, torch {result['torch']}: "
        f"streamed weights {result['weight_bytes'] / GIB:.2f} GiB, "
        f"copy bandwidth {result['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s",
        "",
        "| method | budget | context | batch | prefill s | decode tok/s | floor tok/s | x floor | KV MiB "
        "| peak GiB above weights | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['method']} | {r.get('budget') or 'all'} | {r['context']} | {r['batch']} "
        if r["status"] != "ok":
            lines.append(head + f"| | | | | | | {r['status']} |")
            continue
        note = f"prefill_chunk={r['prefill_chunk']}" if r["prefill_chunk"] else "stock transformers"
        if r["method"] == "full" and r["context"] == result["settings"]["budget"]:
            note += "; decode reference: a context as long as the budget"
        lines.append(
            head + f"| {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {r['floor_tok_s']:.0f} "
            f"| {r['floor_ratio']:.2f} | {r['kv_bytes'] / 2**20:.1f} | {r['peak_above_weights_bytes'] / GIB:.2f} "
            f"| {note} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU: the whole pipeline in seconds")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--prefill-chunk", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--time-limit", type=float, help="seconds after warm-up; later rows are skipped")
    parser.add_argument("--out", type=Path, help="folder for table.md and rows.json")
    parser.add_argument(
        "--device", help="cuda (default) or cpu (default with --tiny; --tiny --device cuda checks the GPU path)"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods or [] if m != "full" and m not in available()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid names: full, {', '.join(available())}")
    settings = Settings.tiny_run() if args.tiny else Settings()
    overrides = {
        "contexts": args.contexts,
        "batches": args.batches,
        "methods": args.methods,
        "budget": args.budget,
        "prefill_chunk": args.prefill_chunk,
        "decode_tokens": args.decode_tokens,
        "time_limit_s": args.time_limit,
    }
    settings = Settings(**{**asdict(settings), **{k: v for k, v in overrides.items() if v is not None}})
    return settings, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if settings.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run with --tiny for the CPU smoke run", file=sys.stderr)
        raise SystemExit(2)
    result = run(settings, device)
    table = markdown_table(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "rows.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
