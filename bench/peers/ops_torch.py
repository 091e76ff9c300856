#!/usr/bin/env python3
"""PyTorch fp32 CPU peer of bench/bench_ops.cpp: each op of a GPT-2 block alone, at the same
shapes, as users write them (F.linear, F.layer_norm, F.gelu(tanh), SDPA with is_causal or the
ALiBi bias as an additive mask), under torch.inference_mode. One JSON object per op and shape:
median microseconds per call.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed_us(fn, min_s=0.3):
    for _ in range(3):
        fn()
    per = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s / 5:
            fn()
            n += 1
        per.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per)


def alibi_mask(T, H):
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).float()
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    return torch.where(dist >= 0, 0.0, float("-inf")) - slopes[:, None, None] * dist.clamp(min=0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = lambda **kw: print(json.dumps({**kw, "torch": torch.__version__, "threads": args.threads}), flush=True)
    with torch.inference_mode():
        for N in (256, 1024):
            for d in (256, 512):
                for I, O in ((d, d), (d, 3 * d), (d, 4 * d), (4 * d, d)):
                    x, w, b = torch.rand(N, I), torch.rand(O, I), torch.rand(O)
                    out(op="linear", N=N, I=I, O=O, us=timed_us(lambda: F.linear(x, w, b)))
        for N, d in ((256, 256), (1024, 256), (1024, 512)):
            x, g, b = torch.rand(N, d), torch.rand(d), torch.rand(d)
            out(op="layer_norm", N=N, d=d, us=timed_us(lambda: F.layer_norm(x, (d,), g, b, 1e-5)))
        for N, C in ((256, 1024), (1024, 1024), (1024, 2048)):
            x = torch.rand(N, C)
            out(op="gelu", N=N, C=C, us=timed_us(lambda: F.gelu(x, approximate="tanh")))
        for N, d, alibi in ((256, 256, 0), (256, 256, 1), (1024, 256, 0), (1024, 256, 1), (1024, 512, 0)):
            H = d // 64
            # (N, H, 64) in memory, as the block computes them; SDPA takes (H, N, 64) views
            q, k, v = (torch.rand(N, H, 64).transpose(0, 1) for _ in range(3))
            mask = alibi_mask(N, H) if alibi else None
            fn = (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) if alibi else \
                (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            # the block then needs (N, H*64) rows for the out projection: include that copy
            out(op="causal_attention", N=N, d=d, alibi=alibi, us=timed_us(lambda: fn().transpose(0, 1).reshape(N, d)))


if __name__ == "__main__":
    main()
