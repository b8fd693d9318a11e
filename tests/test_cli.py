"""The `via-sd` command line on the tiny config: generate, bench and calibrate end to end."""

import json

import pytest
import yaml

from via_sd_ray.cli import main

TINY = "deployments/via_sd.tiny.yaml"
PROMPTS = ["def fib(n):", "Write a python function to sort a list.", "import numpy as np\nx = np.",
           "class Stack:\n    def push(self, x):"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return str(path)


def test_generate_json_modes_agree(capsys):
    outputs = {}
    for mode in ("ar", "sd"):
        assert main(["generate", "--config", TINY, "--prompt", "def f(x):", "--chat", "--mode", mode,
                     "--max-tokens", "24", "--json"]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)
    assert outputs["ar"]["token_ids"] == outputs["sd"]["token_ids"]
    stats = outputs["sd"]["stats"]
    assert {"tokens_per_s", "blocks", "mean_accepted", "tier_blocks", "escalations"} <= set(stats)
    assert stats["tier_blocks"]["full"] == stats["blocks"]


def test_generate_streams_text_and_reports(capsys):
    assert main(["generate", "--config", TINY, "--prompt", "hello", "--mode", "via-sd", "--max-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "[via-sd]" in captured.err and "tok/s" in captured.err


def test_generate_bad_input_is_a_clear_error(capsys):
    assert main(["generate", "--config", TINY, "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "max_tokens: expected" in capsys.readouterr().err
    assert main(["generate", "--config", TINY, "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature: expected" in capsys.readouterr().err


def test_bench_writes_stable_record(tmp_path, prompts_file, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", TINY, "--num-prompts", "2", "--max-tokens", "12", "--modes",
                 "ar,sd,via-sd,via-sd-lossless,hf,hf-assisted", "--json", str(out), "--prompts", prompts_file,
                 "--plot", str(tmp_path / "bench.png")]) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "via-sd-bench/1"
    modes = record["modes"]
    for mode in ("ar", "sd", "via-sd", "via-sd-lossless"):
        for key in ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "acceptance_rate", "tier_fractions",
                    "fidelity", "analytic_speedup", "measured_over_analytic", "time_split"):
            assert key in modes[mode], (mode, key)
    assert modes["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert modes["sd"]["fidelity"] == pytest.approx(1.0) and modes["via-sd-lossless"]["fidelity"] == pytest.approx(1.0)
    assert modes["sd"]["analytic_speedup"] > 0
    assert set(record["targets"]) == {"ar_over_hf", "sd_over_analytic", "sd_over_hf_assisted", "via_sd_over_sd",
                                      "via_sd_fidelity"}
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "tok/s" in capsys.readouterr().out


def test_bench_rejects_unknown_mode(prompts_file, capsys):
    assert main(["bench", "--config", TINY, "--modes", "ar,warp", "--prompts", prompts_file]) == 2
    assert "--modes: expected" in capsys.readouterr().err


def test_calibrate_writes_a_profile_configs_can_use(tmp_path, prompts_file):
    out = tmp_path / "profile.yaml"
    assert main(["calibrate", "--config", TINY, "--num-prompts", "3", "--max-tokens", "16", "--trials", "3",
                 "--min-layers", "2", "--target-fidelity", "0.9", "--out", str(out), "--prompts", prompts_file]) == 0
    profile = yaml.safe_load(out.read_text())
    assert profile["slim"]["layers"] and set(profile["router"]) >= {"direct_threshold", "slim_threshold",
                                                                   "escalate_threshold", "block_size"}
    assert profile["calibration"]["predicted"]["fidelity"] >= 0.9
    app = tmp_path / "app.yaml"
    app.write_text(yaml.safe_dump({"profile": str(out), "models": {
        "drafter": {"source": "tiny-random:drafter", "dtype": "float32"},
        "verifier": {"source": "tiny-random:verifier", "dtype": "float32"}}}))
    assert main(["generate", "--config", str(app), "--prompt", "x", "--max-tokens", "4", "--json"]) == 0


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b-instruct" in out and "smollm2-135m-instruct" in out
