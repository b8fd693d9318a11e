"""Loading checkpoints: registry names, local safetensors directories, GGUF files, Hugging
Face ids, and the tiny random models of the tests.

Weights are read only from safetensors or GGUF, never from pickle files. A process that
hosts only the slim verifier reads only the slim verifier's layers from the checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from via_sd_ray.errors import ConfigError
from via_sd_ray.models import kernels, qmm, registry, tiny
from via_sd_ray.models.cpuinfo import cpu_field, cpu_flags  # noqa: F401 (cpu_field: the bench record's)
from via_sd_ray.models.decoder import check_layers, keep_layers
from via_sd_ray.models.draft_vocab import narrow_head
from via_sd_ray.models.draft_vocab import read as read_draft_vocab
from via_sd_ray.models.gguf_blocks import FOUR_BIT, apply_gguf_blocks
from via_sd_ray.models.quant import PackedLinear, quantize, round_activations

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# CPU feature flags (/proc/cpuinfo) of instructions that compute in bf16 natively: x86 AVX512-BF16 and
# AMX, Arm's BF16 extension. Without them torch converts bf16 to float32 around every matmul.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The dtype a config's ``dtype`` names. ``auto`` is bf16 where the hardware computes in it (a GPU
    with bf16, a CPU with native bf16 instructions), float16 on older GPUs and float32 on other CPUs:
    on a 2-core AVX2-only CPU bf16 ran via-sd at 2.05 tok/s against 3.62 in float32 (README, dtype),
    while on the bf16-capable build machine bf16 was the faster choice."""
    if name != "auto":
        return DTYPES[name]
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (``NATIVE_BF16_FLAGS``)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


# Extra end-of-sequence tokens some families emit besides the tokenizer's EOS.
EXTRA_EOS_TOKENS = {"qwen2": ("<|endoftext|>", "<|im_end|>")}


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "tiny" | "dir" | "gguf"
    location: str  # tiny model name, checkpoint directory or .gguf path
    registry: str | None = None  # the registry model the directory was converted from

    @property
    def has_gguf(self) -> bool:
        """Whether the checkpoint is a GGUF file's: a .gguf source, or a registry model converted from one."""
        return self.kind == "gguf" or self.registry is not None

    def gguf(self) -> Path | None:
        """The GGUF file holding this checkpoint's own quantized blocks (a registry model's may be assembled
        again for a cache pulled before it was kept), if it has one."""
        if self.kind == "gguf":
            return Path(self.location)
        if self.registry is not None:
            return registry.gguf_file(self.registry)
        return None


def resolve(source: str, revision: str | None = None, pull: bool = True) -> ResolvedSource:
    """Where ``source`` lives locally, pulling registry models (and hub ids) on first use."""
    if tiny.is_tiny(source):
        return ResolvedSource("tiny", source.removeprefix(tiny.SOURCE_PREFIX))
    if source in registry.MODELS:
        if not registry.is_pulled(source) and not pull:
            raise ConfigError(f"model {source!r} is not pulled yet; run `via-sd models pull {source}`")
        return ResolvedSource("dir", str(registry.pull(source)), registry=source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource("gguf", str(path))
    if path.is_dir():
        if not list(path.glob("*.safetensors")):
            raise ConfigError(f"model source: expected safetensors weights in {path}, found none "
                              "(pickle checkpoints are refused)")
        return ResolvedSource("dir", str(path))
    if path.exists() or source.startswith((".", "/", "~")):
        raise ConfigError(
            f"model source: expected a registry name {sorted(registry.MODELS)}, a checkpoint directory, a .gguf "
            f"file or a Hugging Face id, received {source!r}"
        )
    return ResolvedSource("dir", _snapshot(source, revision))


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"])
    except Exception as err:  # offline, unknown id, gated repo: all say the same to the user
        raise ConfigError(
            f"model source: expected a registry name {sorted(registry.MODELS)}, a local checkpoint or a reachable "
            f"Hugging Face id, received {repo_id!r} ({type(err).__name__}: {err})"
        ) from None


def load_tokenizer(resolved: ResolvedSource):
    from transformers import AutoTokenizer

    if resolved.kind == "tiny":
        return tiny.tiny_tokenizer()
    if resolved.kind == "gguf":
        path = Path(resolved.location)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(resolved.location)


def eos_token_ids(model, tokenizer=None) -> tuple[int, ...]:
    """Every token id that ends a generation for this model and tokenizer (None: the model's own alone)."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    for token in EXTRA_EOS_TOKENS.get(model.config.model_type, ()) if tokenizer is not None else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return tuple(sorted(ids))


def resolve_precision(precision: str, resolved: ResolvedSource, device: str, drafter: bool = False) -> str:
    """``precision: auto`` made concrete for a model from ``resolved`` running on ``device``: on a CPU
    int4 for a drafter, gguf for a verifier whose checkpoint is a GGUF file (exact to it, fewer bytes per
    token), else bf16; off the CPU bf16 (a drafter int4). On a CPU, int4 and gguf run on the grouped kernel
    (``models/qmm.py``): where it cannot be built, auto is bf16 and asking for them is a config error."""
    if precision == "gguf" and not resolved.has_gguf:
        raise ConfigError("precision: expected a GGUF checkpoint (a registry model or a .gguf file) for 'gguf', "
                          f"received the {resolved.kind} checkpoint {resolved.location!r}; use int4 or bf16")
    on_cpu = torch.device(device).type == "cpu"
    if precision == "auto":
        precision = "int4" if drafter else "gguf" if on_cpu and resolved.has_gguf else "bf16"
        if on_cpu and precision != "bf16" and qmm.available() is not None:
            return "bf16"  # qmm logged why
        return precision
    if on_cpu and precision in ("int4", "gguf") and qmm.available() is not None:
        raise ConfigError(f"precision: {precision!r} on a CPU runs on the via_sd qmm kernel, which could not be built "
                          f"here ({qmm.available()}); install a C++ compiler and ninja, or use bf16 or int8")
    return precision


def resolve_activations(activations: str, precision: str, device: str, drafter: bool = False) -> bool:
    """Whether the packed layers take int8 inputs (``activations``: auto, dtype or int8) for a model at
    ``precision`` (concrete) on ``device``: auto is int8 where a vector int8 kernel runs it (AVX512-VNNI or
    AVX2) for a drafter (its rounding costs only acceptance), and for a verifier on a CPU without bf16
    arithmetic (AVX2 only: there the model's float32 inputs run ~2.7x slower end to end, and int8 drifts from
    them no further than bf16 does from float32 where bf16 is the default; README, Activations); int8 needs
    packed layers on a CPU that has one."""
    packed = torch.device(device).type == "cpu" and precision in ("int4", "gguf")
    if activations == "auto":
        return packed and (drafter or not cpu_computes_bf16()) and qmm.int8_available() is None
    if activations == "int8":
        if not packed:
            raise ConfigError(f"activations: 'int8' rounds the inputs of packed layers (precision int4 or gguf on a "
                              f"CPU), received it with precision {precision!r} on {device!r}; use 'dtype'")
        if qmm.int8_available() is not None:
            raise ConfigError("activations: 'int8' needs the qmm kernel with AVX512-VNNI or AVX2: "
                              f"{qmm.int8_available()}; use 'dtype'")
        return True
    return False


def load_model(resolved: ResolvedSource, dtype: str = "auto", layers: list[int] | None = None,
               attn_implementation: str = "sdpa", precision: str = "bf16", device: str = "cpu",
               linear_kernel: str = "aten", dtype_device: str | None = None, int8_activations: bool = False,
               draft_vocab: tuple[str, int] | None = None):
    """A Hugging Face causal LM in eval mode on ``device``. With ``layers``, only those decoder
    layers are read and the model holds them re-indexed from 0 (a slim-verifier-only process).
    ``precision`` (concrete: bf16, int8, int4 or gguf; ``resolve_precision``): the linear layers' weights.
    ``linear_kernel``: what computes the unquantized linear layers (``models.kernels``).
    ``dtype_device``: the device ``dtype: auto`` is chosen for, when the model is loaded elsewhere
    first (DeepSpeed loads on the host and moves each shard to its GPU). ``int8_activations``: the packed
    layers round their inputs to int8 (``resolve_activations``). ``draft_vocab``: (ranking file, size) of a
    drafter's narrowed LM head (``models.draft_vocab``), narrowed before it is quantized."""
    target = torch_dtype(dtype, dtype_device or device)
    precision = resolve_precision(precision, resolved, device)  # a gguf precision needs a GGUF checkpoint
    blocks = precision in ("int4", "gguf") and resolved.has_gguf and torch.device(device).type == "cpu"
    # the linear layers the file's blocks replace are read at the checkpoint's own (narrower) dtype, not
    # widened first: the rest is widened after, to the same values
    model = _load(resolved, _narrower(resolved, target) if blocks else target, layers, attn_implementation).to(device)
    try:
        if blocks:  # int4: the file's 4-bit blocks; gguf: all it holds in blocks
            apply_gguf_blocks(model, resolved.gguf(), layers, FOUR_BIT if precision == "int4" else None)
            _cast_float(model, target)
        elif precision == "gguf":  # off the CPU; there int4 quantizes every layer through torchao
            raise ValueError(f"precision: expected 'bf16', 'int8' or 'int4' on {device!r}, received 'gguf' (a "
                             "GGUF checkpoint's own blocks are served on CPUs only)")
        if draft_vocab is not None:
            narrow_head(model, read_draft_vocab(*draft_vocab, model.get_output_embeddings().out_features,
                                                eos_token_ids(model)))
        scheme = {"bf16": "none", "gguf": "none", "int8": "int8-weight-only", "int4": "int4-weight-only"}[precision]
        model = kernels.apply(quantize(model, scheme), linear_kernel)
        if int8_activations:
            round_activations(model)
        if torch.device(device).type == "cpu" and precision in ("int4", "gguf"):
            narrow_embedding(model, target)  # a table a float head shared until quantize() packed the head
        release_freed_memory()
        return model
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _narrower(resolved: ResolvedSource, dtype: torch.dtype) -> torch.dtype:
    """The checkpoint's stored dtype where it is narrower than ``dtype`` (a bf16 checkpoint served in float32),
    else ``dtype``."""
    if resolved.kind != "dir":
        return dtype
    try:
        config = json.loads((Path(resolved.location) / "config.json").read_text())
    except (OSError, ValueError):
        return dtype
    stored = DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "")
    return stored if stored is not None and stored.itemsize < dtype.itemsize else dtype


def _cast_float(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and buffers of every module but the packed layers (their scales
    keep the checkpoint's format) to ``dtype``, one tensor at a time; tied weights stay one tensor. An input
    embedding no float layer shares stays narrow, widened as it is looked up (``narrow_embedding``)."""
    narrow_embedding(model, dtype)
    cast: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # id -> (held alive, its cast)
    for module in model.modules():
        if isinstance(module, (PackedLinear, WideningEmbedding)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in cast:
                    cast[id(param)] = param, torch.nn.Parameter(param.detach().to(dtype),
                                                                requires_grad=param.requires_grad)
                setattr(module, name, cast[id(param)][1])
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))
    model.config.dtype = dtype


class WideningEmbedding(torch.nn.Module):
    """An input embedding whose table is held at a narrower dtype that holds its values exactly; the rows it
    looks up are widened to ``out_dtype``: the same values the wide table gives, in half the memory. The table
    is a buffer, not a parameter: what reads a model's dtype from its first parameter (transformers'
    ``model.dtype``, ``kernels.apply``) still sees the dtype it computes in."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)


def narrow_embedding(model: torch.nn.Module, dtype: torch.dtype = torch.float32, rows_at_once: int = 8192) -> bool:
    """Hold the input embedding of ``model`` (served in float32 on a CPU) in bf16 where every value of it is a
    bf16 value (a bf16 checkpoint's: the 1.5B's table, 0.93 GB in float32, is 0.47) and nothing else uses the
    table (a head tied to it computes in float32); lookups give the same float32 rows. A bf16 table is kept
    as it is, a float32 one narrowed if that loses nothing. Returns whether the embedding is now narrow."""
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    if (type(embedding) is not torch.nn.Embedding or dtype != torch.float32 or weight.device.type != "cpu"
            or weight.dtype not in (torch.float32, torch.bfloat16)):
        return False
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return False  # tied to a float head
    if weight.dtype == torch.bfloat16:
        # copied: keeping the tensor the checkpoint was read into left the 0.5B drafter ~0.6 GB more resident
        # after its load (where the heap put it), a fresh copy did not
        narrow = weight.detach().clone()
    else:
        narrow = torch.empty_like(weight, dtype=torch.bfloat16)
        with torch.no_grad():
            for begin in range(0, weight.shape[0], rows_at_once):
                wide = weight[begin : begin + rows_at_once]
                narrow[begin : begin + rows_at_once] = wide
                if not torch.equal(narrow[begin : begin + rows_at_once].float(), wide):
                    return False  # a float32 checkpoint's values: keep them
    model.set_input_embeddings(WideningEmbedding(narrow, dtype, embedding.padding_idx))
    return True


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the system (glibc keeps it otherwise: a 1.5B checkpoint's
    float weights, replaced by its blocks, stayed ~2.7 GB of resident memory)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _load(resolved: ResolvedSource, torch_dtype: torch.dtype, layers: list[int] | None, attn_implementation: str):
    if resolved.kind == "tiny":
        model = tiny.tiny_model(resolved.location, dtype=torch_dtype)
        return keep_layers(model, layers) if layers is not None else model
    from transformers import AutoModelForCausalLM, GgufConfig

    if resolved.kind == "gguf":
        path = Path(resolved.location)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_dtype, attn_implementation=attn_implementation,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
        return (keep_layers(model, layers) if layers is not None else model).eval()
    if layers is not None:
        return _load_layers(Path(resolved.location), layers, torch_dtype, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(
        resolved.location, dtype=torch_dtype, attn_implementation=attn_implementation, use_safetensors=True
    ).eval()


def _load_layers(directory: Path, layers: list[int], dtype: torch.dtype, attn_implementation: str):
    """Build the model with ``len(layers)`` decoder layers and read only those from the safetensors files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    layers = check_layers(layers, config.num_hidden_layers)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = min(config.max_window_layers, len(layers))
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    new_index = {orig: new for new, orig in enumerate(layers)}
    pattern = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    state = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key
                if m := pattern.match(key):
                    if int(m[1]) not in new_index:
                        continue
                    name = f"model.layers.{new_index[int(m[1])]}.{m[2]}"
                state[name] = f.get_tensor(key).to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {directory}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (rotary frequencies) are not in the checkpoint: rebuild them off meta
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ConfigError(f"checkpoint {directory}: tensors left unloaded: {leftover[:5]}")
    return model.eval()


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint {directory}: expected *.safetensors files, found none")
    return files
