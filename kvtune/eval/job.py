"""One `kvtune eval` job: evaluate a sweep point, append its row to the sweep's results, refresh the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvtune.adapters import load_adapter
from kvtune.eval.report import RESULTS, build_report
from kvtune.eval.runner import evaluate
from kvtune.eval.tasks import build_task
from kvtune.models import load_model
from kvtune.validation import UserError

_loaded: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


def _model(name: str, dtype: str, adapter: str | None):
    """Jobs of a multirun share the process (Hydra's basic launcher): load the model (and adapter) once."""
    key = (name, dtype, adapter)
    if key not in _loaded:
        _loaded.clear()
        model, tokenizer = load_model(name, dtype=dtype)
        _loaded[key] = (load_adapter(model, adapter) if adapter else model, tokenizer)
    return _loaded[key]


def _task(options: dict[str, Any]):
    options = dict(options)
    name = options.pop("name")
    try:
        return build_task(name, **options)
    except TypeError as error:  # an unknown option: say which task rejected what
        raise UserError(f"task {name!r} rejected its options {sorted(options)}: {error}") from error
    except ValueError as error:  # an unknown task or an option value it refuses
        raise UserError(str(error)) from error


SAMPLES = "samples.jsonl"
SAMPLE_KEYS = ("task", "label", "method", "budget", "ratio", "context_length", "question_aware", "seed", "task_options")


def run_eval_job(cfg: DictConfig, results_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg`` (an `EvalConfig`), append its row to ``results_dir/results.jsonl``, its per-sample answers
    (each tagged with the row's key) to ``results_dir/samples.jsonl``, and rebuild the report there.

    ``results_dir`` receives results only; Hydra's job folders (configs, logs) stay in the run or sweep directory.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    options = OmegaConf.to_container(cfg.task, resolve=True)
    task = _task(options)
    model, tokenizer = _model(cfg.model, cfg.dtype, cfg.adapter)
    row = evaluate(
        model,
        tokenizer,
        task,
        cfg.method,
        budget=cfg.budget,
        ratio=cfg.ratio,
        context_length=cfg.context_length,
        samples=cfg.samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        question_aware=cfg.question_aware,
        max_new_tokens=cfg.max_new_tokens,
        method_kwargs=OmegaConf.to_container(cfg.method_kwargs, resolve=True),
        task_key=tuple(sorted((k, str(v)) for k, v in options.items())),
    )
    per_sample = row.pop("per_sample")
    row["model"] = cfg.model
    row["adapter"] = cfg.adapter
    row["label"] = cfg.label or cfg.method
    row["task_options"] = options
    key = {name: row.get(name) for name in SAMPLE_KEYS}
    lines = [json.dumps(key | {"sample": index} | item) + "\n" for index, item in enumerate(per_sample)]
    with open(results_dir / SAMPLES, "a") as handle:  # one write per job: whole lines under parallel launchers
        handle.write("".join(lines))
    with open(results_dir / RESULTS, "a") as handle:  # one short append per job: safe for parallel launchers
        handle.write(json.dumps(row) + "\n")
    build_report(results_dir)
    if cfg.logger is not None:
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        logger.finalize("success")
    return row
