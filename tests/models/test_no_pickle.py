"""Weights are read only from safetensors (or GGUF), never unpickled: a pickle file next to the
weights, or instead of them, never runs. The pickle here makes a directory when it is loaded."""

from __future__ import annotations

import os
import pickle
from fnmatch import fnmatch

import pytest

from via_sd_ray.errors import ConfigError
from via_sd_ray.models import loading, tiny


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def plant_pickle(directory, marker) -> None:
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (directory / name).write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A safetensors checkpoint of the tiny verifier."""
    directory = tmp_path_factory.mktemp("tiny-verifier")
    tiny.tiny_model("verifier").save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def test_pickle_only_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "config.json").write_text("{}")
    plant_pickle(tmp_path, marker)
    with pytest.raises(ConfigError, match="pickle checkpoints are refused"):
        loading.resolve(str(tmp_path))
    for name in ("pytorch_model.bin", "model.pt"):
        with pytest.raises(ConfigError, match="model source: expected"):
            loading.resolve(str(tmp_path / name))
    assert not marker.exists()


@pytest.mark.parametrize("layers", [None, [0, 2]], ids=["full", "slim"])
def test_pickle_beside_safetensors_is_never_loaded(checkpoint, tmp_path, layers):
    marker = tmp_path / "unpickled"
    plant_pickle(checkpoint, marker)
    model = loading.load_model(loading.resolve(str(checkpoint)), dtype="float32", layers=layers)
    assert model.config.num_hidden_layers == (len(layers) if layers else tiny.ARCH["num_hidden_layers"])
    assert not marker.exists()


def test_hub_downloads_skip_pickle_files(monkeypatch):
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked["patterns"] = allow_patterns
        return "/nowhere"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert loading.resolve("some-org/some-model").location == "/nowhere"
    patterns = asked["patterns"]
    assert "*.safetensors" in patterns
    pickles = ("pytorch_model.bin", "model.pt", "model.pth", "optimizer.pkl", "last.ckpt")
    assert not [name for name in pickles if any(fnmatch(name, p) for p in patterns)], patterns
