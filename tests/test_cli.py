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
    assert record["schema"] == "via-sd-bench/2"
    modes = record["modes"]
    for mode in ("ar", "sd", "via-sd", "via-sd-lossless"):
        for key in ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "acceptance_rate", "tier_fractions",
                    "free_running", "fidelity", "analytic_speedup", "measured_over_analytic", "time_split"):
            assert key in modes[mode], (mode, key)
    assert modes["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert modes["sd"]["fidelity"] == pytest.approx(1.0) and modes["via-sd-lossless"]["fidelity"] == pytest.approx(1.0)
    for mode in ("ar", "sd", "via-sd-lossless"):  # float32 tiny models: the lossless modes are ar's tokens
        assert modes[mode]["free_running"]["identical_share"] == 1.0
        assert modes[mode]["free_running"]["prefix_fraction"] == 1.0
    assert modes["sd"]["analytic_speedup"] > 0
    assert set(record["targets"]) == {"ar_over_hf", "sd_over_analytic", "sd_over_hf_assisted", "via_sd_over_sd",
                                      "via_sd_prefix_fraction_minus_sd"}
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "tok/s" in capsys.readouterr().out


def test_bench_check_code_reports_pass_rates_and_presets(tmp_path, capsys):
    app = tmp_path / "app.yaml"
    app.write_text(yaml.safe_dump({"models": {
        "drafter": {"source": "tiny-random:drafter", "dtype": "float32", "quantization": "none"},
        "verifier": {"source": "tiny-random:verifier", "dtype": "float32"}},
        "router": {"direct_threshold": 0.0, "slim_threshold": 0.0, "deferred_check": True,
                   "presets": {"fast": {"deferred_check": False}}}}))
    out = tmp_path / "code.json"
    assert main(["bench", "--config", str(app), "--check-code", "--num-prompts", "2", "--max-tokens", "8",
                 "--modes", "sd,via-sd,via-sd:fast", "--json", str(out)]) == 0
    modes = json.loads(out.read_text())["modes"]
    for mode in ("sd", "via-sd", "via-sd:fast"):
        assert modes[mode]["code"]["total"] == 2 and modes[mode]["code"]["passed"] == 0  # random models
    assert modes["via-sd"]["free_running"]["identical_share"] == 1.0  # every block direct, each one checked
    assert modes["via-sd"]["tier_blocks"]["direct"] > 0
    assert modes["via-sd:fast"]["tier_blocks"]["direct"] > 0
    assert modes["via-sd:fast"]["free_running"]["prefix_fraction"] < 1.0  # the same blocks unchecked drift
    assert "pass" in capsys.readouterr().out


def test_bench_rejects_unknown_mode(prompts_file, capsys):
    assert main(["bench", "--config", TINY, "--modes", "ar,warp", "--prompts", prompts_file]) == 2
    assert "--modes: expected" in capsys.readouterr().err


def test_calibrate_writes_a_profile_configs_can_use(tmp_path, prompts_file):
    out = tmp_path / "profile.yaml"
    assert main(["calibrate", "--config", TINY, "--num-prompts", "3", "--max-tokens", "16", "--trials", "3",
                 "--min-layers", "2", "--target-fidelity", "0.9", "--fast-fidelity", "0.3", "--confirm-prompts", "2",
                 "--out", str(out), "--prompts", prompts_file]) == 0
    profile = yaml.safe_load(out.read_text())
    assert profile["slim"]["layers"] and set(profile["router"]) >= {"direct_threshold", "slim_threshold",
                                                                   "escalate_threshold", "block_size",
                                                                   "deferred_check", "presets"}
    cal = profile["calibration"]
    assert cal["predicted"]["prefix_fraction"] >= 0.9
    assert cal["confirmed"]["default"]["prompts"] == 2 and cal["confirmed"]["fast"]["prefix_fraction"] is not None
    assert cal["confirmed"]["default"]["prefix_fraction"] >= 0.9  # measured, or replaced by a deferred point
    front = cal["pareto"]
    assert front and all(a["speedup_vs_ar"] < b["speedup_vs_ar"] and a["prefix_fraction"] >= b["prefix_fraction"]
                         for a, b in zip(front, front[1:]))
    fast = profile["router"]["presets"]["fast"]
    assert fast["measured"]["predicted"]["prefix_fraction"] >= 0.3
    assert out.with_suffix(".png").stat().st_size > 0
    app = tmp_path / "app.yaml"
    app.write_text(yaml.safe_dump({"profile": str(out), "models": {
        "drafter": {"source": "tiny-random:drafter", "dtype": "float32"},
        "verifier": {"source": "tiny-random:verifier", "dtype": "float32"}}}))
    assert main(["generate", "--config", str(app), "--prompt", "x", "--max-tokens", "4", "--json"]) == 0
    assert main(["bench", "--config", str(app), "--modes", "via-sd,via-sd:fast", "--num-prompts", "1",
                 "--max-tokens", "4", "--prompts", prompts_file]) == 0


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b-instruct" in out and "smollm2-135m-instruct" in out


def test_bench_batch_reports_concurrency_and_prefix_reuse(tmp_path, prompts_file, capsys):
    out = tmp_path / "batch.json"
    assert main(["bench-batch", "--config", TINY, "--num-prompts", "4", "--max-tokens", "10", "--modes", "ar,sd",
                 "--concurrency", "1,4", "--prefix-tokens", "300", "--prompts", prompts_file,
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "via-sd-bench-batch/1" and "slots x" in record["kv_pools"]["full"]
    for mode in ("ar", "sd"):
        one, four = record["modes"][mode]
        assert (one["concurrency"], four["concurrency"]) == (1, 4)
        assert one["over_lowest"] == 1.0 and four["tokens_per_s"] > 0
        assert four["identical_to_lowest"] == 4  # greedy: batching changes no token
    ttft = record["prefix_ttft"]
    assert ttft["prompt_tokens"] == 300 and 0 < ttft["repeat_s"] and ttft["first_s"] > 0
    assert "tok/s" in capsys.readouterr().out
    assert main(["bench-batch", "--config", TINY, "--concurrency", "0,x", "--prompts", prompts_file]) == 2


def test_gpu_check_runs_on_the_cpu_with_tiny_shapes(tmp_path, capsys):
    """The GPU check's own code path, on the CPU: every field it reports on a GPU is there (the drafter compiled,
    as on a GPU, the verifier eager, as ``--verifier-compile off`` runs a 32B one)."""
    out, profile = tmp_path / "gpu-check.json", tmp_path / "profile.txt"
    assert main(["gpu-check", "--device", "cpu", "--shapes", "tiny", "--max-tokens", "12", "--prompt-tokens", "24",
                 "--compile", "on", "--verifier-compile", "off", "--profile", str(profile), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["ok"] and record["complete"] and record["device"] == "cpu"
    (pair,) = record["pairs"]
    assert pair["compiled"] == {"drafter": True, "slim": False, "full": False}
    assert pair["greedy_sd_equals_ar"] and pair["greedy_sd_matching_prefix"] == 12
    assert 0 < pair["costs"]["draft_token_graph_s"] and "ar_step_graph_s" not in pair["costs"]
    assert all(pair["costs"][k] > 0 for k in ("draft_call_s", "draft_call_sync_inputs_s", "draft_token_sync_inputs_s"))
    assert set(pair["seconds_by_phase"]) == {"build", "warm_up", "costs", "transfers", "runs"}
    assert "one-token drafter passes (compiled)" in profile.read_text()
    assert pair["transfers_per_call"] == {"drafter": {"transfers": 1, "deviceless": []},
                                          "full": {"transfers": 1, "deviceless": []}}
    costs = pair["costs"]
    assert set(costs["full_call_s"]) == {"1", "2", "4", "8"} and len(costs["slim_call_s_by_layers"]) >= 2
    assert all(costs[k] > 0 for k in ("draft_token_s", "ar_step_s", "drafter_over_verifier"))
    for mode in ("ar", "sd", "via-sd"):
        for t in ("0", "1"):
            assert pair["modes"][f"{mode}@t={t}"]["tokens"] == 12
    assert set(pair["batch8_tokens_per_s"]) == {"ar", "sd"} and pair["peak_memory_bytes"] > 0
