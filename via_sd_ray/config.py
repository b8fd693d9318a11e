"""Typed configuration: the application arguments of ``deployments/via_sd.yaml``.

One file describes models, tiers and thresholds for both ``serve run`` and the in-process
CLI (``via-sd generate --config``). ``load_config`` accepts either a Ray Serve config
(it takes the ``args`` of the application) or a bare mapping of those args. Every error
names the field, what was expected and what was received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from via_sd_ray.core.policy import SCORES, Mode, RouterPolicy
from via_sd_ray.errors import ConfigError

DTypeName = Literal["auto", "float32", "bfloat16", "float16", "float64"]
PROMPT_LOOKUP = "prompt-lookup"
Precision = Literal["auto", "bf16", "int8", "int4", "gguf"]
FORMER_QUANTIZATION = {"none": "bf16", "int8-weight-only": "int8", "int4-weight-only": "int4"}
# auto | on | off; YAML 1.1 reads a bare on / off as a boolean, taken here as meant
AutoOnOff = Annotated[Literal["auto", "on", "off"],
                      BeforeValidator(lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(description="Registry name (`via-sd models list`), Hugging Face id, local checkpoint "
                        "directory, .gguf file, or `tiny-random:<name>` for tests.")
    dtype: DTypeName = Field("auto", description="Weight and activation dtype. auto: bf16 on GPUs that have it and on "
                             "CPUs with native bf16 instructions (AVX512-BF16, AMX, Arm BF16), else float16 on "
                             "GPUs and float32 on CPUs.")
    revision: str | None = Field(None, description="Hub revision, for Hugging Face ids.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers attention kernel.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Where the tier runs: cpu, cuda, "
                        "cuda:N, or auto (the GPU Ray gave the replica, if any, else cpu).")
    precision: Precision = Field(
        "auto", description="Weights of the linear layers. bf16: the float weights, at `dtype`; int8: weight-only "
        "int8 per output channel; int4: weight-only int4 in groups of 32, a GGUF checkpoint's own 4-bit blocks "
        "(Q4_K, Q4_0, Q4_1) taken as they are and the other layers quantized from their weights; gguf: the GGUF "
        "checkpoint's own precision, its 4-bit blocks at int4 and every other tensor in float (exact to the "
        "checkpoint). auto: on CPUs int4 for the drafter (its errors cost only speed) and gguf for a verifier "
        "from a GGUF checkpoint with 4-bit blocks (the registry's, or a .gguf file), else bf16; on GPUs bf16 "
        "(the drafter int4).")
    activations: Literal["auto", "dtype", "int8"] = Field(
        "auto", description="Inputs of the packed (int4 / gguf) layers on CPUs. dtype: as the model computes them "
        "(bf16 products summed in float32: a verify pass computes each position exactly as a one-token step); "
        "int8: each row rounded to int8 (one scale per 256 inputs against a GGUF K-quant's weights, llama.cpp's "
        "Q8_K; else per group of 32) and multiplied by the codes in integers (AVX512-VNNI or AVX2; llama.cpp's "
        "way): on Zen 4 verify passes ~1.3-1.45x faster than bf16, prefill ~1.55x; on AVX2-only CPUs ~3x faster "
        "than float32; rows stay independent (greedy sd still equals ar), but the outputs drift from the dtype's "
        "as far as the rounding takes them (README, Activations). auto: int8 for the drafter (its errors cost "
        "only acceptance), and for the verifiers on CPUs without bf16 arithmetic (AVX2 only), else dtype.")
    quantization: Literal["none", "int8-weight-only", "int4-weight-only"] | None = Field(
        None, description="Former name of precision: none = bf16, int8-weight-only = int8, int4-weight-only = int4.")
    compile: AutoOnOff = Field(
        "auto", description="Run decode-shaped passes (up to 32 tokens per row) as one torch.compile graph over the "
        "KV pool, CUDA graphs on CUDA; compiled at replica start (warm-up). auto: on on CUDA, off on CPUs, where a "
        "2-layer model's pass is ~3x faster and a 0.5B one's ~1.3x, but compiling takes ~100 s per graph and "
        "stack (four graphs each) on 2 cores. Tensor-parallel (deepspeed) verifiers run eagerly.")
    linear_kernel: Literal["auto", "aten", "onednn"] = Field(
        "auto", description="Kernel of the unquantized linear layers. auto: onednn for float32 on CPUs (weights "
        "reordered once at load; a 6-token verification pass 2.4x faster than with aten's MKL sgemm on an AVX2 "
        "EPYC, at 1.9x the LM head's memory when it is tied to the embeddings), else aten (torch's default).")

    @model_validator(mode="after")
    def _former_quantization(self):
        if self.quantization is not None:
            former = FORMER_QUANTIZATION[self.quantization]
            if self.precision not in ("auto", former):
                raise ValueError(f"quantization: expected it unset beside precision {self.precision!r} (its former "
                                 f"name), received {self.quantization!r}")
            object.__setattr__(self, "precision", former)
            object.__setattr__(self, "quantization", None)
        return self


class DraftVocabConfig(_Strict):
    file: str = Field(description="A token ranking written by `via-sd draft-vocab` (ids by frequency in sample "
                      "answers); relative to the config file's folder or the working directory.")
    size: int = Field(ge=1, description="Rows the drafter's LM head keeps: the ranking's most frequent ids (and the "
                      "end-of-sequence ids).")


class DrafterConfig(ModelConfig):
    source: str = Field("qwen2.5-coder-0.5b-instruct", description=f"As for models, or `{PROMPT_LOOKUP}` for a "
                        "model-free n-gram drafter.")
    max_ngram: int = Field(3, ge=1, le=16, description="prompt-lookup: longest n-gram matched.")
    min_ngram: int = Field(1, ge=1, le=16, description="prompt-lookup: shortest n-gram matched.")
    draft_vocab: DraftVocabConfig | None = Field(None, description="Score drafts over the `size` most frequent "
                                                 "tokens only (a narrower LM head: a cheaper draft token); the "
                                                 "verifier still decides over its whole vocabulary, so this costs "
                                                 "acceptance, never output. None: the whole vocabulary.")


class VerifierConfig(ModelConfig):
    source: str = Field("qwen2.5-coder-1.5b-instruct", description="As for models.")
    engine: Literal["hf", "deepspeed"] = Field("hf", description="What runs the verifier tiers' modules (the slim "
                                               "verifier runs on the full verifier's engine): hf, the transformers "
                                               "modules as loaded; deepspeed, the model wrapped by "
                                               "deepspeed.init_inference with AutoTP tensor parallelism (needs "
                                               "`pip install 'via-sd-ray[deepspeed]'`).")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Ranks sharing each verifier tier's weights and "
                                      "KV heads (engine deepspeed). Served, a tier replica owns a placement group "
                                      "of this many bundles (serving.deployments.<tier>.placement_group_bundles) "
                                      "and starts the other ranks as Ray actors in them.")

    @model_validator(mode="after")
    def _engine_fits(self):
        if self.tensor_parallel_size > 1 and self.engine != "deepspeed":
            raise ValueError(f"tensor_parallel_size: expected 1 with engine {self.engine!r} (tensor parallelism "
                             f"needs engine 'deepspeed'), received {self.tensor_parallel_size}")
        if self.engine == "deepspeed" and self.dtype == "float64":
            raise ValueError("dtype: expected float32, bfloat16 or float16 with engine 'deepspeed' (DeepSpeed "
                             "inference takes no float64), received 'float64'")
        if self.engine == "deepspeed" and self.precision not in ("auto", "bf16"):
            raise ValueError(f"precision: expected 'auto' or 'bf16' with engine 'deepspeed' (AutoTP shards "
                             f"nn.Linear layers only, and moves them to the GPU), received {self.precision!r}")
        return self


class ModelsConfig(_Strict):
    drafter: DrafterConfig = Field(default_factory=DrafterConfig, description="The drafter tier.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig,
                                     description="The full verifier; the slim verifier is a subset of its layers.")


class SlimConfig(_Strict):
    layers: list[int] | None = Field(None, description="Indices of the verifier's decoder layers the slim verifier "
                                     "keeps (increasing). None: chosen by the profile, else every layer.")


class BlockShape(_Strict):
    block_size: int = Field(ge=1, le=64, description="K for this mode.")
    draft_stop_threshold: float = Field(0.0, ge=0, le=1, description="As router.draft_stop_threshold.")


class RouterPreset(_Strict):
    """A named point of the speed-quality curve (`via-sd calibrate` writes them): router fields it sets."""

    block_size: int | None = Field(None, ge=1, le=64, description="As router.block_size.")
    direct_threshold: float | None = Field(None, ge=0, le=1, description="As router.direct_threshold.")
    slim_threshold: float | None = Field(None, ge=0, le=1, description="As router.slim_threshold.")
    escalate_threshold: float | None = Field(None, ge=0, le=1, description="As router.escalate_threshold.")
    score: Literal[SCORES] | None = Field(None, description="As router.score.")
    draft_stop_threshold: float | None = Field(None, ge=0, le=1, description="As router.draft_stop_threshold.")
    deferred_check: bool | None = Field(None, description="As router.deferred_check.")
    max_direct_run: int | None = Field(None, ge=0, le=1024, description="As router.max_direct_run.")
    measured: dict[str, Any] | None = Field(None, description="What calibration measured for this point "
                                            "(speedup, free-running fidelity); informational.")

    def fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"measured"})


class RouterConfig(_Strict):
    mode: Mode = Field(Mode.VIA_SD, description="ar: full verifier alone; sd: drafter + full verifier; "
                       "via-sd: drafter + slim + full verifier.")
    block_size: int = Field(4, ge=1, le=64, description="K: draft tokens per block (the most; a block may end "
                            "early below draft_stop_threshold).")
    direct_threshold: float = Field(0.95, ge=0, le=1, description="Block confidence at or above which a block is "
                                    "committed without a verifier (via-sd, lossy).")
    slim_threshold: float = Field(0.5, ge=0, le=1, description="Block confidence at or above which the slim "
                                  "verifier decides the block; below, the full verifier does.")
    escalate_threshold: float = Field(0.8, ge=0, le=1, description="Slim verifier top probability below which it "
                                      "hands the rest of the block to the full verifier.")
    lossless: bool = Field(False, description="Every committed token is checked by the full verifier; output equals "
                           "the full model's (greedy) or its distribution (sampling).")
    score: Literal[SCORES] = Field("min", description="How token probabilities make a block confidence.")
    draft_stop_threshold: float = Field(0.0, ge=0, le=1, description="The drafter ends a block after a token whose "
                                        "probability is below this (0: always K tokens).")
    deferred_check: bool = Field(False, description="Hold direct blocks (and greedy slim verdicts) until the full "
                               "verifier checks them in its next call (with the next block; it runs them anyway as "
                               "catch-up) and roll back at the first disagreement: via-sd then keeps the full "
                               "model's output (greedy) or distribution (sampled), at a block of streaming delay.")
    max_direct_run: int = Field(0, ge=0, le=1024, description="Most consecutive direct blocks before one goes to a "
                                "verifier (with deferred_check: most blocks held); 0: no limit.")
    sd: BlockShape | None = Field(None, description="Block shape of the `sd` mode when it differs from via-sd's "
                                  "(long blocks pay off when every block is verified; calibrated separately).")
    presets: dict[str, RouterPreset] = Field(default_factory=dict, description="Named router settings a request "
                                             "selects with via_sd.profile (e.g. `fast`: a measured fidelity loss "
                                             "for speed); `default` is the router's own fields.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.slim_threshold > self.direct_threshold:
            raise ValueError(
                f"slim_threshold: expected a value <= direct_threshold (thresholds in order), received "
                f"slim_threshold={self.slim_threshold}, direct_threshold={self.direct_threshold}"
            )
        return self

    def routes_to_slim(self) -> bool:
        """Whether a via-sd request sends blocks to the slim tier at the default point or any preset: a
        confidence band slim_threshold <= c < direct_threshold (a request asking another mode sends none)."""
        return any(p.slim_threshold < p.direct_threshold
                   for p in (self.policy(preset, mode=Mode.VIA_SD) for preset in (None, *self.presets)))

    def policy(self, preset: str | None = None, **overrides) -> RouterPolicy:
        """The policy of this router, with a named preset's fields and then ``overrides`` (None: unset) applied."""
        fields = self.model_dump(exclude={"sd", "presets"})
        if preset not in (None, "default"):
            if preset not in self.presets:
                raise ConfigError(f"router.profile: expected one of {['default', *self.presets]}, "
                                  f"received {preset!r}")
            fields |= self.presets[preset].fields()
        fields |= {k: v for k, v in overrides.items() if v is not None}
        if self.sd is not None and Mode(fields["mode"]) is Mode.SD:
            shape = self.sd.model_dump()
            fields |= {k: v for k, v in shape.items() if overrides.get(k) is None}
        return RouterPolicy(**fields)


class LimitsConfig(_Strict):
    max_tokens: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that names none.")
    max_cache_bytes: int | None = Field(None, ge=1, description="Former name of serving.kv_cache_bytes (used when "
                                        "that is unset).")


DEPLOYMENTS = ("Ingress", "Router", "Drafter", "SlimVerifier", "FullVerifier")


class DeploymentOptions(_Strict):
    """Ray Serve options of one deployment (see `ray.serve.deployment`); unset fields keep Serve's defaults."""

    num_replicas: int | Literal["auto"] | None = Field(None, description="Fixed replica count, or 'auto'.")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica runs at once.")
    max_queued_requests: int | None = Field(None, ge=-1, description="Requests queued per caller (the proxy, or "
                                            "the deployment calling this one) before the rest are refused "
                                            "(backpressure_config); -1: no limit.")
    backpressure_config: dict[str, Any] | None = Field(None, description="Serve BackpressureConfig of requests "
                                                       "refused over max_queued_requests: status_code (429 or "
                                                       "503) and retry_after_s (the Retry-After header).")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling_config (min/max "
                                                      "replicas, targets, policy).")
    ray_actor_options: dict[str, Any] | None = Field(None, description="num_cpus, num_gpus, resources, "
                                                     "label_selector, runtime_env, ...")
    placement_group_bundles: list[dict[str, float]] | None = Field(None, description="Resource bundles of one "
                                                                   "replica (tensor-parallel workers).")
    placement_group_strategy: str | None = Field(None, description="PACK, STRICT_PACK, SPREAD, ...")
    placement_group_bundle_label_selector: list[dict[str, str]] | None = Field(
        None, description="Node labels per bundle (one selector for all bundles, or one per bundle), e.g. "
        "{ray.io/accelerator-type: H100}.")
    max_replicas_per_node: int | None = Field(None, ge=1)
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    graceful_shutdown_wait_loop_s: float | None = Field(None, gt=0)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_limit(cls, value):
        if value == 0:
            raise ValueError("expected -1 (no limit) or a positive integer, received 0")
        return value

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


# Requests refused over max_queued_requests get 429 and Retry-After (Serve's default: 503, no header).
FRONT_BACKPRESSURE = {"status_code": 429, "retry_after_s": 1.0}


def _default_deployments() -> dict[str, DeploymentOptions]:
    tier = DeploymentOptions(num_replicas=1, max_ongoing_requests=64)
    return {
        "Ingress": DeploymentOptions(num_replicas=1, max_ongoing_requests=256, backpressure_config=FRONT_BACKPRESSURE),
        "Router": DeploymentOptions(num_replicas=1, max_ongoing_requests=64, backpressure_config=FRONT_BACKPRESSURE),
        "Drafter": tier, "SlimVerifier": tier, "FullVerifier": tier,
    }


class ServingConfig(_Strict):
    batch_size: int = Field(8, ge=1, le=256, description="Most generations a tier replica runs in one forward "
                            "pass.")
    batch_wait_ms: float = Field(100.0, ge=0, le=1000, description="Longest a tier batch waits for the calls of "
                                 "other active generations (it waits at most half a typical batch time; 0: never).")
    verify_token_budget: int | None = Field(None, ge=2, description="Load-adaptive blocks: the tokens a "
                                            "verify pass should carry for all active generations together; "
                                            "blocks shrink as generations are added, and below min_block "
                                            "generations decode without drafts. null: blocks never shrink.")
    min_block: int = Field(2, ge=1, description="Shortest block worth drafting under load (verify_token_budget).")
    niceness: int | None = Field(0, ge=-20, le=19, description="Scheduling niceness of every replica process "
                                 "of the app (Ray starts workers at 15, below its own processes, whose wake-ups "
                                 "then stall a tier's parallel passes); needs CAP_SYS_NICE to lower it. null: "
                                 "leave Ray's.")
    tier_retries: int = Field(2, ge=0, le=10, description="Retries of a tier call that failed because its "
                              "replica died or was unreachable (the replacement rebuilds the KV cache).")
    tier_timeout_s: float = Field(120.0, gt=0, description="Longest one tier call may take.")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="Largest request the "
                                   "Ingress reads: an HTTP body (larger gets 413) or a gRPC request message "
                                   "(larger gets INVALID_ARGUMENT).")
    affinity: bool = Field(True, description="Route every tier call of a generation to the replica holding its "
                           "KV cache (session affinity on the generation id).")
    cache_idle_timeout_s: float = Field(60.0, gt=0, description="A tier replica drops a generation's KV cache "
                                        "after this long without a call (its release went elsewhere or was lost).")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV pool of each tier replica, allocated at start; "
                                       "null: kv_cache_fraction of the device's free memory.")
    kv_cache_fraction: float = Field(0.25, gt=0, le=0.95, description="Share of the free memory of the tier's "
                                     "device (GPU: torch.cuda.mem_get_info; CPU: available RAM) its KV pool takes "
                                     "when kv_cache_bytes is null.")
    kv_slot_tokens: int | None = Field(None, ge=16, description="Tokens one generation's KV slot holds: the longest "
                                       "prompt + max_tokens served (null: the models' context window).")
    kv_max_slots: int = Field(64, ge=1, le=4096, description="Most slots a pool has (generations a replica holds "
                              "at once, running or kept as reusable prefixes).")
    prefill_chunk_tokens: int | None = Field(512, ge=16, description="Most catch-up tokens of one call in one "
                                             "forward pass: a long prompt is prefilled in chunks, each in a batch "
                                             "with other generations' steps (null: in one pass).")
    prefix_min_tokens: int | None = Field(16, ge=1, description="Shortest cached prefix a new generation copies "
                                          "from another one's slot (null: only a finished generation's own slot "
                                          "is reused).")
    proposal_top_k: int = Field(64, ge=0, description="Tokens of a sampled proposal: the drafter samples its block "
                                "from the renormalised top-k of its warped distribution and ships only those k "
                                "(rejection sampling against them is exact); the slim verifier's distributions "
                                "passed on to the full verifier likewise. 0: the whole vocabulary.")
    prefix_affinity_tokens: int | None = Field(256, ge=1, description="Route a generation by a hash of its first "
                                               "this many prompt tokens (prompts at least this long), so prompts "
                                               "sharing them meet their cached prefix; null: by generation id.")
    admission_timeout_s: float = Field(30.0, ge=0, description="Longest a new generation waits for a free KV slot "
                                       "before it is refused (429 / RESOURCE_EXHAUSTED with Retry-After).")
    admission_queue: int = Field(64, ge=0, description="New generations a tier replica lets wait for a slot; more "
                                 "are refused at once.")
    slim_tier: AutoOnOff = Field("auto", description="Whether the SlimVerifier deployment runs: "
                                                    "auto = where the router sends it blocks (a via-sd band "
                                                    "slim_threshold < direct_threshold at the default point or a "
                                                    "preset); off: no slim replicas, and the blocks a request routes "
                                                    "to the slim tier go to the full verifier.")
    gpu_memory_share: float | None = Field(None, gt=0, le=1, description="Share of its GPU's memory a tier replica "
                                           "may use, weights and KV pool together, for replicas sharing a GPU "
                                           "(null: the fractional num_gpus Ray gave the replica, else the whole "
                                           "GPU).")
    deployments: dict[Literal[DEPLOYMENTS], DeploymentOptions] = Field(
        default_factory=_default_deployments, description="Per-deployment Serve options; unnamed deployments "
        "keep the defaults.")

    @model_validator(mode="after")
    def _fill_defaults(self):
        merged = _default_deployments()
        for name, options in self.deployments.items():
            given = options.model_dump(exclude_none=True)
            if given.get("autoscaling_config") is not None and given.get("num_replicas") not in (None, "auto"):
                raise ValueError(f"serving.deployments.{name}: expected either num_replicas or autoscaling_config, "
                                 f"received both (num_replicas={given['num_replicas']})")
            defaults = merged[name].model_dump(exclude_none=True)
            if "autoscaling_config" in given:
                defaults.pop("num_replicas", None)
            merged[name] = DeploymentOptions(**{**defaults, **given})
        object.__setattr__(self, "deployments", merged)
        return self


class EngineConfig(_Strict):
    served_model_name: str = Field("via-sd", description="The model name clients use (OpenAI `model`).")
    profile: str | None = Field(None, description="A calibration profile (written by `via-sd calibrate`) giving "
                                "slim.layers and router thresholds; values set here win.")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    slim: SlimConfig = Field(default_factory=SlimConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process (None: torch default).")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Ray Serve deployments and tier "
                                   "call behaviour (ignored in-process).")

    def slim_deployed(self) -> bool:
        """Whether the application runs a SlimVerifier deployment (``serving.slim_tier``)."""
        if self.serving.slim_tier != "auto":
            return self.serving.slim_tier == "on"
        return self.router.routes_to_slim()

    def deployment_names(self) -> tuple[str, ...]:
        """The deployments the application runs (DEPLOYMENTS, less SlimVerifier where it is not deployed)."""
        return tuple(name for name in DEPLOYMENTS if name != "SlimVerifier" or self.slim_deployed())


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        expected = msg.removeprefix("Value error, ").removeprefix("Input should be ")
        received = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown field (received {received!r})")
        elif e["type"] == "missing":
            lines.append(f"{field}: expected a value, received none")
        elif e["type"] == "value_error":
            lines.append(f"{field or 'config'}: {expected}")
        else:
            lines.append(f"{field}: expected {expected}, received {received!r}")
    return "; ".join(lines)


def parse_config(args: dict[str, Any] | None, base_dir: Path | None = None) -> EngineConfig:
    """Validate application ``args``, merging in the profile they reference."""
    args = dict(args or {})
    profile = args.get("profile")
    if profile:
        args = merge_profile(args, _resolve(profile, base_dir))
    drafter = (args.get("models") or {}).get("drafter") or {}
    vocab = drafter.get("draft_vocab") if isinstance(drafter, dict) else None
    if isinstance(vocab, dict) and isinstance(vocab.get("file"), str):  # found where the config file is
        # absolute: Serve replicas read it, and their working directory is not the one `serve run` ran in
        drafter = {**drafter, "draft_vocab": {**vocab, "file": str(_resolve(vocab["file"], base_dir).absolute())}}
        args["models"] = {**args["models"], "drafter": drafter}
    try:
        return EngineConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def merge_profile(args: dict[str, Any], profile_path: Path) -> dict[str, Any]:
    """``args`` with the profile's slim and router values filled in where ``args`` leaves them unset."""
    if not profile_path.is_file():
        raise ConfigError(f"profile: expected an existing profile file, received {str(profile_path)!r}")
    data = yaml.safe_load(profile_path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile: expected a mapping in {profile_path}, received {type(data).__name__}")
    merged = dict(args)
    merged["profile"] = str(profile_path)
    for section in ("slim", "router"):
        given = dict(merged.get(section) or {})
        merged[section] = {**(data.get(section) or {}), **given}
    return merged


def load_config(path: str | Path, app: str | None = None) -> EngineConfig:
    """Read a YAML file: a Ray Serve config (the ``args`` of application ``app``, or of the only
    / first application) or a bare mapping of application args."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: expected an existing YAML file, received {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: expected valid YAML, received a parse error: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, received {type(data).__name__}")
    if "applications" in data:
        apps = data["applications"] or []
        chosen = [a for a in apps if app is None or a.get("name") == app]
        if not chosen:
            names = [a.get("name") for a in apps]
            raise ConfigError(f"applications: expected an application named {app!r}, received {names}")
        data = chosen[0].get("args") or {}
    return parse_config(data, base_dir=path.parent)


def _resolve(profile: str, base_dir: Path | None) -> Path:
    p = Path(profile).expanduser()
    if p.is_absolute() or base_dir is None:
        return p
    for candidate in (base_dir / p, Path.cwd() / p):
        if candidate.is_file():
            return candidate
    return base_dir / p
