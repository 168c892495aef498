"""Errors a user can act on: the CLI prints one line, exits with status 2, shows no traceback, and does so before any
model loads; the Python API raises the same messages as `kvtune.UserError`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

import kvtune
from kvtune.validation import check_model_source, read_text_file

CASES = {
    "unknown_method": (["generate", "method=snapkvv", "context=hi"], "unknown method 'snapkvv'; valid names: "),
    "unknown_method_in_a_sweep": (["eval", "method=snapkv,bogus", "budget=64", "-m"], "unknown method 'bogus'"),
    "budget_0": (["generate", "method=snapkv", "budget=0", "context=hi"], "budget must be at least 1 entry"),
    "float_budget": (["eval", "method=snapkv", "budget=1.5"], "budget must be a whole number of entries"),
    "bench_budget": (["bench", "budgets=[0]"], "budget must be at least 1 entry"),
    "bench_decode_interval": (
        ["bench", "decode_intervals=[1,0]"],
        "decode_interval must be a whole number of at least",
    ),
    "decode_interval_with_ratio": (
        ["generate", "method=tova", "ratio=0.5", "+method_kwargs.decode_interval=8", "context=hi"],
        "decode_interval > 1 needs budget=",
    ),
    "bad_ratio": (["generate", "method=snapkv", "ratio=1.5", "context=hi"], "ratio is the fraction removed"),
    "prefill_chunk_1": (["generate", "prefill_chunk=1", "context=hi"], "prefill_chunk must be None"),
    "prefill_chunk_negative": (["generate", "prefill_chunk=-1", "context=hi"], "at least 2 tokens, got -1"),
    "missing_budget": (["generate", "method=snapkv", "context=hi"], "method 'snapkv' needs budget="),
    "empty_context": (["generate", "context="], "the context is empty"),
    "missing_context_file": (["generate", "context_file=/no/such.txt"], "context_file: no such file: /no/such.txt"),
    "latin1_context_file": (["generate", "context_file={latin1}"], "is not UTF-8 text (byte 0xe9 at offset 3"),
    "missing_questions_file": (
        ["generate", "context=hi", "questions_file=/no/q.txt"],
        "questions_file: no such file: /no/q.txt",
    ),
    "latin1_questions_file": (
        ["generate", "context=hi", "questions_file={latin1}"],
        "questions_file: {latin1} is not UTF-8 text",
    ),
    "questions_file_question_aware": (
        ["generate", "context=hi", "questions_file={questions}", "question_aware=true"],
        "question_aware=True compresses it with each question",
    ),
    "missing_model_dir": (["generate", "model=/no/such/model", "context=hi"], "no such directory: /no/such/model"),
    "missing_model_dir_eval": (["eval", "model=./no_model_here"], "no such directory: ./no_model_here"),
    "missing_model_dir_fit": (["fit", "model.name=/no/such/model"], "no such directory: /no/such/model"),
    "fit_objective": (
        ["fit", "method.objective=kl", "model.name=/no/such/model"],
        "method.objective must be one of lm, distill, distill+lm, got 'kl'",
    ),
    "fit_distill_top_k": (
        ["fit", "method.distill_top_k=0", "model.name=/no/such/model"],
        "method.distill_top_k must be a whole number of at least 1, got 0",
    ),
    "unknown_key": (["generate", "prompt=hi"], "unknown key 'prompt' (keys: model, dtype, method,"),
    "fit_unknown_key": (
        ["fit", "method.objectiv=lm", "model.name=/no/such/model"],
        "unknown key 'method.objectiv'; did you mean 'method.objective'? (keys in method: name,",
    ),
    "report_not_results": (["report", "{tmp}"], "holds no results.jsonl"),
    "export_not_a_run": (["export", "{tmp}", "{tmp}/out"], "is not a kvtune fit run"),
    "export_missing_dir": (["export", "/no/such/run", "{tmp}/out"], "no such directory: /no/such/run"),
}


OFFLINE_MODEL = "kvtune-tests/no-such-model"  # shaped like a Hub id; with HF_HUB_OFFLINE=1 it cannot load
# the end-to-end path in a fresh process: a check before Hydra composes, and one inside the Hydra task
SUBPROCESS_CASES = ["budget_0", "missing_budget"]


def _kvtune(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvtune.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=120,
    )


@pytest.fixture
def latin1(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\n".encode("latin-1"))
    return path


def _case(case: str, tmp_path, latin1) -> tuple[list[str], str]:
    """The command line of a case (files filled in, the offline model added) and its expected message."""
    args, message = CASES[case]
    (tmp_path / "questions.txt").write_text("Who?\nWhen?\n")
    fill = {"latin1": latin1, "tmp": tmp_path, "questions": tmp_path / "questions.txt"}
    if args[0] in ("generate", "eval", "bench") and not any(a.startswith("model=") for a in args):
        args = [*args, f"model={OFFLINE_MODEL}"]  # loading it would fail otherwise: the check must come first
    return [a.format(**fill) for a in args], message.format(**fill)


def _assert_one_line_status_2(command: str, status, stdout: str, stderr: str, message: str) -> None:
    assert status == 2, stderr
    assert "Traceback" not in stderr + stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvtune {command}: error: ")
    assert message in lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_user_error_is_one_line_with_status_2(case, tmp_path, latin1, kvtune_cli):
    args, message = _case(case, tmp_path, latin1)
    _assert_one_line_status_2(args[0], *kvtune_cli(args), message)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_user_error_in_a_fresh_process(case, tmp_path, latin1):
    args, message = _case(case, tmp_path, latin1)
    result = _kvtune(args, HYDRA_FULL_ERROR="0")
    _assert_one_line_status_2(args[0], result.returncode, result.stdout, result.stderr, message)


def test_generate_leaves_no_files_in_the_working_folder(kvtune_cli, tmp_path, latin1):
    # the budget is checked inside the Hydra task, after Hydra has set up its logging (once a stray cli.log)
    args, message = _case("missing_budget", tmp_path, latin1)
    before = set(tmp_path.iterdir())
    _assert_one_line_status_2("generate", *kvtune_cli(args), message)
    assert set(tmp_path.iterdir()) == before


def test_fit_into_a_run_folder_with_checkpoints_says_how_to_resume(kvtune_cli, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    message = "already holds checkpoints: resume with ckpt_path=last"
    _assert_one_line_status_2("fit", *kvtune_cli(["fit", f"hydra.run.dir={tmp_path / 'run'}"]), message)


def test_hydra_full_error_still_shows_the_traceback():
    # checked inside the Hydra task: the error travels through Hydra's own reporting
    result = _kvtune(["generate", "method=snapkv", "budget=null", "context=hi"], HYDRA_FULL_ERROR="1")
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_hydra_full_error_raises_checks_made_before_hydra(kvtune_cli):
    with pytest.raises(kvtune.UserError, match="budget must be at least 1 entry"):
        kvtune_cli(["generate", "method=snapkv", "budget=0", "context=hi"], hydra_full_error="1")


# ---- the Python API: the same messages, as exceptions ----------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="snapkvv"), "unknown method 'snapkvv'; valid names: "),
        (dict(method="snapkv", budget=16.0), "budget must be a whole number of entries"),
        (dict(method="snapkv", budget=0), "budget must be at least 1 entry"),
        (dict(method="snapkv", ratio=1.0), "ratio is the fraction removed"),
        (dict(method="snapkv", budget=8, prefill_chunk=1), "prefill_chunk must be None"),
        (dict(method="snapkv", budget=8, prefill_chunk=-1), "at least 2 tokens, got -1"),
        (dict(method="snapkv", budget=8, prefill_chunk=0), "at least 2 tokens, got 0"),
        (dict(method="snapkv", budget=8, poolin="max"), "method 'snapkv' rejected its options"),
        (dict(method="tova", budget=8, decode_interval=0), "decode_interval must be a whole number of at least 1"),
    ],
)
def test_python_api_raises_the_same_messages(embedded_tokenizer, options, message):
    model = tiny_llama()
    with pytest.raises(kvtune.UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        kvtune.generate(model, embedded_tokenizer, "some context", question="q?", **options)


def test_empty_context_is_refused_not_a_range_error(embedded_tokenizer):
    with pytest.raises(kvtune.UserError, match="the context is empty"):
        kvtune.generate(tiny_llama(), embedded_tokenizer, "", question="q?", method="snapkv", budget=8)
    with pytest.raises(kvtune.UserError, match=r"the context is empty \(row 1\)"):
        kvtune.compress_context(tiny_llama(), embedded_tokenizer, ["text", " "], method="snapkv", budget=8)


@pytest.mark.parametrize("length", [30, 31])  # 31: the odd last token joins the last chunk instead of a decode step
def test_chunk_of_two_still_compresses(length):
    """The smallest chunk allowed is a prefill, not a decode step: every chunk compresses (1 would not have)."""
    model = tiny_llama()
    cache = kvtune.new_cache(model, kvtune.methods.build("snapkv", budget=8, window=2))
    ids = torch.randint(1, 97, (1, length))
    kvtune.prefill(model, cache, ids, torch.ones_like(ids), chunk=2)
    assert all(bool((n == 8).all()) for n in cache.lengths()) and cache.get_seq_length() == length


def test_model_sources_and_text_files(tmp_path, latin1):
    check_model_source("embedded")
    check_model_source("HuggingFaceTB/SmolLM2-135M")  # shaped like a Hub id: left to the Hub loader
    check_model_source(str(tmp_path))
    for missing in ("/no/such/dir", "./relative/missing", "a/b/c"):
        with pytest.raises(kvtune.UserError, match=f"no such directory: {missing}"):
            check_model_source(missing)
    with pytest.raises(kvtune.UserError, match="no such directory: /no/such/dir"):
        kvtune.load_model("/no/such/dir")
    with pytest.raises(kvtune.UserError, match="is a file"):
        check_model_source(str(latin1))
    with pytest.raises(kvtune.UserError, match=f"context_file: {latin1} is not UTF-8 text"):
        read_text_file(latin1, "context_file")
