"""Config files: the Serve YAML's application args, profiles, and errors naming field / expected / received."""

import pytest
import yaml

from via_sd_ray.config import load_config, parse_config
from via_sd_ray.errors import ConfigError


def write(tmp_path, data, name="app.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_reads_args_of_serve_config(tmp_path):
    path = write(tmp_path, {"applications": [{"name": "x", "import_path": "m:f", "args": {
        "models": {"verifier": {"source": "tiny-random:verifier"}}, "router": {"block_size": 6}}}]})
    cfg = load_config(path)
    assert cfg.router.block_size == 6 and cfg.models.verifier.source == "tiny-random:verifier"


def test_shipped_configs_parse():
    for name in ("deployments/via_sd.yaml", "deployments/via_sd.tiny.yaml"):
        cfg = load_config(name)
        assert cfg.slim.layers, name


def test_profile_fills_unset_values_and_config_wins(tmp_path):
    write(tmp_path, {"slim": {"layers": [0, 2]}, "router": {"direct_threshold": 0.8, "block_size": 5}}, "prof.yaml")
    path = write(tmp_path, {"profile": "prof.yaml", "router": {"block_size": 3}})
    cfg = load_config(path)
    assert cfg.slim.layers == [0, 2]
    assert cfg.router.direct_threshold == 0.8 and cfg.router.block_size == 3


def test_profile_presets_are_named_router_points(tmp_path):
    write(tmp_path, {"router": {"direct_threshold": 0.4, "slim_threshold": 0.4, "deferred_check": True,
                                "presets": {"fast": {"deferred_check": False, "block_size": 6,
                                                     "measured": {"prefix_fraction": 0.6}}}}}, "prof.yaml")
    cfg = load_config(write(tmp_path, {"profile": "prof.yaml"}))
    default, fast = cfg.router.policy(), cfg.router.policy(preset="fast")
    assert default.deferred_check and default.direct_threshold == 0.4
    assert not fast.deferred_check and fast.block_size == 6 and fast.direct_threshold == 0.4
    assert cfg.router.policy(preset="fast", block_size=3).block_size == 3  # request fields win over the preset
    with pytest.raises(ConfigError, match=r"router.profile: expected one of \['default', 'fast'\], received 'warp'"):
        cfg.router.policy(preset="warp")
    with pytest.raises(ConfigError, match="router.presets.fast.max_direct_run"):
        parse_config({"router": {"presets": {"fast": {"max_direct_run": -1}}}})


@pytest.mark.parametrize("args, field, received", [
    ({"router": {"direct_threshold": 1.5}}, "router.direct_threshold", "1.5"),
    ({"router": {"block_size": 0}}, "router.block_size", "0"),
    ({"router": {"mode": "fast"}}, "router.mode", "'fast'"),
    ({"models": {"verifier": {"dtype": "int3"}}}, "models.verifier.dtype", "'int3'"),
    ({"routr": {}}, "routr", "{}"),
])
def test_errors_name_field_expected_received(args, field, received):
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    msg = str(err.value)
    assert msg.startswith(field) and received in msg and ("expected" in msg or "unknown field" in msg)


def test_threshold_order_is_checked():
    with pytest.raises(ConfigError, match="slim_threshold: expected a value <= direct_threshold"):
        parse_config({"router": {"direct_threshold": 0.5, "slim_threshold": 0.7}})


def test_missing_file_and_profile(tmp_path):
    with pytest.raises(ConfigError, match="expected an existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="profile: expected an existing profile file"):
        load_config(write(tmp_path, {"profile": "missing.yaml"}))


def test_device_names_are_checked_and_a_missing_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="models.verifier.device"):
        parse_config({"models": {"verifier": {"device": "tpu"}}})
    from via_sd_ray.models.tiers import resolve_device

    assert resolve_device("cpu") == "cpu"
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            resolve_device("cuda:0")


def test_precision_and_its_former_name():
    models = lambda **drafter: parse_config({"models": {"drafter": drafter}}).models.drafter  # noqa: E731
    assert models().precision == "auto" and models().quantization is None
    assert models(quantization="none").precision == "bf16"
    assert models(quantization="int4-weight-only").precision == "int4"
    assert models(quantization="int8-weight-only", precision="int8").precision == "int8"  # the same, twice
    with pytest.raises(ConfigError, match="quantization: expected it unset beside precision 'int4'"):
        models(quantization="none", precision="int4")
    with pytest.raises(ConfigError, match="models.drafter.precision: expected 'auto', 'bf16', 'int8', 'int4' or "
                                          "'gguf'"):
        models(precision="fp4")


def test_precision_auto_follows_the_device_and_the_checkpoint(tmp_path):
    from via_sd_ray.models.loading import ResolvedSource, resolve_precision

    registry_model = ResolvedSource("dir", str(tmp_path), registry="qwen2.5-coder-1.5b-instruct")
    gguf_file, plain = ResolvedSource("gguf", str(tmp_path / "m.gguf")), ResolvedSource("dir", str(tmp_path))
    tiny = ResolvedSource("tiny", "verifier")
    assert resolve_precision("auto", registry_model, "cpu") == "gguf"
    assert resolve_precision("auto", gguf_file, "cpu") == "gguf"
    assert resolve_precision("auto", plain, "cpu") == resolve_precision("auto", tiny, "cpu") == "bf16"
    assert resolve_precision("auto", registry_model, "cuda:0") == "bf16"
    assert resolve_precision("auto", tiny, "cpu", drafter=True) == resolve_precision("auto", plain, "cuda",
                                                                                     drafter=True) == "int4"
    assert resolve_precision("int8", registry_model, "cpu") == "int8"
    with pytest.raises(ConfigError, match="precision: expected a GGUF checkpoint"):
        resolve_precision("gguf", tiny, "cpu")


def test_int8_activations_resolve_per_tier_and_need_a_vector_int8_kernel(monkeypatch):
    from via_sd_ray.models import loading, qmm
    from via_sd_ray.models.loading import resolve_activations

    monkeypatch.setattr(qmm, "int8_available", lambda: None)
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "avx512_vnni"}))
    assert resolve_activations("auto", "int4", "cpu", drafter=True) is True  # a drafter's errors cost acceptance
    assert resolve_activations("auto", "gguf", "cpu") is False  # a verifier keeps its bf16 where that is fast
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_activations("auto", "gguf", "cpu") is True  # AVX2 only: int8, not float32's ~2.7x cost
    assert resolve_activations("auto", "gguf", "cuda:0") is False
    assert resolve_activations("auto", "int4", "cuda:0", drafter=True) is False
    assert resolve_activations("auto", "bf16", "cpu", drafter=True) is False
    assert resolve_activations("int8", "gguf", "cpu") is True
    assert resolve_activations("dtype", "int4", "cpu", drafter=True) is False
    with pytest.raises(ConfigError, match="activations: 'int8' rounds the inputs of packed layers"):
        resolve_activations("int8", "bf16", "cpu")
    monkeypatch.setattr(qmm, "int8_available", lambda: "this CPU has no AVX512-VNNI")
    assert resolve_activations("auto", "int4", "cpu", drafter=True) is False
    with pytest.raises(ConfigError, match="'int8' needs the qmm kernel with AVX512-VNNI or AVX2: this CPU"):
        resolve_activations("int8", "int4", "cpu")
    with pytest.raises(ConfigError, match="models.verifier.activations: expected 'auto', 'dtype' or 'int8'"):
        parse_config({"models": {"verifier": {"activations": "int4"}}})
