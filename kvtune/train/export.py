"""`kvtune export` and `kvtune push`: a trained run's adapter as a PEFT folder with a model card, locally or on the Hub.

A run directory (what `kvtune fit` writes) holds ``adapter/`` (PEFT's `save_pretrained` output), ``fit_config.json``
and ``metrics.json``; a LightTransfer hybrid's also ``adapter/plan.json``, which export copies with the adapter (so
`kvtune.load_adapter` makes the same layers stream). Export copies the adapter files and writes a model card saying
what the adapter is, how it was trained and how to load it; push uploads that folder with `huggingface_hub`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kvtune.eval.corpus import CORPORA, PROSE_CORPUS
from kvtune.hybrid.plan import PLAN_FILE, LayerPlan
from kvtune.models import EMBEDDED
from kvtune.validation import UserError

EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantised from
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(run_dir: Path) -> str:
    """Markdown card: base model, recipe, hyperparameters, final metrics, loading code."""
    config, metrics = _read_json(run_dir / "fit_config.json"), _read_json(run_dir / "metrics.json")
    adapter = _read_json(run_dir / "adapter" / "adapter_config.json")
    name = config.get("model", {}).get("name") or adapter.get("base_model_name_or_path", "unknown")
    base = EMBEDDED_ORIGIN if name == EMBEDDED else name
    method = config.get("method", {})
    source = config.get("data", {}).get("source")
    offline = bool(source) and all(part in CORPORA or part == PROSE_CORPUS for part in source.split("+"))
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [kvtune, lococo, kv-cache-compression]",
        "---",
        "",
        "# LoCoCo KV-cache compressor (kvtune)",
        "",
        f"Convolutional KV-cache compressors (LoCoCo) for `{base}`, trained with kvtune "
        f"(recipe `{config.get('recipe', 'custom')}`). The cache holds a fixed {method.get('mem_size', '?')} slots "
        f"per layer and KV head; prompts are processed in chunks of {method.get('block_size', '?')} tokens.",
        "",
        "## Training",
        "",
        f"- trainable: {method.get('trainable', '?')}; kernel {method.get('kernel_size', '?')}, "
        f"keep rate {method.get('keep_rate', '?')}, position interpolation "
        f"{config.get('model', {}).get('position_interpolation', 1.0)}",
        f"- sequences of {method.get('block_size', 0) * config.get('data', {}).get('chunks', 0)} tokens from "
        f"`{config.get('data', {}).get('source', '?')}`"
        + (" (kvtune's offline corpora: Python standard-library source and reference)" if offline else ""),
        f"- steps: {config.get('trainer', {}).get('max_steps', '?')}",
        "",
        "## Metrics",
        "",
        *([f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())] or ["- none recorded"]),
        "",
        "## Use",
        "",
        "```python",
        "import kvtune",
        "",
        f'model, tokenizer = kvtune.load_model("{name}")',
        'model = kvtune.load_adapter(model, "PATH_OR_REPO_ID")',
        'answer = kvtune.generate(model, tokenizer, context, question=question, method="lococo")',
        "```",
        "",
        "`peft.PeftModel.from_pretrained` works too, after `import kvtune` (which registers the LOCOCO type).",
        "",
    ]
    return "\n".join(lines)


def hybrid_adapter_card(run_dir: Path, plan: LayerPlan) -> str:
    """Markdown card of a LightTransfer hybrid's LoRA: base model, the layer plan it trained with, loading code."""
    config, metrics = _read_json(run_dir / "fit_config.json"), _read_json(run_dir / "metrics.json")
    name = config.get("model", {}).get("name", "unknown")
    base = EMBEDDED_ORIGIN if name == EMBEDDED else name
    hybrid = config.get("lighttransfer", {})
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [kvtune, lighttransfer, hybrid-attention, kv-cache-compression]",
        "---",
        "",
        "# LightTransfer hybrid LoRA (kvtune)",
        "",
        f"LoRA for `{base}` trained by kvtune as a hybrid: layers {list(plan.lazy_layers)} of {plan.num_layers} "
        f"attend to {plan.sinks} sinks + a {plan.window}-token sliding window, the others fully. `{PLAN_FILE}` holds "
        "that layer plan; `kvtune.load_adapter` applies it with the adapter.",
        "",
        "## Training",
        "",
        f"- LoRA r={hybrid.get('lora_r', '?')} on {hybrid.get('target_modules', '?')}; sequences of "
        f"{hybrid.get('sequence_length', '?')} tokens from `{config.get('data', {}).get('source', '?')}`; "
        f"at most {config.get('trainer', {}).get('max_steps', '?')} steps",
        *([f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())] or ["- no metrics recorded"]),
        "",
        "## Use",
        "",
        "```python",
        "import kvtune",
        "",
        f'model, tokenizer = kvtune.load_model("{name}")',
        'model = kvtune.load_adapter(model, "PATH")  # LoRA + the plan\'s streaming layers',
        "```",
        "",
    ]
    return "\n".join(lines)


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's adapter and a model card to ``out_dir`` (a PEFT folder)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"no such directory: {run_dir}")
    missing = [name for name in ADAPTER_FILES if not (run_dir / "adapter" / name).is_file()]
    if missing:
        raise UserError(
            f"{run_dir} is not a kvtune fit run: it holds no trained adapter ({', '.join(missing)} missing under "
            "adapter/); give the directory `kvtune fit` wrote (output_dir)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(run_dir / "adapter" / name, out_dir / name)
    plan = run_dir / "adapter" / PLAN_FILE
    if plan.is_file():
        shutil.copy2(plan, out_dir / PLAN_FILE)
    card = hybrid_adapter_card(run_dir, LayerPlan.load(plan)) if plan.is_file() else model_card(run_dir)
    (out_dir / "README.md").write_text(card)
    return out_dir


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Export to a temporary folder and upload it to ``repo_id``; the run directory is never modified."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as error:  # no token, or no network: say so before anything is uploaded
        raise RuntimeError(
            f"cannot reach the Hugging Face Hub as a logged-in user ({type(error).__name__}: {error}). Log in with "
            "`huggingface-cli login` or set HF_TOKEN, check the network, and run `kvtune push` again; the run "
            f"directory {run_dir} is unchanged. `kvtune export {run_dir} OUT_DIR` writes the same folder locally."
        ) from error
    with tempfile.TemporaryDirectory() as folder:
        export(run_dir, folder)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="kvtune adapter")
        except HfHubHTTPError as error:
            raise RuntimeError(
                f"upload to {repo_id} failed: {error}; the run directory {run_dir} is unchanged"
            ) from error
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)
