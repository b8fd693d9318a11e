"""``dtype: auto``: bf16 only where the hardware computes in it, read from the CPU's feature flags."""

import pytest
import torch

from via_sd_ray.config import parse_config
from via_sd_ray.models import loading
from via_sd_ray.models.loading import cpu_flags, torch_dtype

X86 = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    (X86.format(vendor="AuthenticAMD", extra=""), torch.float32),  # AVX2 only: bf16 is emulated
    (X86.format(vendor="AuthenticAMD", extra="avx512f avx512_bf16"), torch.bfloat16),
    (X86.format(vendor="GenuineIntel", extra="avx512f amx_bf16 amx_tile"), torch.bfloat16),
    (X86.format(vendor="GenuineIntel", extra="avx512f"), torch.float32),  # AVX512 without its bf16 part
    (ARM.format(extra="bf16 i8mm"), torch.bfloat16),
    (ARM.format(extra=""), torch.float32),
])
def test_auto_on_cpu_follows_the_native_bf16_flags(tmp_path, monkeypatch, cpuinfo, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    monkeypatch.setattr(loading, "cpu_flags", lambda: cpu_flags(str(path)))
    assert torch_dtype("auto", "cpu") is expected


def test_unreadable_cpuinfo_means_no_flags_and_float32(tmp_path, monkeypatch):
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset())
    assert torch_dtype("auto") is torch.float32


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_float16(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert torch_dtype("auto", "cuda:1") is (torch.bfloat16 if bf16 else torch.float16)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16", "float64"])
def test_named_dtypes_are_taken_as_given(name):
    assert torch_dtype(name, "cpu") is getattr(torch, name)


def test_auto_is_the_default_and_a_model_loads_in_the_resolved_dtype(monkeypatch):
    config = parse_config({"models": {"drafter": {"source": "tiny-random:drafter", "quantization": "none"},
                                      "verifier": {"source": "tiny-random:verifier"}}})
    assert config.models.verifier.dtype == config.models.drafter.dtype == "auto"
    for flags, expected in ((frozenset({"avx2"}), torch.float32), (frozenset({"amx_bf16"}), torch.bfloat16)):
        monkeypatch.setattr(loading, "cpu_flags", lambda flags=flags: flags)
        model = loading.load_model(loading.resolve("tiny-random:verifier"))
        assert next(model.parameters()).dtype is expected
