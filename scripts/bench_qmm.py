"""Time one linear layer of the 1.5B verifier's shapes three ways, at the row counts SD passes have.

    python scripts/bench_qmm.py [--threads 2]

Per shape (gate/up 1536 -> 8960, down 8960 -> 1536, the LM head 1536 -> 151936) and rows M (1: a decode step,
5 and 13: verify blocks, 32: a batch): milliseconds per call (best of 5 rounds) of our grouped kernel
(`via_sd::qmm`, 4-bit codes in groups of 32, or 6-bit Q6_K codes in groups of 16 for the down projection
and the head; `qmm_int8` the same with activations rounded to int8, where AVX512-VNNI or AVX2 runs it), torch's own
CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, groups of 32) and a bf16 `F.linear` (oneDNN), bf16
activations. Random weights: timing only. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from via_sd_ray.models import qmm

SHAPES = {"gate_up": (8960, 1536, 4, 32), "down": (1536, 8960, 6, 16), "lm_head": (151936, 1536, 6, 16)}


def best_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qmm.require()
    int8 = qmm.int8_available() is None
    out = {"threads": args.threads, "isa": qmm.isa(torch.bfloat16), "int8": int8, "ms": {}}
    for name, (rows, inputs, bits, group) in SHAPES.items():
        codes = torch.randint(0, 16 if bits == 4 else 64, (rows, inputs), dtype=torch.uint8)
        scale, low = torch.rand(rows, inputs // group) * 0.01, -torch.rand(rows, inputs // group) * 0.05
        packed = qmm.pack(codes, scale, low, bits, group)
        weight = torch.randn(rows, inputs, dtype=torch.bfloat16)
        int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes & 15).to(torch.int32), 8)
        scales_zeros = torch.randn(inputs // 32, rows, 2, dtype=torch.bfloat16)
        calls = 4 if name == "lm_head" else 40
        for m in (1, 5, 13, 32):
            x = torch.randn(m, inputs, dtype=torch.bfloat16)
            timed = {
                "qmm": best_ms(lambda: qmm.matmul(x, *packed, rows, bits, group), calls),
                **({"qmm_int8": best_ms(lambda: qmm.matmul(x, *packed, rows, bits, group, int8=True), calls)}
                   if int8 else {}),
                "torch_int4": best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 32, scales_zeros),
                                      calls),
                "bf16": best_ms(lambda: F.linear(x, weight), calls),
            }
            out["ms"][f"{name}@M={m}"] = {k: round(v, 3) for k, v in timed.items()}
            print(f"{name:8s} M={m:2d}  " + "  ".join(f"{k} {v:7.3f}" for k, v in timed.items()), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
