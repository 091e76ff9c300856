#!/usr/bin/env python3
"""PyTorch fp32 peer of bench/bench_backbone.cpp: the same GPT-2 / GPT-2* forward on the CPU.

Three styles (--style), all under torch.inference_mode with the given thread count:
  sdpa      (default) as users write it today: one fused Linear for q/k/v,
            F.scaled_dot_product_attention with is_causal=True (GPT-2) or the causal ALiBi bias
            as an additive mask (GPT-2*)
  compile   the sdpa model through torch.compile (reported where it is faster)
  explicit  like Hugging Face's older GPT-2: separate projections, explicit mask and softmax
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
    def __init__(self, d, H, parallel, style):
        super().__init__()
        self.H, self.parallel, self.style = H, parallel, style
        self.ln_1 = torch.nn.LayerNorm(d, eps=1e-6 if parallel else 1e-5)
        self.ln_2 = None if parallel else torch.nn.LayerNorm(d, eps=1e-5)
        bias = not parallel
        if style == "explicit":
            self.q = torch.nn.Linear(d, d, bias=bias)
            self.k = torch.nn.Linear(d, d, bias=bias)
            self.v = torch.nn.Linear(d, d, bias=bias)
        else:
            self.qkv = torch.nn.Linear(d, 3 * d, bias=bias)
        self.o = torch.nn.Linear(d, d, bias=bias)
        self.fc_in = torch.nn.Linear(d, 4 * d)
        self.fc_out = torch.nn.Linear(4 * d, d)

    def attn(self, x, bias):
        T, d = x.shape
        H, dh = self.H, d // self.H
        if self.style != "explicit":
            q, k, v = self.qkv(x).view(T, 3, H, dh).permute(1, 2, 0, 3)  # 3 x (H, T, dh)
            if self.parallel:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(a.transpose(0, 1).reshape(T, d))
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


def run(T, d, L, V, parallel, repeats, style):
    torch.manual_seed(0)
    H = d // 64
    wte = torch.randn(V, d) * 0.02
    wpe = torch.randn(T, d) * 0.02
    blocks = torch.nn.ModuleList([Block(d, H, parallel, style) for _ in range(L)]).eval()
    ln_f = torch.nn.LayerNorm(d).eval()
    tokens = (torch.arange(T) * 7919 + 13) % V
    bias = bias_for(T, H, parallel)
    if style != "explicit" and not parallel:
        bias = None  # is_causal

    def forward():
        h = wte[tokens] + (0 if parallel else wpe)
        for b in blocks:
            h = b(h, bias)
        return ln_f(h) @ wte.t()

    if style == "compile":
        forward = torch.compile(forward)
    with torch.inference_mode():
        for _ in range(3 if style == "compile" else 2):
            forward()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"T": T, "d": d, "L": L, "V": V, "block": "gpt2-star" if parallel else "gpt2", "ms": ms,
            "tokens_per_s": T / (ms / 1e3), "style": style, "torch": torch.__version__, "threads": torch.get_num_threads()}


# (T, d, L, V, GPT-2* block): the same list as bench/bench_backbone.cpp
SHAPES = [(1024, 256, 4, 256, False), (1024, 256, 4, 256, True), (1024, 256, 4, 50257, False),
          (256, 256, 4, 256, False), (128, 256, 4, 256, False), (4096, 256, 4, 256, False),
          (1024, 512, 12, 256, False), (512, 1024, 24, 256, True)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--style", choices=["sdpa", "compile", "explicit"], default="sdpa")
    p.add_argument("--quick", action="store_true", help="only the first four shapes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:4] if args.quick else SHAPES
    for shape in shapes:
        print(json.dumps(run(*shape, max(3, args.repeats if shape[0] * shape[1] * shape[2] <= 1024 * 256 * 4 else args.repeats // 4),
                             args.style)), flush=True)


if __name__ == "__main__":
    main()
