"""Time this tree's qmm kernel against another version of its source, side by side in one process.

    git show HEAD~1:via_sd_ray/models/csrc/qmm.cpp > /tmp/before.cpp
    python scripts/bench_qmm_ab.py --against /tmp/before.cpp [--rows 1,5,11,128] [--rounds 7]

Both sources are built for this CPU (the other one under its own op namespace, so both load at once) and
run on the same random weights of the 1.5B verifier's shapes, with the GGUF K-quant scales its checkpoint
has (gate/up 1536 -> 2 x 8960 and q/k/v 1536 -> 2048 in Q4_K, down 8960 -> 1536 in Q4_K and Q6_K) and
int8 activations, at the row counts SD passes have. Rounds alternate the order of the two, and the best
call of each is kept: this machine's slow spells hit both alike. Prints per shape and rows the milliseconds
of each, their ratio, and whether the results are identical; then one JSON record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from via_sd_ray.models import qmm

SHAPES = {"gate_up_q4k": (17920, 1536, 4, 32), "qkv_q4k": (2048, 1536, 4, 32), "down_q4k": (1536, 8960, 4, 32),
          "down_q6k": (1536, 8960, 6, 16)}
NAMESPACE = "via_sd_against"


def load_against(path: Path):
    """The qmm op of the source at ``path``, built under NAMESPACE."""
    source = path.read_text()
    if "TORCH_LIBRARY(via_sd," not in source:
        raise SystemExit(f"--against {path}: expected a version of qmm.cpp (TORCH_LIBRARY(via_sd, ...) in it)")
    for old, new in (("TORCH_LIBRARY(via_sd,", f"TORCH_LIBRARY({NAMESPACE},"),
                     ("TORCH_LIBRARY_IMPL(via_sd,", f"TORCH_LIBRARY_IMPL({NAMESPACE},"),
                     ('"via_sd::', f'"{NAMESPACE}::')):
        source = source.replace(old, new)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    renamed = Path(tempfile.gettempdir()) / f"qmm_against_{digest}.cpp"
    renamed.write_text(source)
    qmm.compile_source(f"via_sd_qmm_against_{digest}", renamed)  # the flags this tree's kernel is built with
    return getattr(torch.ops, NAMESPACE).qmm


def kquant_weights(rows: int, inputs: int, bits: int, group: int, gen: torch.Generator):
    """Random codes with K-quant scales (as a GGUF Q4_K / Q6_K holds them), packed for the kernel."""
    codes = torch.randint(0, 2**bits, (rows, inputs), dtype=torch.uint8, generator=gen)
    a = torch.randint(0, 64 if bits == 4 else 127, (rows, inputs // group), generator=gen)
    b = (torch.randint(0, 64, (rows, inputs // group), generator=gen) if bits == 4
         else torch.zeros(rows, inputs // group, dtype=torch.long))
    d = (torch.rand(rows, inputs // 256, generator=gen) * 1e-3).half()
    dmin = (torch.rand(rows, inputs // 256, generator=gen) * 1e-3).half()
    scale = d.float().repeat_interleave(256 // group, 1) * a
    low = -dmin.float().repeat_interleave(256 // group, 1) * b
    return qmm.pack(codes, scale, low, bits, group, kquant=(a, b, d, dmin))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, type=Path, help="another version of via_sd_ray/models/csrc/qmm.cpp")
    parser.add_argument("--rows", default="1,5,11,128", help="comma-separated row counts (default: 1,5,11,128)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        raise SystemExit(f"--rows: expected comma-separated integers, received {args.rows!r}") from None
    if not args.against.is_file():
        raise SystemExit(f"--against: no such file {args.against}")
    torch.set_num_threads(args.threads)
    qmm.require()
    ops = {"this": torch.ops.via_sd.qmm, "against": load_against(args.against)}
    gen = torch.Generator().manual_seed(0)
    cases = []
    for name, (n, k, bits, group) in SHAPES.items():
        codes, meta = kquant_weights(n, k, bits, group, gen)
        for m in rows_list:
            x = torch.randn(m, k, generator=gen)
            cases.append((f"{name}@{m}", (x, codes, meta, n, bits, group, None, False, True)))
    best = {(key, which): float("inf") for key, _ in cases for which in ops}
    for r in range(args.rounds):
        for key, call in cases:
            calls = 3 if call[0].shape[0] > 32 else 10
            for which in (("this", "against") if r % 2 == 0 else ("against", "this")):
                op = ops[which]
                op(*call)
                start = time.perf_counter()
                for _ in range(calls):
                    op(*call)
                best[key, which] = min(best[key, which], (time.perf_counter() - start) / calls * 1e3)
    record = {"threads": args.threads, "isa": qmm.isa(torch.float32, int8=True), "against": str(args.against),
              "rounds": args.rounds, "ms": {}}
    for key, call in cases:
        identical = torch.equal(ops["this"](*call), ops["against"](*call))
        this, against = best[key, "this"], best[key, "against"]
        record["ms"][key] = {"this": round(this, 3), "against": round(against, 3), "ratio": round(this / against, 3),
                             "identical": identical}
        print(f"{key:16s} this {this:8.3f} ms  against {against:8.3f} ms  ratio {this / against:.3f}"
              f"  {'identical' if identical else 'DIFFERENT'}", flush=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
