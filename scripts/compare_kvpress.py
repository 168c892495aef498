"""Cross-check kvtune against NVIDIA's kvpress on the same samples (optional; not part of CI).

    python scripts/compare_kvpress.py --task passkey --methods snapkv streaming_llm --budget 256 --samples 10

kvpress pins transformers < 5.3, so it runs in its own virtualenv (``.venv-kvpress``, created on first use) as a
worker process; this script generates the samples with kvtune's task, scores kvtune, sends the same prompts to the
worker, and prints both scores side by side. Both sides use the raw-text layout (context compressed, then question
and answer prefix appended, greedy decoding) and the embedded model's safetensors snapshot. kvpress's
``compression_ratio`` is set to ``1 - budget / context tokens`` so that both keep the same number of entries.

Only the standard library is imported at module level: the worker runs this same file with kvpress's environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = ROOT / ".venv-kvpress"
COMPARABLE = ("snapkv", "streaming_llm", "adakv_snapkv", "pyramidkv", "random")  # methods kvpress also has


def ensure_kvpress_venv() -> Path:
    python = KVPRESS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KVPRESS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "kvpress", "transformers<5.3"], check=True)
    return python


def worker(request_path: str) -> None:
    """Runs inside .venv-kvpress: compress each context with the press, then answer greedily."""
    import torch
    from kvpress import AdaKVPress, PyramidKVPress, RandomPress, SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    presses = {  # the same settings as kvtune's defaults: window 32, max-pool 7, 4 sinks, Ada-KV floor 0.2
        "snapkv": lambda r: SnapKVPress(compression_ratio=r, window_size=32, kernel_size=7),
        "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
        "adakv_snapkv": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, window_size=32, kernel_size=7), 0.2),
        "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r, window_size=32, kernel_size=7),
        "random": lambda r: RandomPress(compression_ratio=r),
    }

    request = json.loads(Path(request_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], torch_dtype=torch.float32).eval()
    answers = {}
    for method in request["methods"]:
        answers[method] = []
        for sample in request["samples"]:
            context = tokenizer(sample["context"], return_tensors="pt").input_ids
            tail = tokenizer(
                sample["question"] + sample["answer_prefix"], add_special_tokens=False, return_tensors="pt"
            )
            r = max(0.0, 1.0 - request["budget"] / context.shape[1])
            press = presses[method](r)
            cache = DynamicCache()
            with torch.no_grad():
                with press(model):
                    model(context, past_key_values=cache)
                ids, tokens = tail.input_ids, []
                position = context.shape[1]
                for _ in range(request["max_new_tokens"]):
                    positions = torch.arange(position, position + ids.shape[1])[None]
                    out = model(ids, past_key_values=cache, position_ids=positions)
                    position += ids.shape[1]
                    ids = out.logits[:, -1:].argmax(-1)
                    if int(ids) == tokenizer.eos_token_id:
                        break
                    tokens.append(int(ids))
            answers[method].append(tokenizer.decode(tokens, skip_special_tokens=True))
    print(json.dumps(answers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--methods", nargs="+", default=["snapkv", "streaming_llm", "adakv_snapkv"])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=3500)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import kvtune
    from kvtune.eval.runner import evaluate
    from kvtune.eval.tasks import build_task
    from kvtune.models import _embedded_snapshot

    unknown = sorted(set(args.methods) - set(COMPARABLE))
    if unknown:
        raise SystemExit(f"no kvpress counterpart for {unknown}; comparable: {', '.join(COMPARABLE)}")
    model, tokenizer = kvtune.load_model("embedded")
    task = build_task(args.task)
    samples = task.samples(tokenizer, args.context_length, args.samples, seed=0)
    limit = getattr(task, "max_new_tokens", 16)
    ours = {
        m: evaluate(model, tokenizer, task, m, args.budget, context_length=args.context_length, samples=args.samples)
        for m in args.methods
    }
    request = ROOT / "outputs" / "compare_kvpress_request.json"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(
        json.dumps(
            {
                "model": str(_embedded_snapshot()),
                "methods": args.methods,
                "budget": args.budget,
                "max_new_tokens": limit,
                "samples": [
                    {"context": s.context, "question": s.question, "answer_prefix": s.answer_prefix} for s in samples
                ],
            }
        )
    )
    python = ensure_kvpress_venv()
    result = subprocess.run(
        [str(python), __file__, "--worker", str(request)], check=True, capture_output=True, text=True
    )
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"| method | budget | kvtune {args.task} | kvpress {args.task} | answers agreeing |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        mine = [row["answer"] for row in ours[method]["per_sample"]]
        their_scores = [task.score(a, s) for a, s in zip(theirs[method], samples)]
        agree = sum(a.strip() == b.strip() for a, b in zip(mine, theirs[method]))
        print(
            f"| {method} | {args.budget} | {ours[method]['score']:.2f} | {sum(their_scores) / len(samples):.2f} "
            f"| {agree}/{len(samples)} |"
        )


if __name__ == "__main__":
    main()
