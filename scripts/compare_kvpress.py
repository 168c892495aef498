"""kvtune's methods against NVIDIA kvpress's presses on the same samples, question-agnostic (optional; not in CI).

    python scripts/compare_kvpress.py --tasks passkey variable_tracking --samples 8 --indices 0 2 4 6 \
        --ratios 0.5 0.75 0.9 --context-length 2048 --out docs/results/kvpress_table

kvpress pins transformers < 5.3, so it runs in its own virtualenv (``.venv-kvpress``: ``pip install torch==2.13.0``
then ``pip install kvpress "transformers<5.3"``, created on first use) as a worker process. This script builds the
samples with kvtune's tasks and tokenises them once: both sides get the same token ids (context compressed, then
question and answer prefix appended, greedy answer; the gold answer's mean NLL teacher-forced after the prefix).
``compression_ratio`` means the same on both sides (the fraction of the context's entries removed).

kvpress has no replay, so the worker replays it: one plain prefill per sample records each attention layer's input
and full keys/values, and every scorer press (TOVA, Knorm, Expected Attention, SnapKV, StreamingLLM) then runs its
own ``compress`` on them, exactly what its forward hook would do during that prefill (``--check`` compares one
press against the hook path). When KVzip is among the presses, its own prefill is that recorded prefill (the
reconstruction forwards that follow are not recorded): one prefill and one reconstruction per sample. Its scores
are kept and only its selection (``compress_post``, a top-k over the scores that sets the masked indices) is rerun
per ratio. kvpress's KVzip masks entries instead of removing them, so its bytes held are the full cache's.
kvtune's side is replayed from one recorded prefill per sample too (`kvtune.replay`), and its kvzip scores are
computed once per sample and shared by every ratio.

Candidates can be restricted (``--methods``, ``--presses``) to the methods that can be a side's best: on the
2,048-token passkey pilot (one sample) kvtune's best was kvzip then tova and kvpress's kvzip then tova and knorm,
every other method at least 0.5 nats behind its side's best at every ratio.

kvpress's KVzip reads the model's chat template to frame its prompt; the worker hands it the model without one, as
kvtune's comparison prompts are raw text.

Work is split by sample index (``--indices``; ``--samples`` fixes the sample set) and appended to
``per_sample.jsonl``, so runs can be resumed and extended; ``results.md`` and ``results.png`` are rebuilt from every
sample that all methods have.

Only the standard library is imported at module level: the worker runs this same file with kvpress's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVTUNE_METHODS = (
    "tova",
    "adakv_tova",
    "kvzip",
    "snapkv",
    "adakv_snapkv",
    "pyramidkv",
    "streaming_llm",
    "h2o",
    "kvmerger",
    "random",
)
PRESSES = ("tova", "knorm", "expected_attention", "snapkv", "streaming_llm", "kvzip")


def ensure_kvpress_venv() -> Path:
    python = KVPRESS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KVPRESS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "kvpress", "transformers<5.3"], check=True)
    return python


# ---- the worker (kvpress's environment) --------------------------------------------------------------------------
def _plain_model_dir(model_dir: str) -> str:
    """The model's folder without its chat template (links to the same files)."""
    source, target = Path(model_dir), Path("/tmp/kvpress_plain_model")
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.name == "chat_template.jinja":
            continue
        if item.name == "tokenizer_config.json":
            config = json.loads(item.read_text())
            config.pop("chat_template", None)
            link.write_text(json.dumps(config))
        elif not link.exists():
            link.symlink_to(item)
    return str(target)


def worker(request_path: str) -> None:
    import copy

    import torch
    from kvpress import (
        ExpectedAttentionPress,
        KnormPress,
        KVzipPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )
    from transformers import AutoModelForCausalLM, DynamicCache

    request = json.loads(Path(request_path).read_text())
    presses = {
        "tova": TOVAPress,
        "knorm": KnormPress,
        "expected_attention": ExpectedAttentionPress,
        "snapkv": SnapKVPress,
        "streaming_llm": StreamingLLMPress,
    }
    model = AutoModelForCausalLM.from_pretrained(
        _plain_model_dir(request["model"]), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    layers = model.model.layers
    eos = model.config.eos_token_id

    def storage(cache) -> int:
        seen, total = set(), 0
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total

    @torch.no_grad()
    def answer(cache, position: int, tail: list[int], gold: list[int], limit: int, last: torch.Tensor) -> dict:
        """``last``: the prefill's last logits, what predicts the answer when there is no tail (continuation)."""
        held = storage(cache)
        if tail:
            ids, positions = torch.tensor([tail]), torch.arange(position, position + len(tail))[None]
            last = model(ids, past_key_values=cache, position_ids=positions).logits[:, -1]
            position += len(tail)
        scored = copy.deepcopy(cache)
        logits = last[:, None]
        if len(gold) > 1:
            forced = model(
                torch.tensor([gold[:-1]]),
                past_key_values=scored,
                position_ids=torch.arange(position, position + len(gold) - 1)[None],
            ).logits
            logits = torch.cat([logits, forced], dim=1)
        nll = torch.nn.functional.cross_entropy(logits[0].float(), torch.tensor(gold)).item()
        tokens, token = [], last.argmax(-1)
        for step in range(limit):
            if int(token) == eos:
                break
            tokens.append(int(token))
            if step == limit - 1:
                break
            out = model(token[:, None], past_key_values=cache, position_ids=torch.tensor([[position]]))
            token, position = out.logits[:, -1].argmax(-1), position + 1
        return {"answer_nll": nll, "tokens": tokens, "kv_bytes": held}

    def clear_masks() -> None:
        for layer in layers:
            layer.self_attn.masked_key_indices = None

    recorded: dict[int, tuple] = {}  # per layer: the attention's input and keyword arguments of one prefill
    kept: dict[str, torch.Tensor] = {}  # KVzip's scores of one sample

    def record(module, args, kwargs, output):
        recorded[module.layer_idx] = (kwargs["hidden_states"], dict(kwargs))

    def zip_prefill(context: torch.Tensor, cache) -> tuple[torch.Tensor, KVzipPress]:
        """KVzipPress's own prefill and reconstruction, once per sample, recording the prefill's layer inputs for
        the scorer presses on the way (its hook trims the cache back to the context: the prefill's keys/values)."""
        press = KVzipPress(compression_ratio=request["ratios"][0])
        original_post = press.compress_post

        def keep_scores(model_, press=press, original_post=original_post):
            kept["scores"] = press.score_val.clone()
            original_post(model_)

        press.compress_post = keep_scores
        hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad(), press(model):
                last = model(input_ids=context, past_key_values=cache, logits_to_keep=1).logits[:, -1]
                for hook in hooks:  # the reconstruction forwards are not the prefill
                    hook.remove()
        finally:
            for hook in hooks:
                hook.remove()
        for layer in cache.layers:  # fresh tensors: the trimmed keys are views of context + reconstruction
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        clear_masks()
        press.compress_post = original_post
        return last, press

    results = []
    for sample in request["samples"]:
        context = torch.tensor([sample["context"]])
        length = context.shape[1]
        full = DynamicCache()
        zipping = "kvzip" in request["presses"]
        if zipping:  # one prefill serves KVzip, the full cache and every scorer press
            last, zip_press = zip_prefill(context, full)
        else:
            hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in layers]
            with torch.no_grad():
                last = model(input_ids=context, past_key_values=full, logits_to_keep=1).logits[:, -1]
            for hook in hooks:
                hook.remove()
        row = {k: sample[k] for k in ("task", "index")}
        results.append({**row, "method": "kvpress:full", "ratio": 0.0, **answer(copy.deepcopy(full), length,
                       sample["tail"], sample["gold"], sample["limit"], last)})  # fmt: skip
        for name in [p for p in request["presses"] if p in presses]:
            for ratio in request["ratios"]:
                press = presses[name](compression_ratio=ratio)
                cache = DynamicCache()
                with torch.no_grad(), press(model):  # what the press's hook does, layer by layer
                    for i, layer in enumerate(layers):
                        hidden, kwargs = recorded[i]
                        keys, values = full.layers[i].keys, full.layers[i].values
                        keys, values = press.compress(layer.self_attn, hidden, keys, values, None, kwargs)
                        cache.update(keys.clone(), values.clone(), i)
                    if request.get("check") and name == "tova" and ratio == request["ratios"][0]:
                        live = DynamicCache()
                        model(input_ids=context, past_key_values=live)
                        same = all(torch.equal(a.keys, b.keys) for a, b in zip(live.layers, cache.layers))
                        print(f"check: replayed {name} equals the hook path: {same}", file=sys.stderr)
                result = answer(cache, length, sample["tail"], sample["gold"], sample["limit"], last)
                results.append({**row, "method": f"kvpress:{name}", "ratio": ratio, **result})
        if zipping:
            for ratio in request["ratios"]:  # KVzip's selection (compress_post) from the one set of scores
                zip_press.compression_ratio, zip_press.score_val = ratio, kept["scores"].clone()
                zip_press.compress_post(model)
                tail, gold, limit = sample["tail"], sample["gold"], sample["limit"]
                result = answer(copy.deepcopy(full), length, tail, gold, limit, last)
                results.append({**row, "method": "kvpress:kvzip", "ratio": ratio, **result})
            clear_masks()
        print(f"done {row}", file=sys.stderr, flush=True)
    Path(request["output"]).write_text(json.dumps(results))


# ---- the driver (kvtune's environment) ---------------------------------------------------------------------------
def _aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """Means per (task, method, ratio) over the sample indices every method of that task has."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    means = {}
    for task, task_rows in by_task.items():
        keys = {(r["method"], r["ratio"]) for r in task_rows}
        indices = set.intersection(*({r["index"] for r in task_rows if (r["method"], r["ratio"]) == k} for k in keys))
        for method, ratio in keys:
            pick = [r for r in task_rows if (r["method"], r["ratio"]) == (method, ratio) and r["index"] in indices]
            means[task, method, ratio] = {
                field: sum(r[field] for r in pick) / len(pick)
                for field in ("answer_nll", "score", "kv_bytes", "full_kv_bytes")
            } | {"samples": len(pick)}
    return means


def _tables(means: dict[tuple, dict], ratios: list[float]) -> str:
    parts = []
    tasks = sorted({t for t, _, _ in means})
    for task in tasks:
        methods = sorted({m for t, m, _ in means if t == task}, key=lambda m: (m.startswith("kvpress"), m))
        samples = max(v["samples"] for (t, _, _), v in means.items() if t == task)
        parts.append(f"### {task}: score · answer NLL (lower is better) · KV bytes kept\n\n{samples} samples\n")
        parts.append("| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
        parts.append("|---|" + "---|" * len(ratios))
        for method in methods:
            cells = []
            for ratio in ratios:
                full_row = means.get((task, method, 0.0)) if method.endswith("full") else None
                v = full_row or means.get((task, method, ratio))
                cells.append(
                    f"{v['score']:.2f} · {v['answer_nll']:.3f} · {100 * v['kv_bytes'] / v['full_kv_bytes']:.0f}%"
                    if v
                    else ""
                )
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("")
    parts.append("### Best of each side per task (answer NLL; lower is better; mean: over tasks)\n")
    parts.append("| task | ratio | best kvtune | NLL | best kvpress | NLL | kvtune - kvpress |")
    parts.append("|---|---|---|---|---|---|---|")
    for task in [*tasks, "mean"]:
        for ratio in ratios:
            (a, x), (b, y) = (_best(means, tasks if task == "mean" else [task], ratio, side) for side in SIDES)
            parts.append(f"| {task} | {ratio} | {a} | {x:.3f} | {b} | {y:.3f} | {x - y:+.3f} |")
    return "\n".join(parts) + "\n"


SIDES = ("kvtune", "kvpress")


def _best(means: dict[tuple, dict], tasks: list[str], ratio: float, side: str) -> tuple[str, float]:
    """The side's method with the lowest answer NLL at ``ratio``, averaged over ``tasks`` (methods all tasks have)."""
    names = {m for _, m, r in means if r == ratio and m.startswith("kvpress:") == (side == "kvpress")}
    scored = {
        m: sum(means[t, m, ratio]["answer_nll"] for t in tasks) / len(tasks)
        for m in names
        if all((t, m, ratio) in means for t in tasks)
    }
    return min(scored.items(), key=lambda kv: kv[1]) if scored else ("-", float("nan"))


def _plot_best(means: dict[tuple, dict], ratios: list[float], path: Path) -> None:
    """Per task: each side's best method at each ratio (labelled), and the full cache's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _, _ in means})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        full = (means.get((task, "full", 0.0)) or {}).get("answer_nll")
        if full is not None:
            ax.axhline(full, color="black", linestyle=":", label="full cache")
        for side, style in zip(SIDES, ("-o", "--s")):
            best = [(r, *_best(means, [task], r, side)) for r in ratios]
            best = [(r, m, y) for r, m, y in best if m != "-"]
            ax.plot([r for r, _, _ in best], [y for _, _, y in best], style, label=f"{side} best")
            for r, m, y in best:
                ax.annotate(m.removeprefix("kvpress:"), (r, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_title(task)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("answer NLL (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot(means: dict[tuple, dict], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _, _ in means})
    methods = sorted({m for _, m, _ in means}, key=lambda m: (m.startswith("kvpress:"), m))
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}  # one colour per method everywhere
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks) + 2.5, 4.5), squeeze=False)
    handles = {}
    for ax, task in zip(axes[0], tasks):
        for method in [m for m in methods if any(t == task and mm == m for t, mm, _ in means)]:
            if method.endswith("full"):
                level = (means.get((task, method, 0.0)) or {}).get("answer_nll")
                if level is not None:
                    handles[method] = ax.axhline(level, color="black", linestyle="--" if ":" in method else ":")
                continue
            points = [(r, means[task, method, r]["answer_nll"]) for r in ratios if (task, method, r) in means]
            style = "--" if method.startswith("kvpress:") else "-"
            (line,) = ax.plot([r for r, _ in points], [y for _, y in points], style, marker="o", color=colours[method])
            handles[method] = line
        ax.set_title(task)
        ax.set_xlabel("compression ratio (fraction of entries removed)")
        ax.set_ylabel("answer NLL (lower is better)")
        ax.grid(alpha=0.3)
    labels = [m for m in methods if m in handles]
    fig.legend([handles[m] for m in labels], labels, fontsize=7, loc="center right")
    fig.subplots_adjust(right=0.82)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "variable_tracking"])
    parser.add_argument("--methods", nargs="+", default=list(KVTUNE_METHODS))
    parser.add_argument("--presses", nargs="+", choices=PRESSES, default=list(PRESSES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=8, help="the sample set (task generators spread depths over it)")
    parser.add_argument("--indices", nargs="+", type=int, help="which of the samples to run now (default: all)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/kvpress_table"))
    parser.add_argument("--check", action="store_true", help="also run kvpress's hook path once and compare")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--minutes", type=float, help="start no new sample after this many minutes")
    parser.add_argument("--stop-at", type=float, help="start no new sample after this Unix time (for queued jobs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    per_sample = args.out / "per_sample.jsonl"
    if not args.report_only:
        _run(args, per_sample)
    rows = [json.loads(line) for line in per_sample.read_text().splitlines() if line.strip()]
    means = _aggregate(rows)
    table = _tables(means, args.ratios)
    (args.out / "results.md").write_text(
        f"![each side's best against compression](best.png)\n\n![every method](results.png)\n\n{table}"
    )
    _plot(means, args.ratios, args.out / "results.png")
    _plot_best(means, args.ratios, args.out / "best.png")
    print((args.out / "results.md").read_text())


def _run(args: argparse.Namespace, per_sample: Path) -> None:
    """Sample by sample: kvtune's methods (replayed from one recording), then kvpress's presses in the worker."""
    import time

    from tqdm import tqdm

    import kvtune
    from kvtune.api import tokenize_prompts
    from kvtune.eval.runner import _qa
    from kvtune.eval.tasks import build_task
    from kvtune.models import _embedded_snapshot

    unknown = sorted(set(args.methods) - set(kvtune.methods.available()))
    if unknown:
        raise SystemExit(f"unknown kvtune methods {unknown}")
    stop_at = min(time.time() + 60 * args.minutes if args.minutes else float("inf"), args.stop_at or float("inf"))
    model, tokenizer = kvtune.load_model("embedded")
    done = set()
    if per_sample.exists():
        for line in per_sample.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["index"], r["method"], r["ratio"]))

    def write(row: dict) -> None:
        with per_sample.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    indices = args.indices if args.indices is not None else list(range(args.samples))
    for index in indices:
        for task_name in args.tasks:
            if time.time() > stop_at:
                print(f"time is up: stopped before {task_name}[{index}]", file=sys.stderr)
                return
            task = build_task(task_name)
            sample = task.samples(tokenizer, args.context_length, args.samples, seed=0)[index]
            gold = tokenizer(sample.answers[0], add_special_tokens=False).input_ids
            limit = getattr(task, "max_new_tokens", None) or len(gold) + 8
            key = ("compare_kvpress", task.name, args.context_length, args.samples, index)
            started = time.time()
            for method, ratio in [("full", 0.0)] + [(m, r) for m in args.methods for r in args.ratios]:
                if (task.name, index, method, ratio) in done:
                    continue
                progress = tqdm(total=1, desc=f"{task.name}[{index}] {method} {ratio}", leave=False)
                result = _qa(
                    model, tokenizer, task, [sample], method, None, ratio or None, {}, key, 1, False, None, progress
                )
                row = {"task": task.name, "index": index, "method": method, "ratio": ratio}
                row |= {k: result[k] for k in ("answer_nll", "score", "kv_bytes", "full_kv_bytes")}
                write(row | {"answer": result["per_sample"][0]["answer"]})
            print(f"{task.name}[{index}] kvtune: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            started = time.time()
            presses = [p for p in args.presses if (task.name, index, f"kvpress:{p}", args.ratios[-1]) not in done]
            if presses:
                prompt = tokenize_prompts(tokenizer, [sample.context], sample.question, sample.answer_prefix)
                request = {"context": prompt.heads[0], "tail": prompt.tails[0], "gold": gold, "limit": limit}
                for result in _kvpress(
                    args, presses, request | {"task": task.name, "index": index}, _embedded_snapshot()
                ):
                    if (task.name, index, result["method"], result["ratio"]) in done:
                        continue
                    text = tokenizer.decode(result["tokens"], skip_special_tokens=True)
                    row = {k: result[k] for k in ("task", "index", "method", "ratio", "answer_nll", "kv_bytes")}
                    write(row | {"score": task.score(text, sample), "answer": text, "full_kv_bytes": result["full"]})
                print(f"{task.name}[{index}] kvpress: {time.time() - started:.0f} s", file=sys.stderr, flush=True)


def _kvpress(args: argparse.Namespace, presses: list[str], sample: dict, model_dir: Path) -> list[dict]:
    """Run one sample through kvpress's presses in the worker process; rows with the full cache's bytes."""
    request_path = ROOT / "outputs" / f"compare_kvpress_request.{os.getpid()}.json"  # parallel runs do not collide
    output_path = request_path.with_name(f"compare_kvpress_output.{os.getpid()}.json")
    request_path.parent.mkdir(parents=True, exist_ok=True)
    request = {"model": str(model_dir), "presses": presses, "ratios": args.ratios, "samples": [sample]}
    request_path.write_text(json.dumps(request | {"output": str(output_path), "check": args.check}))
    subprocess.run([str(ensure_kvpress_venv()), __file__, "--worker", str(request_path)], check=True)
    results = json.loads(output_path.read_text())
    full = next(r["kv_bytes"] for r in results if r["method"] == "kvpress:full")
    return [r | {"full": full} for r in results]


if __name__ == "__main__":
    main()
