#!/usr/bin/env python3
"""PyTorch fp32 CPU peer of bench/bench_memory_attention.cpp.

The same computation in two styles (--style):
  reference  the reference implementation's formulation: per head, local causal attention with
             ALiBi (explicit scores, mask and softmax), a separate softmax over the K retrieved
             keys of each query, and the per-head gate (1 - sigmoid(g)) * A + sigmoid(g) * M
  user       as a skilled user writes it: the local branch through
             F.scaled_dot_product_attention with the ALiBi bias as an additive mask, the memory
             branch as one batched matmul + softmax + matmul over (T*H) queries, the same gate
K = 0 is plain causal attention. Shapes: q, k, v (T, H, dh); mem_k, mem_v (T, H, K, dh); 16 heads, dh 64.
Prints one JSON object per shape: median wall milliseconds per call (ms), the fastest call
(ms_min) and the median CPU milliseconds of all threads (cpu_ms).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def alibi_bias(T, H):
    """(H, T, T): -slope_h * (t - s) for s <= t, -inf above the diagonal."""
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).float()
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    mask = torch.where(dist >= 0, 0.0, float("-inf"))
    return mask - slopes[:, None, None] * dist.clamp(min=0)


def memory_attention(q, k, v, mem_k, mem_v, gate, bias):
    T, H, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, dh)
    scores = qh @ kh.transpose(1, 2) * scale + bias                        # (H, T, T)
    A = (scores.softmax(-1) @ vh).transpose(0, 1)                          # (T, H, dh)
    if mem_k.shape[2] == 0:
        return A
    r = (q.unsqueeze(2) @ mem_k.transpose(2, 3)) * scale                   # (T, H, 1, K)
    M = (r.softmax(-1) @ mem_v).squeeze(2)                                 # (T, H, dh)
    g = torch.sigmoid(gate)[None, :, None]                                 # (1, H, 1)
    return (1 - g) * A + g * M


def memory_attention_user(q, k, v, mem_k, mem_v, gate, bias):
    T, H, dh = q.shape
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, dh)
    A = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias).transpose(0, 1)  # (T, H, dh)
    K = mem_k.shape[2]
    if K == 0:
        return A
    qm = q.reshape(T * H, 1, dh)
    p = torch.softmax(torch.bmm(qm, mem_k.reshape(T * H, K, dh).transpose(1, 2)) / math.sqrt(dh), -1)
    M = torch.bmm(p, mem_v.reshape(T * H, K, dh)).view(T, H, dh)
    g = torch.sigmoid(gate)[None, :, None]
    return torch.lerp(A, M, g.expand_as(A))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--T", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--K", type=int, nargs="*", default=[0, 16, 64])
    ap.add_argument("--style", choices=["reference", "user"], default="reference")
    args = ap.parse_args()
    fn = memory_attention if args.style == "reference" else memory_attention_user
    torch.set_num_threads(args.threads)
    H, dh = 16, 64
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for T in args.T:
            bias = alibi_bias(T, H)
            for K in args.K:
                u = lambda *s, scale=1.0: (torch.rand(*s, generator=gen) * 2 - 1) * scale
                q, k, v = u(T, H, dh, scale=3.0), u(T, H, dh), u(T, H, dh)
                mem_k, mem_v, gate = u(T, H, K, dh), u(T, H, K, dh), u(H)
                for _ in range(2):  # warm-up
                    fn(q, k, v, mem_k, mem_v, gate, bias)
                times, cpu = [], []
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(q, k, v, mem_k, mem_v, gate, bias)
                    times.append((time.perf_counter() - t0) * 1e3)
                    cpu.append((time.process_time() - c0) * 1e3)
                # ms: wall time; cpu_ms: CPU time of all threads, which other jobs on the machine inflate less
                print(json.dumps({"peer": "torch", "style": args.style, "torch": torch.__version__, "threads": args.threads, "T": T,
                                  "H": H, "dh": dh, "K": K, "ms": round(statistics.median(times), 3),
                                  "ms_min": round(min(times), 3), "cpu_ms": round(statistics.median(cpu), 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
