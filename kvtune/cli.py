"""`kvtune <subcommand> key=value ...`: thin Hydra shells over the Python API."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import OmegaConf

import kvtune.config  # noqa: F401  (registers the structured configs)

COMMAND_ENV = "KVTUNE_COMMAND"
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run_generate(cfg) -> str:
    """Load the model, read the context, print the answer and what the cache held."""
    from rich.console import Console

    import kvtune

    if (cfg.context is None) == (cfg.context_file is None):
        raise ValueError("give exactly one of context=... or context_file=PATH")
    context = cfg.context if cfg.context is not None else Path(cfg.context_file).read_text()
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
        **OmegaConf.to_container(cfg.method_kwargs),
    )
    console = Console()
    console.print(f"[bold]{cfg.method}[/bold] budget={cfg.budget} ratio={cfg.ratio}: {answer!r}")
    console.print(f"{len(tokenizer(context).input_ids)} context tokens, {time.perf_counter() - start:.1f} s")
    return answer


def run_eval(cfg) -> dict:
    """One sweep point; under ``-m`` every job appends to the sweep directory's results.jsonl and report."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kvtune.eval.job import run_eval_job

    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    default = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else job_dir
    row = run_eval_job(cfg, cfg.results_dir or default, job_dir)
    print(json.dumps(row))
    return row


def run_report(argv: list[str]) -> None:
    """`kvtune report DIR`: rebuild results.md and results.png from DIR/results.jsonl."""
    from kvtune.eval.report import build_report

    if len(argv) != 1:
        raise SystemExit("usage: kvtune report RESULTS_DIR")
    table, image = build_report(argv[0])
    print(table.read_text())
    print(f"wrote {table} and {image}")


def run_bench(cfg) -> list[dict]:
    """Measure every (method, budget, context length, batch size) and print the table against `full`."""
    import kvtune
    from kvtune.bench import bench, markdown_table

    model, tokenizer = kvtune.load_model(cfg.model, dtype=cfg.dtype)
    rows = bench(
        model,
        tokenizer,
        list(cfg.methods),
        list(cfg.budgets),
        list(cfg.context_lengths),
        list(cfg.batch_sizes),
        cfg.decode_tokens,
    )
    Path(cfg.output).write_text(json.dumps(rows, indent=2))
    print(markdown_table(rows))
    print(f"wrote {cfg.output}")
    return rows


def run_export(argv: list[str]) -> None:
    """`kvtune export RUN_DIR OUT_DIR`: the trained adapter as a PEFT folder with a model card.

    `kvtune export --hybrid RUN_DIR OUT_DIR`: a sink-free LightTransfer run as a standard transformers checkpoint.
    """
    from kvtune.train.export import export

    hybrid = "--hybrid" in argv
    argv = [a for a in argv if a != "--hybrid"]
    if len(argv) != 2:
        raise SystemExit("usage: kvtune export [--hybrid] RUN_DIR OUT_DIR")
    if hybrid:
        from kvtune.hybrid.export import export_hybrid

        try:
            print(f"exported to {export_hybrid(argv[0], argv[1])}")
        except (FileNotFoundError, ValueError) as error:
            print(f"kvtune export: {error}", file=sys.stderr)
            raise SystemExit(2) from error
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
        raise SystemExit(str(error)) from error


def run_fit(cfg) -> dict:
    """Train, then print where the adapter went (a ``lighttransfer`` section trains a hybrid instead of LoCoCo)."""
    from kvtune.train.fit import fit

    if cfg.lighttransfer is not None:
        from kvtune.hybrid.fit import fit_hybrid

        fit = fit_hybrid
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
        print(f"kvtune calibrate: {error}", file=sys.stderr)
        raise SystemExit(2) from error
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
    if command in PLAIN_COMMANDS:
        PLAIN_COMMANDS[command](sys.argv[1:])
        return
    os.environ[COMMAND_ENV] = command
    hydra.main(config_path=CONF_DIR, config_name=command, version_base="1.3")(COMMANDS[command])()


COMMANDS = {  # Hydra-composed
    "generate": run_generate,
    "eval": run_eval,
    "bench": run_bench,
    "fit": run_fit,
    "calibrate": run_calibrate,
}
PLAIN_COMMANDS = {"report": run_report, "export": run_export, "push": run_push}  # positional arguments


if __name__ == "__main__":
    main()
