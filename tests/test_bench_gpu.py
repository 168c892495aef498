"""scripts/bench_gpu.py: the parts that need no GPU (config shape, byte and floor arithmetic, table) and the whole
pipeline at a tiny scale on CPU. The real run is a `device` command (see notes/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
bench_gpu = sys.modules["bench_gpu"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench_gpu)


def test_config_has_llama_3_1_8b_shape():
    config = bench_gpu.llama_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B's published count
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert bench_gpu.full_kv_bytes(config, 131072, 1, torch.bfloat16) == 16 * 2**30


def test_decode_floor_arithmetic():
    # 15 GB of weights and 1 GB of cache read per step at 4.8 TB/s: 3.33 ms a step, 8 rows -> 2400 tokens/s
    assert bench_gpu.decode_floor(15 * 10**9, 10**9, 4.8e12, 8) == pytest.approx(2400.0)


def test_streamed_weights_leave_out_the_input_embedding():
    model = bench_gpu.random_model(bench_gpu.llama_config(tiny=True), torch.device("cpu"), torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert bench_gpu.streamed_weight_bytes(model) == total - model.get_input_embeddings().weight.numel() * 4


def test_skip_reasons_and_their_rows_in_the_table():
    config, inf = bench_gpu.llama_config(), float("inf")
    reason = bench_gpu.skip_reason("full", 131072, 8, config, torch.bfloat16, 100 * 2**30, inf)
    assert reason == "does not fit: its cache alone is 128 GiB, 100 GiB free"
    assert bench_gpu.skip_reason("snapkv", 131072, 8, config, torch.bfloat16, 100 * 2**30, inf) is None
    assert bench_gpu.skip_reason("snapkv", 32768, 1, config, torch.bfloat16, None, 0.0) == "skipped: time limit"
    result = {"config": "c", "dtype": "d", "device": "x", "torch": "t", "weight_bytes": 0, "copy_bandwidth_bytes_s": 1}
    result["settings"] = {"budget": 1024}
    result["rows"] = [{"method": "full", "context": 131072, "batch": 8, "status": reason}]
    assert bench_gpu.markdown_table(result).splitlines()[-1].endswith(f"| {reason} |")


def test_tiny_pipeline_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    result = bench_gpu.main(
        ["--tiny", "--contexts", "128", "--batches", "1", "--decode-tokens", "2", "--out", str(out)]
    )
    reference, *measured = result["rows"]
    assert (reference["method"], reference["context"]) == ("full", 32)  # the decode reference: context = budget
    rows = {r["method"]: r for r in measured}
    assert list(rows) == bench_gpu.METHODS and all(r["status"] == "ok" for r in result["rows"])
    assert rows["full"]["kv_bytes"] == bench_gpu.full_kv_bytes(bench_gpu.llama_config(True), 128, 1, torch.float32)
    for method in bench_gpu.METHODS[1:]:
        assert rows[method]["kv_bytes"] < rows["full"]["kv_bytes"]
        assert 0 < rows[method]["floor_ratio"] < 1
    assert json.loads((out / "rows.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    table = (out / "table.md").read_text()
    assert (
        table.count("\n| ") == 2 + len(bench_gpu.METHODS)
        and "decode reference" in table
        and table.strip() in capsys.readouterr().out
    )


def test_user_errors_exit_2_before_any_model(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_gpu.main(["--tiny", "--methods", "snapkvv"])
    assert raised.value.code == 2 and "unknown method(s) snapkvv" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_pipeline_on_gpu():
    """The GPU code paths (bf16, synchronisation, free-memory checks, allocator peaks) before the real run."""
    result = bench_gpu.main(["--tiny", "--device", "cuda", "--contexts", "128", "--batches", "1", "2"])
    assert result["dtype"] == "torch.bfloat16" and all(r["status"] == "ok" for r in result["rows"])
    assert all(r["peak_above_weights_bytes"] > 0 for r in result["rows"])


def test_no_cuda_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as raised:
        bench_gpu.main([])
    assert raised.value.code == 2 and "no CUDA device" in capsys.readouterr().err
