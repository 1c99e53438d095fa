import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler.py"


def test_benchmark_reports_every_variant(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tell me a story"}\n{"prompt": "hello world"}\n')
    output = tmp_path / "result.json"

    completed = subprocess.run(
        [
            sys.executable, str(BENCHMARK), "--model", str(model_dir), "--prompts", str(prompts), "--num-prompts", "2",
            "--rollouts", "3", "--max-new-tokens", "8", "--device", "cpu", "--output", str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(output.read_text())["results"]
    assert sorted(results) == ["a", "b", "c"]
    for result in results.values():
        # 2 prompts x 3 rollouts of 1 to 8 tokens each.
        assert 6 <= result["generated_tokens"] <= 48
        assert result["peak_memory_mb"] >= result["memory_after_load_mb"] > 0
        assert result["tokens_per_second"] > 0
    # Variants (a) and (b) draw from the same seeded stream, so they sample the same rollouts.
    assert results["a"]["generated_tokens"] == results["b"]["generated_tokens"]
    assert "(c)/(a): tokens/s" in completed.stdout
    assert "(c)/(b): tokens/s" in completed.stdout


def test_benchmark_rejects_missing_prompts(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--prompts", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode != 0
    assert "missing.jsonl" in completed.stderr
    assert "Traceback" not in completed.stderr
