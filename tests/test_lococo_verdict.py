"""scripts/lococo_verdict.py: the demo's verdict counts only training-free methods as the baseline, and separates
what a trained LoRA does to the model from what compression costs it (the control row)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lococo_verdict.py"
spec = importlib.util.spec_from_file_location("lococo_verdict", SCRIPT)
lococo_verdict = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lococo_verdict)


def _rows(perplexity: dict[str, float], passkey: dict[str, float]) -> list[dict]:
    rows = [{"task": "perplexity", "label": k, "score": v, "answer_nll": 1.0} for k, v in perplexity.items()]
    rows += [{"task": "passkey", "label": k, "score": 0.0, "answer_nll": v} for k, v in passkey.items()]
    return rows


def test_the_control_is_not_a_training_free_method_and_prices_the_compression():
    ppl = {"full": 5.0, "h2o": 7.0, "tova": 7.2, "lococo_untrained": 6.8, "lococo_trained": 6.0}
    rows = _rows({**ppl, "full_with_trained_lora": 4.8}, {"full": 0.1, "h2o": 2.8, "tova": 2.5, "lococo_trained": 2.4})
    text = lococo_verdict.verdict(rows, "lococo_trained", "lococo_untrained")
    assert "| best training-free | h2o | 7.000 |" in text  # the control (4.8) is lower but trained: not a baseline
    assert "perplexity gap closed: 50% of the way from h2o (7.000) to full (5.000) -> MET" in text
    assert "passkey answer NLL below every training-free method: MET" in text
    assert "trained +25.0% against the full cache with the same LoRA (4.800); untrained +36.0%" in text


def test_without_a_control_row_there_is_no_cost_line():
    rows = _rows({"full": 5.0, "h2o": 7.0, "lococo_untrained": 6.8, "lococo_trained": 6.5}, {"h2o": 2.0})
    text = lococo_verdict.verdict(rows, "lococo_trained", "lococo_untrained")
    assert "NOT MET (goal: >= 50%)" in text and "same LoRA" not in text
