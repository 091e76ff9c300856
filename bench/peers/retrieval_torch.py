#!/usr/bin/env python3
"""PyTorch GPU peer of bench/bench_retrieval_gpu.cu: exact top-k chunk retrieval as a skilled
PyTorch user writes it, scores with one batched matmul over heads, then topk.

    scores = torch.bmm(q, chunk_keys.transpose(1, 2))   # (H, T, n), written to device memory
    best, idx = scores.topk(k, dim=-1)                  # (H, T, k), sorted best first
    [--gather] keys[h, idx], values[h, idx]             # (H, T, k, csz, dh) token keys and values

Shapes (as the C++ benchmark): 16 heads, dh 64, csz 4, k = 16 chunks; 65,536-token memory with
1,024 queries, 1 Mi tokens with 1,024, 4 Mi tokens with 256. dtypes fp32 (TF32 off: exact fp32
products, like the C++ kernel) and fp16 (tensor cores; the reference implementation's memory dtype).
Timing: torch.cuda.Event around each call, warm-up first, median of --repeats; chunk keys and
queries rotate over copies totalling more than three times the L2 when one copy is smaller.
Prints one JSON object per (shape, dtype): ms (median of the whole call), ms_min, and the median
split into matmul_ms and topk_ms (timed separately, so the sum can differ slightly from ms).
"""
import argparse
import json
import statistics

import torch


def timed(fn, repeats, rotate):
    """Median and minimum milliseconds of fn(i) over `repeats` calls, i rotating over `rotate` copies."""
    fn(0)
    torch.cuda.synchronize()
    times = []
    for r in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % rotate)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "fp16"])
    ap.add_argument("--shapes", nargs="*", default=["65536:1024", "1048576:1024", "4194304:256"],
                    help="memory_tokens:queries")
    ap.add_argument("--gather", action="store_true", help="also gather the chosen chunks' token keys and values")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("retrieval_torch.py: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    H, dh, csz, k = 16, 64, 4, 16
    gen = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes:
        memory, T = (int(x) for x in shape.split(":"))
        n = memory // csz
        for name in args.dtypes:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
            per_copy = (H * n * dh + H * T * dh) * 4
            rotate = max(1, min(8, int(3 * l2 / per_copy) + 1))
            u = lambda *s: (torch.rand(*s, device=dev, generator=gen) * 2 - 1).to(dtype)
            chunk_keys = [u(H, n, dh) for _ in range(rotate)]  # (H, n, dh)
            queries = [u(H, T, dh) for _ in range(rotate)]     # (H, T, dh)
            if args.gather:
                # Token keys/values (H, n, csz, dh) in the bank's storage dtype; outputs as float.
                bank_k = u(H, n, csz, dh)
                bank_v = u(H, n, csz, dh)
                heads = torch.arange(H, device=dev)[:, None, None]

            def call(i):
                scores = torch.bmm(queries[i], chunk_keys[i].transpose(1, 2))
                best, idx = scores.topk(k, dim=-1)
                if args.gather:
                    bank_k[heads, idx].float()
                    bank_v[heads, idx].float()
                return best, idx

            with torch.inference_mode():
                ms, ms_min = timed(call, args.repeats, rotate)
                mm_ms, _ = timed(lambda i: torch.bmm(queries[i], chunk_keys[i].transpose(1, 2)), args.repeats, rotate)
                scores = torch.bmm(queries[0], chunk_keys[0].transpose(1, 2))
                topk_ms, _ = timed(lambda i: scores.topk(k, dim=-1), args.repeats, 1)
                del scores
            flops = 2.0 * T * H * n * dh
            print(json.dumps({"peer": "torch", "torch": torch.__version__, "device": props.name,
                              "op": "bmm+topk" + ("+gather" if args.gather else ""), "dtype": name,
                              "memory_tokens": memory, "T": T, "H": H, "dh": dh, "csz": csz, "k": k,
                              "chunks": n, "rotation": rotate, "ms": round(ms, 4), "ms_min": round(ms_min, 4),
                              "matmul_ms": round(mm_ms, 4), "topk_ms": round(topk_ms, 4),
                              "TFLOP/s": round(flops / (ms * 1e-3) * 1e-12, 2)}), flush=True)
            del chunk_keys, queries
            if args.gather:
                del bank_k, bank_v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
