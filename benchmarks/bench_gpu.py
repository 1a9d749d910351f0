"""GPU rows of issue 14, as one script: the compiled (Triton) kernels on CUDA against the GPU's
measured memory bandwidth and compute peaks.

Rows: a GPT-2-small layer (d 768, 12 heads) at n = 4096 and an 8B-shaped layer (d 4096, 32 heads,
8 kv heads) at n = 2048 and 4096; `block_contributions` with heads on and off, compiled and eager
(eager only where it fits). Peaks measured in the same run: device-to-device copy bandwidth, fp32
matmul FLOP/s, and a compiled elementwise `Σ|y − w·v|` loop (the per-element work floor of the
L1 kernels). elements = H · causal pairs · d.

Usage (one command, ~3-5 minutes on an H100/H200 including compilation):
    python benchmarks/bench_gpu.py --json gpu.json
`--device cpu --tiny` runs the same code paths on small shapes (for testing without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from lens_alti.alti.contributions import block_contributions  # noqa: E402
from lens_alti.alti.decompose import decompose  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peaks(device: torch.device, tiny: bool) -> dict[str, float]:
    n = 2**20 if tiny else 2**28  # 1 GiB of fp32
    x = torch.empty(n, device=device).uniform_()
    bw = 2 * x.numel() * 4 / best_time(lambda: x.clone(), device, 5)
    m = 256 if tiny else 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    flops = 2 * m**3 / best_time(lambda: a @ b, device, 5)
    d, rows = 768, (64 if tiny else 2**16)
    y, v = torch.randn(rows, 1, d, device=device), torch.randn(1, 256, d, device=device)

    @torch.compile(dynamic=False)
    def floor(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (y - 0.5 * v).abs().sum(-1)

    floor_rate = rows * 256 * d / best_time(lambda: floor(y, v), device, 5)
    return {"copy_bytes_per_s": bw, "matmul_flops": flops, "l1_floor_elements_per_s": floor_rate}


def main(argv: list[str] | None = None) -> int:
    from bench_alti import LayerShape, causal_elements, make_layer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes, for a run without a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"lens_alti GPU rows: torch {torch.__version__}, {name}")
    pk = peaks(device, args.tiny)
    print(
        f"measured peaks: copy {pk['copy_bytes_per_s'] / 1e9:.0f} GB/s, fp32 matmul {pk['matmul_flops'] / 1e12:.1f} "
        f"TFLOP/s, compiled L1 floor {pk['l1_floor_elements_per_s']:.2e} elements/s"
    )
    gpt2 = LayerShape("gpt2-small", 768, 12, 64)
    eight_b = LayerShape("8B (32 h, 8 kv)", 4096, 32, 128)  # kv heads change hook_v only: VO is per query head
    cases = [(gpt2, 4096), (eight_b, 2048), (eight_b, 4096)]
    if args.tiny:
        cases = [(LayerShape("tiny", 64, 4, 16), 64), (LayerShape("tiny8", 128, 8, 16), 96)]
    rows = []
    for shape, n in cases:
        layer = make_layer(shape, n, device)
        tv = decompose(layer.block)
        elements = causal_elements(shape, n)
        for heads in (True, False):
            for backend in ("compiled", "eager"):
                if backend == "eager" and heads and n > 2048 and not args.tiny:
                    continue  # [h, rows, keys, d] temporaries: slow and memory-bound, not the GPU path

                def run(b: str = backend, hd: bool = heads, tv: Any = tv) -> Any:
                    return block_contributions(tv, "l1", heads=hd, backend=b)

                t0 = time.perf_counter()
                run()
                sync(device)
                first = time.perf_counter() - t0
                t = best_time(run, device, args.repeats)
                rate = elements / t
                rec = {
                    "layer": shape.name, "n": n, "heads": heads, "backend": backend, "s": t, "first_s": first,
                    "elements_per_s": rate, "vs_l1_floor": rate / pk["l1_floor_elements_per_s"],
                    "vs_matmul_flops": 3 * rate / pk["matmul_flops"],
                }  # fmt: skip
                rows.append(rec)
                print(
                    f"{shape.name:<16} n={n:>5} heads {'on ' if heads else 'off'} {backend:<8} {t:8.4f} s "
                    f"(1st {first:6.2f} s) {rate:.2e} el/s = {rec['vs_l1_floor']:.2f} of the L1 floor, "
                    f"{rec['vs_matmul_flops']:.2f} of matmul FLOP/s (3 ops/element)",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peaks": pk, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
