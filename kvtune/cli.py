"""`kvtune <subcommand> key=value ...`: thin Hydra shells over the Python API."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import OmegaConf

import kvtune.config  # the structured configs: importing registers them with Hydra
from kvtune.validation import (
    UserError,
    check_budget,
    check_config_key,
    check_contexts,
    check_count,
    check_method,
    check_method_args,
    check_model_source,
    check_objective,
    check_prefill_chunk,
    check_questions,
    check_ratio,
    read_text_file,
)

COMMAND_ENV = "KVTUNE_COMMAND"
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _questions(cfg) -> list[str] | None:
    """``questions_file=PATH``: one question per line (blank lines skipped)."""
    if cfg.questions_file is None:
        return None
    if cfg.question:
        raise UserError("give question=... or questions_file=PATH, not both")
    questions = [line for line in read_text_file(cfg.questions_file, "questions_file").splitlines() if line.strip()]
    if not questions:
        raise UserError(f"questions_file: {cfg.questions_file} holds no question (one per line)")
    return questions


def run_generate(cfg) -> str | list[str]:
    """Check the request, load the model, compress the context once, print each answer and what the cache held."""
    from rich.console import Console

    if (cfg.context is None) == (cfg.context_file is None):
        raise UserError("give exactly one of context=... or context_file=PATH")
    method_kwargs = OmegaConf.to_container(cfg.method_kwargs)
    check_model_source(cfg.model)
    check_method_args(cfg.method, cfg.budget, cfg.ratio, cfg.prefill_chunk, **method_kwargs)
    context = cfg.context if cfg.context is not None else read_text_file(cfg.context_file, "context_file")
    check_contexts([context])
    questions = _questions(cfg)
    check_questions(questions, cfg.question_aware)

    import kvtune

    model, tokenizer = kvtune.load_model(cfg.model, dtype=cfg.dtype)
    start = time.perf_counter()
    answer = kvtune.generate(
        model,
        tokenizer,
        context,
        question=cfg.question,
        answer_prefix=cfg.answer_prefix,
        method=cfg.method,
        budget=cfg.budget,
        ratio=cfg.ratio,
        max_new_tokens=cfg.max_new_tokens,
        question_aware=cfg.question_aware,
        chat_template=cfg.chat_template,
        prefill_chunk=cfg.prefill_chunk,
        questions=questions,
        **method_kwargs,
    )
    console = Console()
    console.print(f"[bold]{cfg.method}[/bold] budget={cfg.budget} ratio={cfg.ratio}")
    for question, reply in zip(questions or [cfg.question], answer if questions else [answer]):
        print(f"Q: {question}\nA: {reply!r}")  # plain print: never wrapped, no markup read in the texts
    console.print(f"{len(tokenizer(context).input_ids)} context tokens, {time.perf_counter() - start:.1f} s")
    return answer


def run_eval(cfg) -> dict:
    """One sweep point; under ``-m`` every job appends to the results (``results_dir``, default the sweep directory).

    Hydra's job folders (``.hydra/`` configs, logs) stay under the sweep directory (``outputs/`` by default): point
    ``results_dir`` elsewhere to keep results apart from them.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kvtune.eval.job import run_eval_job

    check_model_source(cfg.model)
    check_method_args(cfg.method, cfg.budget, cfg.ratio, **OmegaConf.to_container(cfg.method_kwargs))
    hydra_cfg = HydraConfig.get()
    default = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else hydra_cfg.runtime.output_dir
    row = run_eval_job(cfg, cfg.results_dir or default)
    print(json.dumps(row))
    return row


def run_report(argv: list[str]) -> None:
    """`kvtune report DIR`: rebuild results.md and results.png from DIR/results.jsonl."""
    from kvtune.eval.report import RESULTS, build_report

    if len(argv) != 1:
        raise UserError("usage: kvtune report RESULTS_DIR")
    if not (Path(argv[0]) / RESULTS).is_file():
        raise UserError(f"{argv[0]} holds no {RESULTS}: give the results_dir of a `kvtune eval` run or sweep")
    table, image = build_report(argv[0])
    print(table.read_text())
    print(f"wrote {table} and {image}")


def run_bench(cfg) -> list[dict]:
    """Measure every (method, budget, context length, batch size) and print the table against `full`."""
    check_model_source(cfg.model)
    for method in cfg.methods:
        check_method(method)
    for budget in cfg.budgets:
        check_budget(budget)

    plans = [load_plan(path, cfg.model) for path in cfg.hybrid]

    import kvtune
    from kvtune.bench import bench, markdown_table, with_ratios

    model, tokenizer = kvtune.load_model(cfg.model, dtype=cfg.dtype)
    for plan in plans:
        check_plan(plan, model)
    measured: list[dict] = []
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)

    def keep(row: dict) -> None:  # every row on disk as soon as it is measured: an interrupted run keeps them
        print(json.dumps(row), flush=True)
        measured.append(row)
        Path(cfg.output).write_text(json.dumps(with_ratios(measured), indent=2))

    rows = bench(
        model,
        tokenizer,
        list(cfg.methods),
        list(cfg.budgets),
        list(cfg.context_lengths),
        list(cfg.batch_sizes),
        cfg.decode_tokens,
        list(cfg.prefill_chunks),
        progress=keep,
        plans=plans,
        decode_intervals=list(cfg.decode_intervals),
    )
    Path(cfg.output).write_text(json.dumps(rows, indent=2))
    print(markdown_table(rows))
    print(f"wrote {cfg.output}")
    return rows


def load_plan(path: str, model_id: str):
    """The layer plan at ``path``, refused in one line if it is unreadable or was calibrated for another model."""
    from kvtune.hybrid.plan import LayerPlan

    try:
        plan = LayerPlan.load(path)
    except (FileNotFoundError, ValueError, TypeError) as error:  # TypeError: a key missing from the record
        raise UserError(f"layer plan {path}: {error}") from error
    if plan.model_id != model_id:
        raise UserError(f"layer plan {path} was calibrated for {plan.model_id!r}, not {model_id!r}")
    return plan


def check_plan(plan, model) -> None:
    """Refuse (in one line) a plan whose layer count is not the loaded model's."""
    from kvtune.hybrid.plan import PlanMismatchError

    try:
        plan.check_model(model)
    except PlanMismatchError as error:
        raise UserError(str(error)) from error


def run_export(argv: list[str]) -> None:
    """`kvtune export RUN_DIR OUT_DIR`: the trained adapter as a PEFT folder with a model card.

    `kvtune export --hybrid RUN_DIR OUT_DIR`: a sink-free LightTransfer run as a standard transformers checkpoint.
    """
    from kvtune.train.export import export

    hybrid = "--hybrid" in argv
    argv = [a for a in argv if a != "--hybrid"]
    if len(argv) != 2:
        raise UserError("usage: kvtune export [--hybrid] RUN_DIR OUT_DIR")
    if hybrid:
        from kvtune.hybrid.export import export_hybrid

        try:
            print(f"exported to {export_hybrid(argv[0], argv[1])}")
        except (FileNotFoundError, ValueError) as error:
            raise UserError(str(error)) from error
        return
    print(f"exported to {export(argv[0], argv[1])}")


def run_push(argv: list[str]) -> None:
    """`kvtune push RUN_DIR --repo-id OWNER/NAME [--private]`: upload the exported adapter to the Hub."""
    import argparse

    from kvtune.train.export import push

    parser = argparse.ArgumentParser(prog="kvtune push")
    parser.add_argument("run_dir")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(f"pushed: {push(args.run_dir, args.repo_id, args.private)}")
    except RuntimeError as error:
        raise UserError(str(error)) from error


def run_fit(cfg) -> dict:
    """Train, then print where the adapter went (a ``lighttransfer`` section trains a hybrid instead of LoCoCo)."""
    check_model_source(cfg.model.name)
    from kvtune.train.fit import fit, resume_path

    try:  # a run folder with checkpoints is resumed only when asked: say so before the model loads
        resume_path(Path(cfg.output_dir) / "checkpoints", cfg.ckpt_path)
    except FileExistsError as error:
        raise UserError(str(error)) from error

    if cfg.lighttransfer is not None:
        from kvtune.hybrid.fit import fit_hybrid
        from kvtune.hybrid.plan import PlanMismatchError

        if cfg.lighttransfer.plan is not None:
            load_plan(cfg.lighttransfer.plan, cfg.model.name)  # before the model loads
        try:
            metrics = fit_hybrid(cfg, cfg.output_dir)
        except PlanMismatchError as error:  # the layer count, known once the model is loaded
            raise UserError(str(error)) from error
    else:
        metrics = fit(cfg, cfg.output_dir)
    print(json.dumps(metrics))
    print(f"adapter saved to {Path(cfg.output_dir) / 'adapter'}")
    return metrics


def run_calibrate(cfg) -> str:
    """Score the layers, write the plan (JSON) and its plot (PNG), print the lazy layers."""
    import kvtune
    from kvtune.hybrid.calibrate import calibrate, check_calibration, plot_plan

    try:
        check_calibration(cfg.lazy_fraction, cfg.window, cfg.sinks, cfg.sequence_length, cfg.sequences)
    except ValueError as error:
        raise UserError(str(error)) from error
    check_model_source(cfg.model)
    model, tokenizer = kvtune.load_model(cfg.model, dtype=cfg.dtype)
    plan = calibrate(
        model,
        tokenizer,
        cfg.model,
        lazy_fraction=cfg.lazy_fraction,
        window=cfg.window,
        sinks=cfg.sinks,
        source=cfg.source,
        sequence_length=cfg.sequence_length,
        sequences=cfg.sequences,
        last_queries=cfg.last_queries,
    )
    path = plan.save(cfg.output)
    if cfg.plot:
        print(f"plot: {plot_plan(plan, cfg.plot)}")
    print(f"lazy layers {list(plan.lazy_layers)} of {plan.num_layers}; plan: {path}")
    return str(path)


# Overrides checked on every value (sweeps included) before Hydra composes the config, so before any model loads
# and before Hydra's own type errors (a float budget) could speak first. Values from config files and recipes are
# checked again by the commands themselves.
OVERRIDE_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "generate": {
        "model": check_model_source,
        "method": check_method,
        "budget": check_budget,
        "ratio": check_ratio,
        "prefill_chunk": check_prefill_chunk,
        "context_file": lambda path: read_text_file(path, "context_file"),
        "questions_file": lambda path: read_text_file(path, "questions_file"),
    },
    "eval": {"model": check_model_source, "method": check_method, "budget": check_budget, "ratio": check_ratio},
    "bench": {
        "model": check_model_source,
        "methods": lambda names: [check_method(n) for n in names],
        "budgets": lambda budgets: [check_budget(b) for b in budgets],
        "decode_intervals": lambda intervals: [check_count("decode_interval")(n) for n in intervals],
    },
    "fit": {
        "model.name": check_model_source,
        "method.objective": check_objective,
        "method.distill_top_k": check_count("method.distill_top_k"),
        "optim.bptt_chunks": check_count("optim.bptt_chunks"),
    },
}


def check_overrides(command: str, overrides: list[str]) -> None:
    """Run `OVERRIDE_CHECKS` on the command line's ``key=value`` overrides (each value of a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    checks = OVERRIDE_CHECKS.get(command, {})
    groups = {path.name for path in Path(CONF_DIR).iterdir() if path.is_dir()}  # recipe=, trainer=, hydra.*, ...
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if "=" in o and o[0] != "-"])
    except HydraException:
        return  # a malformed override: Hydra itself reports it
    for override in parsed:
        if override.key_or_group.split(".")[0].split("/")[0] not in groups:
            check_config_key(SCHEMAS[command], override.key_or_group)
        check = checks.get(override.key_or_group)
        if check is None or override.is_delete():
            continue
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException:
            continue  # an interval sweep: its values are only known to the sweeper
        for value in values:
            if value is not None:
                check(value)


def fail(command: str, error: UserError) -> NoReturn:
    """One line, status 2, no traceback (``HYDRA_FULL_ERROR=1`` re-raises, as Hydra does for its own errors)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"kvtune {command}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
    raise SystemExit(2)


def _reporting(command: str, task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The Hydra task function, with user errors reported by `fail` (Hydra would print a traceback)."""

    @functools.wraps(task)
    def run(cfg):
        try:
            return task(cfg)
        except UserError as error:
            fail(command, error)

    return run


def main() -> None:
    # A rank relaunched by Lightning's DDP re-runs this program with the overrides only (Hydra has consumed the
    # subcommand): the subcommand travels in the environment, which child processes inherit.
    inherited = os.environ.get(COMMAND_ENV)
    if inherited and (len(sys.argv) < 2 or sys.argv[1] not in {**COMMANDS, **PLAIN_COMMANDS}):
        sys.argv.insert(1, inherited)
    if len(sys.argv) < 2 or sys.argv[1] not in {**COMMANDS, **PLAIN_COMMANDS}:
        print(f"usage: kvtune {{{','.join([*COMMANDS, *PLAIN_COMMANDS])}}} key=value ...", file=sys.stderr)
        raise SystemExit(2)
    command = sys.argv.pop(1)
    try:
        if command in PLAIN_COMMANDS:
            PLAIN_COMMANDS[command](sys.argv[1:])
            return
        check_overrides(command, sys.argv[1:])
    except UserError as error:
        fail(command, error)
    os.environ[COMMAND_ENV] = command
    hydra.main(config_path=CONF_DIR, config_name=command, version_base="1.3")(_reporting(command, COMMANDS[command]))()


COMMANDS = {  # Hydra-composed
    "generate": run_generate,
    "eval": run_eval,
    "bench": run_bench,
    "fit": run_fit,
    "calibrate": run_calibrate,
}
SCHEMAS = {  # the structured config each Hydra command's keys are checked against
    "generate": kvtune.config.GenerateConfig,
    "eval": kvtune.config.EvalConfig,
    "bench": kvtune.config.BenchConfig,
    "fit": kvtune.config.FitConfig,
    "calibrate": kvtune.config.CalibrateConfig,
}
PLAIN_COMMANDS = {"report": run_report, "export": run_export, "push": run_push}  # positional arguments


if __name__ == "__main__":
    main()
