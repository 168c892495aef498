"""`kvtune <subcommand> key=value ...`: thin Hydra shells over the Python API."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import OmegaConf

import kvtune.config  # noqa: F401  (registers the structured configs)

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


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: kvtune {{{','.join(COMMANDS)}}} key=value ...", file=sys.stderr)
        raise SystemExit(2)
    command = sys.argv[1]
    # Hydra parses sys.argv: the subcommand moves into argv[0] (kept for relaunches) and out of the overrides.
    sys.argv = [f"{sys.argv[0]} {command}", *sys.argv[2:]]
    hydra.main(config_path=CONF_DIR, config_name=command, version_base="1.3")(COMMANDS[command])()


COMMANDS = {"generate": run_generate}
