#!/usr/bin/env python3
"""PyTorch fp32 peer of bench/bench_backbone.cpp: the same GPT-2 / GPT-2* forward on the CPU.

Written like Hugging Face's GPT-2 (Linear projections, explicit causal mask and softmax; ALiBi
added to the scores for GPT-2*), run under torch.inference_mode with the given thread count.
Prints one JSON object per shape: median milliseconds per forward and tokens/s.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, d, H, parallel):
        super().__init__()
        self.H, self.parallel = H, parallel
        self.ln_1 = torch.nn.LayerNorm(d, eps=1e-6 if parallel else 1e-5)
        self.ln_2 = None if parallel else torch.nn.LayerNorm(d, eps=1e-5)
        bias = not parallel
        self.q = torch.nn.Linear(d, d, bias=bias)
        self.k = torch.nn.Linear(d, d, bias=bias)
        self.v = torch.nn.Linear(d, d, bias=bias)
        self.o = torch.nn.Linear(d, d, bias=bias)
        self.fc_in = torch.nn.Linear(d, 4 * d)
        self.fc_out = torch.nn.Linear(4 * d, d)

    def attn(self, x, bias):
        T, d = x.shape
        H, dh = self.H, d // self.H
        q = self.q(x).view(T, H, dh).transpose(0, 1)
        k = self.k(x).view(T, H, dh).transpose(0, 1)
        v = self.v(x).view(T, H, dh).transpose(0, 1)
        s = q @ k.transpose(1, 2) / math.sqrt(dh) + bias
        return self.o((s.softmax(-1) @ v).transpose(0, 1).reshape(T, d))

    def mlp(self, x):
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))

    def forward(self, h, bias):
        if self.parallel:
            a = self.ln_1(h)
            return h + self.attn(a, bias) + self.mlp(a)
        h = h + self.attn(self.ln_1(h), bias)
        return h + self.mlp(self.ln_2(h))


def bias_for(T, H, parallel):
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).float()
    mask = torch.where(dist >= 0, 0.0, float("-inf"))
    if not parallel:
        return mask
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    return mask - slopes[:, None, None] * dist.clamp(min=0)


def run(T, d, L, V, parallel, repeats):
    torch.manual_seed(0)
    H = d // 64
    wte = torch.randn(V, d) * 0.02
    wpe = torch.randn(T, d) * 0.02
    blocks = torch.nn.ModuleList([Block(d, H, parallel) for _ in range(L)]).eval()
    ln_f = torch.nn.LayerNorm(d).eval()
    tokens = (torch.arange(T) * 7919 + 13) % V
    bias = bias_for(T, H, parallel)

    def forward():
        h = wte[tokens] + (0 if parallel else wpe)
        for b in blocks:
            h = b(h, bias)
        return ln_f(h) @ wte.t()

    with torch.inference_mode():
        for _ in range(2):
            forward()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"T": T, "d": d, "L": L, "V": V, "block": "gpt2-star" if parallel else "gpt2", "ms": ms,
            "tokens_per_s": T / (ms / 1e3), "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for shape in [(1024, 256, 4, 256, False), (1024, 256, 4, 256, True), (1024, 256, 4, 50257, False),
                  (256, 256, 4, 256, False)]:
        print(json.dumps(run(*shape, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
