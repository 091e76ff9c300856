#!/usr/bin/env python3
"""PyTorch fp32 CPU peer of the C++ LongMem training benchmark: one training step, timed.

Written the way a PyTorch user would write it today: fused q/k/v nn.Linear, batched (B, T, ...)
tensors, F.scaled_dot_product_attention with the ALiBi + causal bias as a float attn_mask (explicit
softmax attention where SDPA does not exist, torch < 2.0, or with --no-sdpa), the memory bank as
preallocated ring-buffer tensors (one row per stream, all streams advancing together), retrieval by
torch.matmul + torch.topk, torch.optim.AdamW (fused where available, else foreach) and
zero_grad(set_to_none=True). --compile wraps the model forwards in torch.compile.

--mode adapt: memory-augmented adaptation (DESIGN.md 2, 2b). Frozen GPT-2* backbone under no_grad,
trainable SideNet of L/2 parallel layers with cross-network residuals, its layer m//2
memory-augmented (top K/csz chunks per head and query, gated two-softmax fusion), tied frozen output
head; after the update each stream appends the segment's backbone layer-m keys/values to its bank.
Before timing, the banks are filled to capacity by backbone forwards over random segments.
--mode full: the GPT-2* backbone trained from scratch as a language model (tied embedding).

Tokens are uniform random ids (seeded); each stream is one continuous sequence, so next-token
targets run across segment boundaries. Prints one JSON line. --check: 30 adapt steps at a tiny
shape on a learnable token stream, printing the loss (and SDPA vs explicit attention agreement).

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.11.0 numpy
    .venv-bench/bin/python bench/peers/train_torch.py --mode adapt --threads 2   # or --mode full, --check
Debian's python3-torch 1.13 (no SDPA, no torch.compile, no MKL) calls the system BLAS: with
OpenBLAS's pthread build its own thread pool competes with torch's OpenMP threads, so also measure
with OPENBLAS_NUM_THREADS=1 (steadier and faster on the 2-core dev machine); reference BLAS
(libblas3 alone) makes it ~5x slower still.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def alibi_causal_bias(T, H):
    """(1, H, T, T) float mask: -slope_h * (t - s) for s <= t, -inf above the diagonal."""
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).float()
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    causal = torch.zeros(T, T).masked_fill(dist < 0, float("-inf"))
    return (causal - slopes[:, None, None] * dist.clamp(min=0)).unsqueeze(0)


def attention(q, k, v, bias, use_sdpa):
    """q, k, v (B, H, T, dh); bias (1, H, T, T) added to the scaled scores."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    s = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1])) + bias
    return s.softmax(-1) @ v


def split_heads(qkv, H):
    """(B, T, 3d) -> three (B, H, T, dh) views."""
    B, T, d3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, H, d3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(x):
    B, H, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * dh)


# ----------------------------------------------------------------------------------------------
# Backbone: GPT-2* (parallel blocks, ALiBi, no bias on q/k/v/out, LayerNorm eps 1e-6, tanh GELU)
# ----------------------------------------------------------------------------------------------
class Gpt2StarBlock(nn.Module):
    def __init__(self, d, H):
        super().__init__()
        self.H = H
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.fc_in = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, h, bias, use_sdpa):
        a = self.ln_1(h)
        q, k, v = split_heads(self.qkv(a), self.H)
        att = self.out_proj(merge_heads(attention(q, k, v, bias, use_sdpa)))
        return h + att + self.fc_out(F.gelu(self.fc_in(a), approximate="tanh")), k, v


class Gpt2Star(nn.Module):
    def __init__(self, L, d, H, V, memory_layer, use_sdpa):
        super().__init__()
        self.H, self.memory_layer, self.use_sdpa = H, memory_layer, use_sdpa
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([Gpt2StarBlock(d, H) for _ in range(L)])
        self.ln_f = nn.LayerNorm(d, eps=1e-6)
        for name, p in self.named_parameters():  # GPT-2 initialisation
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def hidden_states(self, tokens, bias):
        """Adaptation: B[0..L] (B[L] after ln_f) and layer-m keys/values (B, H, T, dh)."""
        h = self.wte(tokens)
        states, mem_k, mem_v = [h], None, None
        for j, blk in enumerate(self.blocks):
            h, k, v = blk(h, bias, self.use_sdpa)
            if j == self.memory_layer:
                mem_k, mem_v = k, v
            states.append(h)
        states[-1] = self.ln_f(h)
        return states, mem_k, mem_v

    def forward(self, tokens, bias):
        """Language-model logits (tied output head)."""
        h = self.wte(tokens)
        for blk in self.blocks:
            h = blk(h, bias, self.use_sdpa)[0]
        return F.linear(self.ln_f(h), self.wte.weight)


# ----------------------------------------------------------------------------------------------
# Memory bank: per stream, ring buffers of chunk keys and of the chunks' token keys/values
# ----------------------------------------------------------------------------------------------
from torch_bank import MemoryBank  # noqa: E402  (beside this script)


@torch.no_grad()
def retrieve(q, chunk_keys, keys, values, k_chunks, csz):
    """q (B, H, T, dh) unscaled; bank tensors (B, H, C, ...). Returns Kr, Vr (B, H, T, K, dh)."""
    B, H, T, dh = q.shape
    C = chunk_keys.shape[2]
    scores = torch.matmul(q, chunk_keys.transpose(-2, -1))             # (B, H, T, C)
    idx = scores.topk(min(k_chunks, C), dim=-1, sorted=False).indices  # (B, H, T, kc)
    flat = (idx + (torch.arange(B * H, device=q.device) * C).view(B, H, 1, 1)).reshape(-1)
    Kr = keys.reshape(B * H * C, -1).index_select(0, flat).view(B, H, T, -1, dh)
    Vr = values.reshape(B * H * C, -1).index_select(0, flat).view(B, H, T, -1, dh)
    return Kr, Vr


# ----------------------------------------------------------------------------------------------
# SideNet: parallel layers (LayerNorm eps 1e-5, q/k/v/out bias-free, fc1/fc2 with bias, erf GELU)
# ----------------------------------------------------------------------------------------------
class SideLayer(nn.Module):
    def __init__(self, d, H, memory):
        super().__init__()
        self.H = H
        self.ln = nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.gate = nn.Parameter(torch.zeros(H)) if memory else None

    def forward(self, x, res, bias, use_sdpa, mem=None, k_chunks=0, csz=1):
        h = self.ln(x)
        q, k, v = split_heads(self.qkv(h), self.H)
        a = attention(q, k, v, bias, use_sdpa)                           # (B, H, T, dh)
        if mem is not None and mem[0].shape[2] > 0:
            Kr, Vr = retrieve(q.detach(), *mem, k_chunks, csz)           # constants
            dh = q.shape[-1]
            # Memory branch as explicit matmuls + softmax: SDPA here (batch B*H, "heads" T, query
            # length 1) measured ~20% slower per step on torch 2.11 CPU, its backward zero-filling
            # gradients for the constant Kr, Vr.
            s = (q.unsqueeze(-2) @ Kr.transpose(-2, -1)) * (1.0 / math.sqrt(dh))  # (B, H, T, 1, K)
            m = (s.softmax(-1) @ Vr).squeeze(-2)                                    # (B, H, T, dh)
            g = torch.sigmoid(self.gate).view(1, -1, 1, 1)
            a = (1 - g) * a + g * m
        return x + res + self.out_proj(merge_heads(a)) + self.fc2(F.gelu(self.fc1(h)))


class SideNet(nn.Module):
    def __init__(self, backbone, d, H, memory_layer, use_sdpa, r=2):
        super().__init__()
        L = len(backbone.blocks)
        self.r, self.mem_index, self.use_sdpa = r, memory_layer // r, use_sdpa
        self.layers = nn.ModuleList([SideLayer(d, H, i == self.mem_index) for i in range(L // r)])
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        with torch.no_grad():  # layer i copies backbone block r*i+1, ln_f copies the backbone's
            for i, lay in enumerate(self.layers):
                blk = backbone.blocks[r * i + 1]
                for dst, src in ((lay.ln, blk.ln_1), (lay.qkv, blk.qkv), (lay.out_proj, blk.out_proj),
                                 (lay.fc1, blk.fc_in), (lay.fc2, blk.fc_out)):
                    dst.load_state_dict(src.state_dict())
            self.ln_f.load_state_dict(backbone.ln_f.state_dict())

    def forward(self, states, wte, bias, mem, k_chunks, csz):
        x = states[0]
        for i, lay in enumerate(self.layers):
            res = states[self.r * (i + 1)] - states[self.r * i]
            x = lay(x, res, bias, self.use_sdpa, mem if i == self.mem_index else None, k_chunks, csz)
        return F.linear(self.ln_f(x), wte)


# ----------------------------------------------------------------------------------------------
class TokenStreams:
    """B continuous token streams; next() gives (B, T+1): inputs [:, :-1], targets [:, 1:]."""

    def __init__(self, B, V, seed, perm=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.B, self.V, self.perm = B, V, perm
        self.last = torch.randint(V, (B, 1), generator=self.gen)

    def next(self, T):
        if self.perm is None:
            new = torch.randint(self.V, (self.B, T), generator=self.gen)
        else:  # learnable stream for --check: next = perm[prev], re-seeded at random 1 in 8 tokens
            cols, prev = [], self.last[:, 0]
            jump = torch.rand(self.B, T, generator=self.gen) < 0.125
            rnd = torch.randint(self.V, (self.B, T), generator=self.gen)
            for t in range(T):
                prev = torch.where(jump[:, t], rnd[:, t], self.perm[prev])
                cols.append(prev)
            new = torch.stack(cols, 1)
        seg = torch.cat([self.last, new], 1)
        self.last = new[:, -1:]
        return seg


def make_optimizer(params, lr):
    kw = dict(lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "fused"
    except (TypeError, RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw), "foreach"


def maybe_compile(fn, want):
    if not want:
        return fn, False, None
    if not hasattr(torch, "compile"):
        return fn, False, "torch.compile not available in torch %s" % torch.__version__
    try:
        return torch.compile(fn), True, None
    except Exception as e:  # noqa: BLE001 - report and fall back
        return fn, False, "%s: %s" % (type(e).__name__, e)


class Trainer:
    def __init__(self, a, lr, perm=None):
        torch.manual_seed(a.seed)
        self.a = a
        self.use_sdpa = HAS_SDPA and not a.no_sdpa
        H, d = a.heads, a.d
        assert d % H == 0 and a.retrieved_tokens % a.chunk_size == 0
        self.dev = torch.device(a.device)
        self.bias = alibi_causal_bias(a.T, H).to(self.dev)
        self.backbone = Gpt2Star(a.layers, d, H, a.vocab, a.memory_layer, self.use_sdpa).to(self.dev)
        self.streams = TokenStreams(a.batch, a.vocab, a.seed + 1, perm)
        self.compile_error = None
        if a.mode == "adapt":
            self.backbone.requires_grad_(False).eval()
            self.side = SideNet(self.backbone, d, H, a.memory_layer, self.use_sdpa).to(self.dev)
            self.bank = MemoryBank(a.batch, H, d // H, a.memory_tokens, a.chunk_size, device=self.dev)
            params = list(self.side.parameters())
            self.eager = (self.backbone.hidden_states, self.side)
        else:
            params = list(self.backbone.parameters())
            self.eager = (self.backbone, None)
        self.bb_fwd, self.side_fwd = self.eager
        if a.compile:
            fns = [maybe_compile(f, True) if f is not None else (None, True, None) for f in self.eager]
            self.compiled = all(c for _, c, _ in fns)
            self.compile_error = next((e for _, _, e in fns if e), None)
            if self.compiled:
                self.bb_fwd, self.side_fwd = fns[0][0], fns[1][0]
        else:
            self.compiled = False
        self.opt, self.opt_kind = make_optimizer(params, lr)
        self.n_params = sum(p.numel() for p in params)

    @torch.no_grad()
    def fill_memory(self):
        """Untimed: backbone forwards over the streams' next segments until every bank is full."""
        while self.bank.count < self.bank.C:
            tokens = self.streams.next(self.a.T)[:, :-1].to(self.dev)
            _, k, v = self.backbone.hidden_states(tokens, self.bias)
            self.bank.append(k, v)

    def step(self):
        """torch.compile compiles at the first call: if that fails, report it and run eagerly."""
        try:
            return self._step()
        except Exception as e:  # noqa: BLE001
            if not self.compiled:
                raise
            self.compiled, self.compile_error = False, "%s: %s" % (type(e).__name__, str(e)[:300])
            self.bb_fwd, self.side_fwd = self.eager
            return self._step()

    def _step(self):
        a = self.a
        seg = self.streams.next(a.T).to(self.dev)  # drawn on the CPU: the same tokens on every device
        tokens, targets = seg[:, :-1], seg[:, 1:]
        self.opt.zero_grad(set_to_none=True)
        if a.mode == "adapt":
            with torch.no_grad():
                states, k, v = self.bb_fwd(tokens, self.bias)
            logits = self.side_fwd(states, self.backbone.wte.weight, self.bias, self.bank.tensors(),
                                   a.retrieved_tokens // a.chunk_size, a.chunk_size)
        else:
            logits = self.bb_fwd(tokens, self.bias)
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), targets.reshape(-1))
        loss.backward()
        self.opt.step()
        if a.mode == "adapt":
            self.bank.append(k, v)  # after the SideNet: retrieval sees earlier segments only
        return loss.item()


def run_check(a):
    """Tiny adapt run on a learnable stream: the loss must go down."""
    for name, val in dict(layers=4, d=64, heads=4, vocab=32, T=32, batch=2, memory_tokens=256,
                          chunk_size=4, retrieved_tokens=16, memory_layer=2).items():
        setattr(a, name, val)
    a.mode = "adapt"
    perm = torch.randperm(a.vocab, generator=torch.Generator().manual_seed(a.seed + 7))
    lr = 2e-3
    tr = Trainer(a, lr, perm)
    losses = [tr.step() for _ in range(30)]
    for i, l in enumerate(losses):
        print("step %2d  loss %.4f  (bank held %d chunks per stream)" % (i, l, min(i * a.T // a.chunk_size,
                                                                                 tr.bank.C)), flush=True)
    gate = tr.side.layers[tr.side.mem_index].gate.detach()
    # SDPA vs explicit attention on the same weights, memory bank and segment
    diff = None
    if tr.use_sdpa:
        seg = tr.streams.next(a.T)[:, :-1]
        with torch.no_grad():
            states, _, _ = tr.backbone.hidden_states(seg, tr.bias)
            outs = []
            for flag in (True, False):
                tr.side.use_sdpa = flag
                outs.append(tr.side(states, tr.backbone.wte.weight, tr.bias, tr.bank.tensors(), 4, 4))
            tr.side.use_sdpa = True
            diff = (outs[0] - outs[1]).abs().max().item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    ok = last < first - 0.1
    print(json.dumps({"check": "ok" if ok else "FAILED", "lr": lr, "first5_mean_loss": round(first, 4),
                      "last5_mean_loss": round(last, 4), "ln_vocab": round(math.log(a.vocab), 4),
                      "gate_sigmoid": [round(x, 4) for x in torch.sigmoid(gate).tolist()],
                      "sdpa": tr.use_sdpa, "max_abs_logit_diff_sdpa_vs_explicit": diff,
                      "optimizer": tr.opt_kind, "torch": torch.__version__}), flush=True)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["adapt", "full"], default="adapt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--retrieved-tokens", type=int, default=64)
    p.add_argument("--memory-layer", type=int, default=None, help="backbone layer m (default L//2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the step on the GPU, fp32, no TF32)")
    p.add_argument("--no-sdpa", action="store_true", help="explicit softmax attention even where SDPA exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="30 tiny adapt steps; the loss must go down")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        sys.exit(run_check(a))
    if a.device != "cpu":  # fp32 as ours by default: no TF32 in matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if a.memory_layer is None:
        a.memory_layer = a.layers // 2
    assert 0 <= a.memory_layer < a.layers

    tr = Trainer(a, a.lr)
    if a.mode == "adapt":
        tr.fill_memory()
    for _ in range(a.warmup):
        tr.step()
    times, cpu = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = tr.step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    med = statistics.median(times)
    out = {"peer": "torch", "device": a.device, "mode": a.mode, "layers": a.layers, "d": a.d, "heads": a.heads, "vocab": a.vocab,
           "T": a.T, "batch": a.batch}
    if a.mode == "adapt":
        out.update(side_layers=len(tr.side.layers), memory_tokens=a.memory_tokens, chunk_size=a.chunk_size,
                   retrieved_tokens=a.retrieved_tokens, memory_layer=a.memory_layer,
                   memory_chunks_filled=tr.bank.count)
    out.update(warmup=a.warmup, steps=a.steps, threads=torch.get_num_threads(), torch=torch.__version__,
               mkl=torch.backends.mkl.is_available(), sdpa=tr.use_sdpa,
               attention=("sdpa" if tr.use_sdpa else "explicit softmax") + " with ALiBi+causal float mask"
               + (", memory branch explicit matmul+softmax" if a.mode == "adapt" else ""), compiled=tr.compiled,
               compile_error=tr.compile_error, optimizer=tr.opt_kind, trainable_params=tr.n_params,
               ms_median=round(med, 2), ms_min=round(min(times), 2), ms_max=round(max(times), 2),
               cpu_ms_median=round(statistics.median(cpu), 2),
               tokens_per_s=round(a.batch * a.T / (med / 1e3), 1), final_loss=round(loss, 4), seed=a.seed)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
