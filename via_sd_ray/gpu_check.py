"""``via-sd gpu-check``: what the engine costs and does on one accelerator, in one command.

No checkpoint is needed: the models are random weights of real shapes built from their configs in
code (the Qwen2.5-Coder-0.5B drafter with the Qwen2.5-Coder-7B and -32B verifier shapes), created on
the device. Layers are truncated only where the device's memory needs it (said in the output). For
each pair it prints and writes as JSON:

- per-call costs, each timer synchronized with the device: a draft token, a full-verifier call by
  block length, a slim call by layer count, a catch-up token, and the drafter/verifier cost ratio;
- tokens/s of ``ar``, ``sd`` and ``via-sd``, greedy and at temperature 1, and batch-8 throughput;
  random weights accept few drafts, so SD's tokens/s at acceptance 0.6 and 0.8 are also projected
  from the measured costs;
- the greedy ``sd`` == ``ar`` check, device -> host transfers of a tier call (``HostTransfers``), and
  peak memory;
- where a tier runs compiled, the compiled graph's own time beside the tier call's (``*_graph_s``: the
  difference is the host's work around it), and the seconds each phase took (compiling is most of them).

On a GPU, bf16 sums a 5-row pass in another order than a 1-row one, so greedy ``sd`` may leave ``ar``
after a near tie (reported: ``greedy_sd_matching_prefix``); the check that must hold runs first, on a
small float32 pair of real widths with TF32 off, where SD's output equals the verifier's exactly.

``--device cpu --shapes tiny`` runs the same code on tiny shapes in seconds (the test suite does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import sys
import time

import torch

from via_sd_ray.config import parse_config
from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.device_guard import HostTransfers
from via_sd_ray.models.kv_cache import free_device_bytes, median_seconds
from via_sd_ray.models.loading import torch_dtype
from via_sd_ray.models.local import LocalEngine

SCHEMA = "via-sd-gpu-check/1"
# Qwen2.5-Coder configs (config.json of each checkpoint), without the weights
SHAPES = {
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True),
    "qwen2.5-coder-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                             tie_word_embeddings=False),
    "qwen2.5-coder-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                              num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                              tie_word_embeddings=False),
    # the exactness check on a GPU: real widths and vocabulary, few layers, float32
    "check-drafter": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "check-verifier": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # overhead-bound shapes for the CPU run in the test suite
    "tiny-drafter": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "tiny-verifier": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
PAIRS = {"real": [("qwen2.5-coder-0.5b", "qwen2.5-coder-7b"), ("qwen2.5-coder-0.5b", "qwen2.5-coder-32b")],
         "tiny": [("tiny-drafter", "tiny-verifier")]}
EXACT_PAIR = ("check-drafter", "check-verifier")  # run first on a GPU, in float32
BLOCK = 4  # the block length of the sd / via-sd runs
REPEAT = 5  # timed runs per cost (median)


class _IdTokenizer:
    """Stands in for a tokenizer: the runs work on token ids and never read text."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def convert_tokens_to_ids(self, token):
        return None


def n_params(shape: dict, layers: int) -> int:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return layers * per_layer + v * h * (1 if shape["tie_word_embeddings"] else 2)


def build(name: str, device: str, dtype: torch.dtype, layers: int, vocab: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**SHAPES[name], "num_hidden_layers": layers, **({"vocab_size": vocab} if vocab else {})}
    config = AutoConfig.for_model("qwen2", max_position_embeddings=4096, eos_token_id=None, bos_token_id=None,
                                  **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # weights are created (and initialised) on the device
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def fit_layers(pair: tuple[str, str], device: str, dtype: torch.dtype, layers: int | None) -> dict[str, int]:
    """Decoder layers of each model: all of them, unless ``layers`` or the device's memory says fewer."""
    size = torch.finfo(dtype).bits // 8
    budget = 0.7 * free_device_bytes(device)
    drafter, verifier = (SHAPES[n] for n in pair)
    fixed = n_params(drafter, drafter["num_hidden_layers"]) * size + n_params(verifier, 0) * size
    per_layer = (n_params(verifier, 1) - n_params(verifier, 0)) * size
    room = max(1, int((budget - fixed) // per_layer))
    want = verifier["num_hidden_layers"] if layers is None else layers
    return {"drafter": drafter["num_hidden_layers"], "verifier": min(want, room, verifier["num_hidden_layers"])}


def prefilled(stack: DecoderStack, context: list[int], room: int = 64):
    """A cache holding ``context`` with ``room`` tokens after it: where the stack runs compiled, slot 0 of its
    pool (which no generation holds during the measurements), so that its passes run compiled too."""
    cache = stack.compiled.pool.cache(0) if stack.compiled else stack.new_cache(len(context) + room)
    stack(context, cache, 1)
    return cache


def call_costs(engine: LocalEngine, context: list[int], device) -> dict:
    full, drafter = engine.full.stack, engine.drafter.stack
    n_layers = len(full.layers)

    def cost(stack, tokens) -> float:
        """Seconds of one pass of ``tokens`` after the prefilled ``context``."""
        cache = prefilled(stack, context)

        def run():
            cache.crop(len(context))
            stack(tokens, cache, 1)
        return median_seconds(run, device, REPEAT)

    def graph_cost(stack) -> float:
        """Seconds of the compiled graph alone on a one-token pass (inputs built once, no host work around)."""
        step = stack.compiled
        cache = prefilled(stack, context)
        ids = torch.tensor([context[-1:]], device=step.device)
        positions = torch.tensor([[len(context)]], device=step.device)
        slots = torch.tensor([cache.slot], device=step.device)
        with torch.inference_mode():
            return median_seconds(lambda: step.fn(ids, positions, slots, step.pool.data), device, REPEAT)

    block = context[-(BLOCK + 1):]
    costs = {"draft_token_s": cost(drafter, block[:1]), "ar_step_s": cost(full, block[:1]),
             "full_call_s": {k: cost(full, context[-(k + 1):]) for k in (1, 2, 4, 8)}}
    slim = {}  # eager stacks made for the measurement (compiling each would take minutes): see full_call_eager_s
    for count in sorted({max(1, n_layers * f // 4) for f in (1, 2, 3)}):
        layers = [round(i * (n_layers - 1) / max(1, count - 1)) for i in range(count)] if count > 1 else [0]
        slim[count] = cost(DecoderStack(engine.verifier_model, sorted(set(layers))), block)
    costs["slim_call_s_by_layers"] = slim
    if full.compiled:
        with eager(full):
            costs["full_call_eager_s"] = cost(full, block)
    behind = cost(full, context[-(BLOCK + 9):])
    costs["catch_up_token_s"] = max(0.0, (behind - costs["full_call_s"][BLOCK]) / 8)
    costs["drafter_over_verifier"] = costs["draft_token_s"] / costs["ar_step_s"]
    for key, stack in (("draft_token_graph_s", drafter), ("ar_step_graph_s", full)):
        if stack.compiled:
            costs[key] = graph_cost(stack)

    def draft_call() -> float:
        """Seconds of a greedy draft call of BLOCK tokens after ``context`` (its passes, picks and one transfer)."""
        call = DraftCall("cost", context, BLOCK, SamplingParams(max_tokens=BLOCK, ignore_eos=True), seed=1)
        seconds = median_seconds(lambda: engine.drafter.draft(call), device, REPEAT)
        engine.release("cost")
        return seconds

    costs["draft_call_s"] = draft_call()
    if drafter.compiled:  # the same with each pass's inputs copied as blocking copies (as before they were not)
        drafter.compiled.sync_inputs = True
        try:
            costs["draft_token_sync_inputs_s"] = cost(drafter, block[:1])
            costs["draft_call_sync_inputs_s"] = draft_call()
        finally:
            drafter.compiled.sync_inputs = False
    for alpha in (0.6, 0.8):  # expected tokens per block over its cost, at per-token acceptance alpha
        tokens = (1 - alpha ** (BLOCK + 1)) / (1 - alpha)
        block_s = BLOCK * costs["draft_token_s"] + costs["full_call_s"][BLOCK]
        costs[f"sd_projected_tokens_per_s_at_{alpha}"] = tokens / block_s
    costs["ar_tokens_per_s_from_step"] = 1 / costs["ar_step_s"]
    return costs


def transfers_of_a_call(engine: LocalEngine, context: list[int]) -> dict:
    """Device -> host transfers of a sampled draft and verify call, counted on the eager passes (the guard's
    dispatch mode cannot run inside a compiled graph; a compiled pass makes no transfer of its own)."""
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    with eager(engine.drafter.stack), HostTransfers([engine.drafter.stack, engine.drafter.pool.data]) as guard:
        draft = engine.drafter.draft(DraftCall("transfers", context, BLOCK, params, seed=1))
    drafter = {"transfers": len(guard.transfers), "deviceless": guard.deviceless}
    with eager(engine.full.stack), HostTransfers([engine.full.stack, engine.full.pool.data]) as guard:
        engine.full.verify(VerifyCall(Tier.FULL, "transfers", context, draft.tokens, params, 2, draft.probs))
    engine.release("transfers")
    return {"drafter": drafter, "full": {"transfers": len(guard.transfers), "deviceless": guard.deviceless}}


@contextlib.contextmanager
def eager(stack: DecoderStack):
    """``stack`` running its passes eagerly for a while (its compiled pass set aside, then restored)."""
    compiled, stack.compiled = stack.compiled, None
    try:
        yield
    finally:
        stack.compiled = compiled


def generation_runs(engine: LocalEngine, prompts: list[list[int]], tokens: int) -> dict:
    router = engine.config.router
    policies = {"ar": router.policy(mode="ar"), "sd": router.policy(mode="sd", block_size=BLOCK),
                "via-sd": router.policy(mode="via-sd", block_size=BLOCK)}
    out, greedy_tokens = {}, {}
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=tokens, temperature=temperature, seed=7, ignore_eos=True)
        for mode, policy in policies.items():
            engine.generate(prompts[0], SamplingParams(max_tokens=2, ignore_eos=True), policy)  # warm-up
            result = engine.generate(prompts[0], params, policy)
            key = f"{mode}@t={temperature:g}"
            out[key] = {"tokens_per_s": result.tokens_per_second, "tokens": len(result.token_ids),
                        "acceptance": result.stats.to_dict().get("acceptance_rate")}
            if temperature == 0.0:
                greedy_tokens[mode] = result.token_ids
    batch = {}
    for mode in ("ar", "sd"):
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        results = engine.generate_batch(prompts[:8], params, policies[mode])
        batch[mode] = sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)
    sd, ar = greedy_tokens["sd"], greedy_tokens["ar"]
    prefix = next((i for i, (a, b) in enumerate(zip(sd, ar)) if a != b), min(len(sd), len(ar)))
    return {"modes": out, "batch8_tokens_per_s": batch, "greedy_sd_equals_ar": sd == ar,
            "greedy_sd_matching_prefix": prefix}


def check_pair(pair: tuple[str, str], device: str, layers: int | None, tokens: int, prompt_tokens: int,
               compile_setting: str = "auto", verifier_compile: str | None = None, dtype: torch.dtype | None = None,
               profile: str | None = None) -> dict:
    dtype = dtype or torch_dtype("auto", device)
    phases, clock = {}, [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now
        log(f"  {name}: {phases[name]:.1f} s")

    plan = fit_layers(pair, device, dtype, layers)
    full_layers = SHAPES[pair[1]]["num_hidden_layers"]
    note = "" if plan["verifier"] == full_layers else f" (of {full_layers}: truncated to fit the device)"
    log(f"== {pair[0]} drafter, {pair[1]} verifier with {plan['verifier']} layers{note}, {dtype} on {device}")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    slim = list(range(0, plan["verifier"], 2))  # every other layer
    config = parse_config({
        "models": {"drafter": {"source": "tiny-random:drafter", "device": device, "compile": compile_setting},
                   "verifier": {"source": "tiny-random:verifier", "device": device,
                                "compile": verifier_compile or compile_setting}},
        "slim": {"layers": slim},
        "router": {"mode": "via-sd", "block_size": BLOCK},
        "limits": {"max_tokens": tokens},
        "serving": {"kv_slot_tokens": prompt_tokens + tokens + 64, "kv_max_slots": 10, "prefill_chunk_tokens": None},
    })
    # the drafter's vocabulary for both: a random verifier, unlike a trained one, picks its padding rows
    vocab = min(SHAPES[n]["vocab_size"] for n in pair)
    verifier = build(pair[1], device, dtype, plan["verifier"], vocab)
    drafter = build(pair[0], device, dtype, plan["drafter"])
    phase("build")
    engine = LocalEngine.from_models(config, verifier, drafter, _IdTokenizer())  # compiles and warms up
    phase("warm_up")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (8, prompt_tokens), generator=gen).tolist()
    record = {"drafter": pair[0], "verifier": pair[1], "verifier_layers": plan["verifier"],
              "verifier_layers_of": full_layers, "dtype": str(dtype).replace("torch.", ""),
              "prompt_tokens": prompt_tokens, "max_tokens": tokens}
    tiers = {"drafter": engine.drafter, "slim": engine.slim, "full": engine.full}
    record["compiled"] = {name: runner.stack.compiled is not None for name, runner in tiers.items()}
    record["costs"] = call_costs(engine, prompts[0], device)
    phase("costs")
    log(f"  costs: draft token {record['costs']['draft_token_s'] * 1e3:.2f} ms, ar step "
        f"{record['costs']['ar_step_s'] * 1e3:.2f} ms (ratio {record['costs']['drafter_over_verifier']:.2f}), "
        f"full call K={BLOCK} {record['costs']['full_call_s'][BLOCK] * 1e3:.2f} ms")
    extra = {k: f"{record['costs'][k] * 1e3:.2f} ms" for k in (
        "draft_token_graph_s", "ar_step_graph_s", "draft_token_sync_inputs_s", "draft_call_s",
        "draft_call_sync_inputs_s") if k in record["costs"]}
    log(f"  {extra}")
    if profile:
        profile_draft_tokens(engine, prompts[0], profile)
    record["transfers_per_call"] = transfers_of_a_call(engine, prompts[0])
    phase("transfers")
    record.update(generation_runs(engine, prompts, tokens))
    phase("runs")
    for key, run in record["modes"].items():
        log(f"  {key:12s} {run['tokens_per_s']:8.1f} tok/s  acceptance {run['acceptance']}")
    log(f"  batch 8: {record['batch8_tokens_per_s']}; greedy sd == ar: {record['greedy_sd_equals_ar']} "
        f"(first {record['greedy_sd_matching_prefix']} tokens equal)")
    if device.startswith("cuda"):
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        import psutil

        record["peak_memory_bytes"] = psutil.Process().memory_info().rss
    log(f"  peak memory {record['peak_memory_bytes'] / 2**30:.2f} GiB")
    record["seconds_by_phase"] = phases
    del engine, verifier, drafter
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def profile_draft_tokens(engine: LocalEngine, context: list[int], path: str, tokens: int = 8) -> None:
    """torch.profiler's table (by self CPU time) of ``tokens`` one-token drafter passes, written to ``path``:
    kernel launches and graph replays per pass, and where the host's time goes."""
    stack = engine.drafter.stack
    cache = prefilled(stack, context)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if stack.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for token in context[:tokens]:
            stack([token], cache, 1)
        if stack.device.type == "cuda":
            torch.cuda.synchronize(stack.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(path, "a") as f:
        f.write(f"== {tokens} one-token drafter passes ({'compiled' if stack.compiled else 'eager'})\n{table}\n")
    log(f"  profile of {tokens} drafter passes appended to {path}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_gpu_check(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu-check: --device cuda, but no GPU is visible here (CUDA_VISIBLE_DEVICES, drivers)")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("via_sd_ray").setLevel(logging.INFO)  # the tiers' compile warm-up times
    started = time.perf_counter()
    record = {"schema": SCHEMA, "device": device, "torch": torch.__version__, "host": platform.node(),
              "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None, "pairs": [],
              "complete": False}
    runs = [(p, None) for p in PAIRS[args.shapes]]
    if device.startswith("cuda") and args.shapes == "real":  # the exactness check first
        runs.insert(0, (EXACT_PAIR, torch.float32))
    if args.pairs:  # in the order given
        by_name = {"exact" if p == EXACT_PAIR else p[1].rsplit("-", 1)[-1]: (p, d) for p, d in runs}
        unknown = [n for n in args.pairs.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"gpu-check: --pairs expects a comma list of {sorted(by_name)}, received {args.pairs!r}")
        runs = [by_name[n] for n in args.pairs.split(",")]
    if any(p == EXACT_PAIR for p, _ in runs):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for pair, dtype in runs:
        exactness = pair == EXACT_PAIR  # its verifier as --compile says: the compiled pass is what it checks
        own = (None, None, None) if exactness else (args.layers, args.verifier_compile, args.profile)
        record["pairs"].append(check_pair(pair, device, own[0], args.max_tokens, args.prompt_tokens, args.compile,
                                          own[1], dtype, own[2]))
        record["seconds"] = time.perf_counter() - started
        write(record, args.json_out)  # a pair at a time: a run cut short keeps what it measured
    record["complete"] = True
    record["ok"] = all(all(t == {"transfers": 1, "deviceless": []} for t in p["transfers_per_call"].values())
                       and (p["greedy_sd_equals_ar"] or not exact(p, device)) for p in record["pairs"])
    log(f"gpu-check {'passed' if record['ok'] else 'FAILED'} in {record['seconds']:.0f} s")
    text = write(record, args.json_out)
    print(text)
    return record


def exact(pair: dict, device: str) -> bool:
    """Whether greedy ``sd`` must equal ``ar`` bit for bit: float32 with TF32 off, or any CPU run (whose passes
    compute each row alike however many rows a pass has); bf16 GPU GEMMs sum rows in a shape-dependent order."""
    return pair["dtype"] == "float32" or not device.startswith("cuda")


def write(record: dict, path: str | None) -> str:
    text = json.dumps(record, indent=2, default=str)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text
