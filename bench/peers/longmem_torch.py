#!/usr/bin/env python3
"""PyTorch peer of bench/bench_longmem.cpp (CPU, fp32) and bench/bench_longmem_gpu.cu (--device cuda, fp16 by
default there): the whole LongMem forward of one segment per stream.

Written the way a skilled PyTorch user would write it today (torch.inference_mode, batched (B, T, ...)
tensors through every op, all streams in one pass):
  backbone  GPT-2* (DESIGN.md 2): parallel blocks h + out_proj(attn(ln_1 h)) + fc_out(gelu_tanh(fc_in(ln_1 h))),
            one fused bias-free q/k/v nn.Linear, F.scaled_dot_product_attention with the causal ALiBi bias
            as an additive float attn_mask, LayerNorm eps 1e-6, all hidden states B[0..L] kept (B[L] after
            ln_f), the layer-m keys/values captured (the views of the fused projection)
  SideNet   L/2 parallel layers x + (B[2i+2] - B[2i]) + out_proj(attn(ln x)) + fc2(gelu_erf(fc1(ln x))),
            LayerNorm eps 1e-5, fused q/k/v as above; tied head ln_f(x) @ wte^T
  memory    layer m//2: retrieval per head = queries (B, H, T, dh) @ chunk keys (B, H, C, dh)^T (chunk key =
            mean of the chunk's csz token keys, queries unscaled), torch.topk (K/csz chunks, unsorted), the
            chunks' keys/values gathered with one index_select over (B*H*C) rows; memory branch
            softmax(q Kr^T / sqrt(dh)) Vr over the K retrieved tokens (no position term, explicit matmuls:
            train_torch.py measured that faster than SDPA for this query-length-1 shape); gated fusion
            lerp(A, M, sigmoid(g_h)) = (1 - sigmoid(g_h)) A + sigmoid(g_h) M
  banks     preallocated ring-buffer tensors (B, H, C, ...) per stream, filled before timing with the layer-m
            keys/values of 32 random 512-token segments through the same backbone (stream b gets them
            rotated by b, as the C++ benchmark does), read-only while timing
Shapes (defaults, the same as bench/bench_longmem.cpp): d 512, 8 heads (dh 64), 8 layers, vocabulary 256,
T 512, SideNet 4 layers, memory layer 4, 16384-token memory per stream, csz 4, K 64. Random weights
(N(0, 0.02) matrices), gates 0.5. Timed: one forward (backbone + SideNet + retrieval + memory attention,
logits (B, T, V)) of one fixed segment per stream, for streams 1 and 8 with the memory on and off (off: every
SideNet layer plain causal attention). Prints one JSON line per configuration: median wall ms over --repeats
(>= 10) timed calls after --warmup, ms_min, cpu_ms (CPU time of all threads), tokens/s, torch version,
threads; errors are a field ("error"), never a crash. --compile runs the forward through torch.compile.

On the GPU (--device cuda, --dtype float16 | bfloat16 | float32; default float16, what a user serves in): the
models, ALiBi mask, banks and tokens live on the device in that dtype (weights drawn there, N(0, 0.02)); each
call is timed with CUDA events (record, forward, record, synchronise), so ms is device time of the whole call
including any idle gaps; cpu_ms is then not reported; peak_mem_GB is torch.cuda.max_memory_allocated. The
issue's paper shape: --layers 24 --d 1024 --heads 16 --vocab 50257 --T 1024 --memory-layer 17
--memory-tokens 65536 (SideNet 12 layers, its layer 8 memory-augmented).

Correctness (--check DIR): DIR is written by `longmem_bench_longmem --export_check=DIR` (the C++ library:
a GPT-2* backbone d 128, 4 heads, 4 layers, V 256, T 64; a SideNet of 2 layers taken from a second random
backbone, so its weights differ from the backbone's, random gates in [-1, 2]; memory layer 2, 256-token
memory, csz 4, K 16; 2 streams of 6 segments). The peer loads the library's backbone.safetensors and
sidenet.safetensors (parsed by hand: 8-byte length, JSON header, raw little-endian data), streams the same
tokens through its own code above (the banks filled by its own backbone's layer-m keys/values, remember on:
segments 0-3 see 0-3 segments of memory, segment 4 a full bank, segment 5 a bank that has evicted
segment 0) and compares, as max |diff| / max |ref| <= 1e-4 per segment:
  - every segment's logits with the library's per-stream forward (logits_memory) and batched forward
    (logits_batched),
  - the last segment's logits with the memory off (logits_nomemory),
and reports the fraction of (stream, token, head) whose retrieved chunk set equals the library's
(retrieved_slots, the bank slots of the last segment; the rings fill slots in the same order).
With --compile, the check runs the compiled forward.

    .venv-bench/bin/python bench/peers/longmem_torch.py --threads 2                  # benchmark
    build/cpu/bench/longmem_bench_longmem --export_check=/tmp/lm && \\
      .venv-bench/bin/python bench/peers/longmem_torch.py --check /tmp/lm           # correctness
"""
import argparse
import json
import math
import statistics
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def alibi_causal_bias(T, H):
    """(H, T, T) float mask: -slope_h * (t - s) for s <= t, -inf above the diagonal."""
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).float()
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    causal = torch.zeros(T, T).masked_fill(dist < 0, float("-inf"))
    return causal - slopes[:, None, None] * dist.clamp(min=0)


def split_heads(qkv, H):
    """(B, T, 3d) -> three (B, H, T, dh) views."""
    B, T, d3 = qkv.shape
    return qkv.view(B, T, 3, H, d3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x):
    B, H, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * dh)


def gelu_kind(name):
    """approximate= argument of F.gelu for a file's activation_function."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh"):
        return "tanh"
    if name == "gelu":
        return "none"
    raise ValueError("activation_function %r not supported" % name)


# ----------------------------------------------------------------------------------------------
# Backbone: GPT-2*
# ----------------------------------------------------------------------------------------------
class Gpt2StarBlock(nn.Module):
    def __init__(self, d, H, n_inner, eps, gelu):
        super().__init__()
        self.H, self.gelu = H, gelu
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.fc_in = nn.Linear(d, n_inner)
        self.fc_out = nn.Linear(n_inner, d)

    def forward(self, h, bias):
        a = self.ln_1(h)
        q, k, v = split_heads(self.qkv(a), self.H)
        att = self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))
        return h + att + self.fc_out(F.gelu(self.fc_in(a), approximate=self.gelu)), k, v


class Gpt2Star(nn.Module):
    def __init__(self, L, d, H, V, n_inner=None, eps=1e-6, gelu="tanh"):
        super().__init__()
        n_inner = n_inner or 4 * d
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([Gpt2StarBlock(d, H, n_inner, eps, gelu) for _ in range(L)])
        self.ln_f = nn.LayerNorm(d, eps=eps)
        for p in self.parameters():  # GPT-2 initialisation of the matrices
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, bias, memory_layer):
        """tokens (B, T) -> hidden states B[0..L] (B[L] after ln_f), layer-m keys/values (B, H, T, dh)."""
        h = self.wte(tokens)
        states, mem_k, mem_v = [h], None, None
        for j, blk in enumerate(self.blocks):
            h, k, v = blk(h, bias)
            if j == memory_layer:
                mem_k, mem_v = k, v
            states.append(h)
        states[-1] = self.ln_f(h)
        return states, mem_k, mem_v


# ----------------------------------------------------------------------------------------------
# Memory bank: per stream, ring buffers of chunk keys and of the chunks' token keys/values
# ----------------------------------------------------------------------------------------------
from torch_bank import MemoryBank  # noqa: E402  (beside this script)


def retrieve(q, chunk_keys, keys, values, k_chunks):
    """q (B, H, T, dh) unscaled; bank tensors (B, H, C, ...). Returns Kr, Vr (B, H, T, K, dh) and the
    chunk indices (B, H, T, k')."""
    B, H, T, dh = q.shape
    C = chunk_keys.shape[2]
    scores = torch.matmul(q, chunk_keys.transpose(-2, -1))             # (B, H, T, C)
    idx = scores.topk(min(k_chunks, C), dim=-1, sorted=False).indices  # (B, H, T, k')
    flat = (idx + (torch.arange(B * H, device=q.device) * C).view(B, H, 1, 1)).reshape(-1)
    Kr = keys.reshape(B * H * C, -1).index_select(0, flat).view(B, H, T, -1, dh)
    Vr = values.reshape(B * H * C, -1).index_select(0, flat).view(B, H, T, -1, dh)
    return Kr, Vr, idx


# ----------------------------------------------------------------------------------------------
# SideNet
# ----------------------------------------------------------------------------------------------
class SideLayer(nn.Module):
    def __init__(self, d, H, n_inner, eps, gelu, memory):
        super().__init__()
        self.H, self.gelu = H, gelu
        self.ln = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, n_inner)
        self.fc2 = nn.Linear(n_inner, d)
        self.gate = nn.Parameter(torch.zeros(H)) if memory else None
        self.last_idx = None  # the retrieved chunk indices of the last call, when record is set
        self.record = False

    def forward(self, x, res, bias, mem=None, k_chunks=0):
        h = self.ln(x)
        q, k, v = split_heads(self.qkv(h), self.H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)     # (B, H, T, dh)
        if mem is not None and mem[0].shape[2] > 0:
            Kr, Vr, idx = retrieve(q, *mem, k_chunks)
            if self.record:
                self.last_idx = idx
            s = (q.unsqueeze(-2) @ Kr.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, 1, K)
            m = (s.softmax(-1) @ Vr).squeeze(-2)                                            # (B, H, T, dh)
            a = torch.lerp(a, m, torch.sigmoid(self.gate).view(1, -1, 1, 1))
        return x + res + self.out_proj(merge_heads(a)) + self.fc2(F.gelu(self.fc1(h), approximate=self.gelu))


class SideNet(nn.Module):
    def __init__(self, n_layer, d, H, memory_layer, r=2, n_inner=None, eps=1e-5, gelu="none"):
        super().__init__()
        n_inner = n_inner or 4 * d
        self.r, self.mem_index, self.memory_layer = r, memory_layer // r, memory_layer
        self.layers = nn.ModuleList([SideLayer(d, H, n_inner, eps, gelu, i == self.mem_index) for i in range(n_layer)])
        self.ln_f = nn.LayerNorm(d, eps=eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, states, wte, bias, mem, k_chunks):
        x = states[0]
        for i, lay in enumerate(self.layers):
            res = states[self.r * (i + 1)] - states[self.r * i]
            x = lay(x, res, bias, mem if i == self.mem_index else None, k_chunks)
        return F.linear(self.ln_f(x), wte)


def make_forward(backbone, side, bias, bank, k_chunks, memory):
    """The timed function: tokens (B, T) -> logits (B, T, V), reading the bank (not appending)."""
    def forward(tokens):
        states, _, _ = backbone(tokens, bias, side.memory_layer)
        return side(states, backbone.wte.weight, bias, bank.tensors() if memory else None, k_chunks)
    return forward


def maybe_compile(fn, want):
    if not want:
        return fn, None
    if not hasattr(torch, "compile"):
        return None, "torch.compile not available in torch %s" % torch.__version__
    try:
        return torch.compile(fn), None
    except Exception as e:  # noqa: BLE001
        return None, "%s: %s" % (type(e).__name__, str(e)[:300])


# ----------------------------------------------------------------------------------------------
# Weights written by the C++ library (safetensors, parsed by hand)
# ----------------------------------------------------------------------------------------------
DTYPES = {"F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64}


def load_safetensors(path):
    """{name: tensor}, metadata: 8-byte little-endian header length, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        dt = DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(data[s:e]), dtype=dt) if e > s else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"])
    return out, meta


def load_backbone(path):
    w, md = load_safetensors(path)
    assert md["architecture"] == "gpt2-star", "the peer implements GPT-2* backbones"
    L, d, H, V = int(md["n_layer"]), int(md["n_embd"]), int(md["n_head"]), int(md["vocab_size"])
    bb = Gpt2Star(L, d, H, V, int(md.get("n_inner", 4 * d)), float(md["layer_norm_epsilon"]),
                  gelu_kind(md.get("activation_function", "gelu_new")))
    with torch.no_grad():
        bb.wte.weight.copy_(w["wte.weight"])
        for j, blk in enumerate(bb.blocks):
            p = "h.%d." % j
            blk.ln_1.weight.copy_(w[p + "ln_1.weight"])
            blk.ln_1.bias.copy_(w[p + "ln_1.bias"])
            blk.qkv.weight.copy_(torch.cat([w[p + "attn.%s_proj.weight" % n] for n in "qkv"]))
            blk.out_proj.weight.copy_(w[p + "attn.out_proj.weight"])
            for dst, src in ((blk.fc_in, "mlp.fc_in"), (blk.fc_out, "mlp.fc_out")):
                dst.weight.copy_(w[p + src + ".weight"])
                dst.bias.copy_(w[p + src + ".bias"])
        bb.ln_f.weight.copy_(w["ln_f.weight"])
        bb.ln_f.bias.copy_(w["ln_f.bias"])
    return bb.eval(), md


def load_sidenet(path):
    w, md = load_safetensors(path)
    assert md["architecture"] == "longmem-sidenet"
    assert md.get("attn_bias", "false") == "false", "the peer's SideNet has bias-free q/k/v/out"
    assert md["position_embedding"] == "alibi"
    n, d, H = int(md["n_layer"]), int(md["n_embd"]), int(md["n_head"])
    side = SideNet(n, d, H, int(md["memory_layer"]), int(md["reduction_factor"]), int(md["n_inner"]),
                   float(md["layer_norm_epsilon"]), gelu_kind(md.get("activation_function", "gelu")))
    with torch.no_grad():
        for i, lay in enumerate(side.layers):
            p = "layers.%d." % i
            lay.ln.weight.copy_(w[p + "ln_1.weight"])
            lay.ln.bias.copy_(w[p + "ln_1.bias"])
            lay.qkv.weight.copy_(torch.cat([w[p + "self_attn.%s_proj.weight" % n] for n in "qkv"]))
            lay.out_proj.weight.copy_(w[p + "self_attn.out_proj.weight"])
            for dst, src in ((lay.fc1, "fc1"), (lay.fc2, "fc2")):
                dst.weight.copy_(w[p + src + ".weight"])
                dst.bias.copy_(w[p + src + ".bias"])
            if lay.gate is not None:
                lay.gate.copy_(w[p + "self_attn.memory_bias"])
        side.ln_f.weight.copy_(w["layer_norm.weight"])
        side.ln_f.bias.copy_(w["layer_norm.bias"])
    return side.eval(), md


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def run_check(a):
    d = a.check
    backbone, bmd = load_backbone(d + "/backbone.safetensors")
    side, _ = load_sidenet(d + "/sidenet.safetensors")
    ref, md = load_safetensors(d + "/check.safetensors")
    T, S, B = int(md["segment_length"]), int(md["num_segments"]), int(md["streams"])
    msz, csz, K = int(md["memory_tokens"]), int(md["chunk_size"]), int(md["retrieved_tokens"])
    H, dh = int(bmd["n_head"]), int(bmd["n_embd"]) // int(bmd["n_head"])
    bias = alibi_causal_bias(T, H)
    tokens = ref["tokens"].long()
    bank = MemoryBank(B, H, dh, msz, csz)
    fwd_mem, err_mem = maybe_compile(make_forward(backbone, side, bias, bank, K // csz, True), a.compile)
    fwd_off, err_off = maybe_compile(make_forward(backbone, side, bias, bank, K // csz, False), a.compile)
    if err_mem or err_off:
        print(json.dumps({"check": "FAILED", "error": err_mem or err_off}), flush=True)
        return 1
    side.layers[side.mem_index].record = not a.compile
    worst = {"logits_memory": 0.0, "logits_batched": 0.0, "logits_nomemory": 0.0}
    per_segment = []
    with torch.inference_mode():
        for s in range(S):
            seg = tokens[:, s * T:(s + 1) * T]
            logits = (fwd_mem if bank.count > 0 else fwd_off)(seg)
            row = {"segment": s, "bank_chunks": bank.count}
            for name in ("logits_memory", "logits_batched"):
                e = rel_err(logits, ref[name][:, s * T:(s + 1) * T])
                row[name] = e
                worst[name] = max(worst[name], e)
            per_segment.append(row)
            if s == S - 1:
                worst["logits_nomemory"] = rel_err(fwd_off(seg), ref["logits_nomemory"])
                idx = side.layers[side.mem_index].last_idx
            _, k, v = backbone(seg, bias, side.memory_layer)
            bank.append(k, v)
    same = None
    if not a.compile and idx is not None:
        ours = ref["retrieved_slots"].long().sort(-1).values             # (B, T, H, k')
        mine = idx.permute(0, 2, 1, 3).sort(-1).values                   # (B, H, T, k') -> (B, T, H, k')
        same = (ours == mine).all(-1).float().mean().item()
    ok = all(e <= 1e-4 for e in worst.values()) and (same is None or same == 1.0)
    print(json.dumps({"check": "ok" if ok else "FAILED", "dir": d, "compiled": bool(a.compile),
                      "tolerance": "max|diff|/max|ref| <= 1e-4",
                      "max_rel_err": worst, "retrieved_sets_equal_fraction": same, "segments": per_segment,
                      "shape": {"d": int(bmd["n_embd"]), "heads": H, "layers": int(bmd["n_layer"]),
                                "side_layers": len(side.layers), "T": T, "streams": B, "memory_tokens": msz,
                                "chunk_size": csz, "retrieved_tokens": K},
                      "torch": torch.__version__}), flush=True)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Timer:
    """Wall and CPU time on the CPU; CUDA events on the GPU (device time of the whole call)."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn, *args):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            stop.record()
            stop.synchronize()
            return out, start.elapsed_time(stop), None
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        return out, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def run_bench(a):
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), DTYPE_NAMES[a.dtype or ("float16" if a.device == "cuda" else "float32")]
    H, d, T, V = a.heads, a.d, a.T, a.vocab
    dh, k_chunks = d // H, a.retrieved_tokens // a.chunk_size
    with dev:  # weights drawn where they live (a 24-layer model initialises in seconds on the GPU)
        backbone = Gpt2Star(a.layers, d, H, V).to(dtype).eval()
        side = SideNet(a.layers // 2, d, H, a.memory_layer).to(dtype).eval()
    with torch.no_grad():
        side.layers[side.mem_index].gate.fill_(0.5)
    bias = alibi_causal_bias(T, H).to(dev, dtype)
    gen = torch.Generator().manual_seed(42)
    timer = Timer(dev)
    n_fill = a.memory_tokens // T
    assert n_fill * T == a.memory_tokens, "memory_tokens must be a multiple of T"
    # Untimed: the layer-m keys/values of n_fill random segments, in batches of 8 segments.
    fk, fv = [], []
    with torch.inference_mode():
        fill_tokens = torch.randint(V, (n_fill, T), generator=gen).to(dev)
        for i in range(0, n_fill, 8):
            _, k, v = backbone(fill_tokens[i:i + 8], bias, a.memory_layer)
            fk.append(k.clone())
            fv.append(v.clone())
    fk, fv = torch.cat(fk), torch.cat(fv)  # (n_fill, H, T, dh)
    base = {"peer": "torch", "style": "user", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype),
            "mkl": torch.backends.mkl.is_available(), "d": d, "heads": H, "layers": a.layers, "vocab": V, "T": T,
            "side_layers": len(side.layers), "memory_layer": a.memory_layer, "memory_tokens": a.memory_tokens,
            "chunk_size": a.chunk_size, "retrieved_tokens": a.retrieved_tokens}
    for B in a.streams:
        bank = MemoryBank(B, H, dh, a.memory_tokens, a.chunk_size, dev, dtype)
        with torch.inference_mode():
            for i in range(n_fill):
                rows = torch.tensor([(i + b) % n_fill for b in range(B)], device=dev)
                bank.append(fk[rows], fv[rows])
        tokens = torch.randint(V, (B, T), generator=gen).to(dev)
        for memory in (True, False):
            out = dict(base, streams=B, memory=memory, compiled=bool(a.compile), memory_chunks_filled=bank.count,
                       warmup=a.warmup, repeats=a.repeats, ms=None, error=None)
            fn, err = maybe_compile(make_forward(backbone, side, bias, bank, k_chunks, memory), a.compile)
            if err:
                out["error"] = err
                print(json.dumps(out), flush=True)
                continue
            try:
                times, cpu = [], []
                with torch.inference_mode():
                    for _ in range(a.warmup):
                        fn(tokens)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    for _ in range(a.repeats):
                        logits, ms, cpu_ms = timer(fn, tokens)
                        times.append(ms)
                        cpu.append(cpu_ms)
                assert logits.shape == (B, T, V)
                med = statistics.median(times)
                out.update(ms=round(med, 3), ms_min=round(min(times), 3), ms_max=round(max(times), 3),
                           tokens_per_s=round(B * T / (med / 1e3), 1))
                if dev.type == "cuda":
                    out["peak_mem_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                else:
                    out["cpu_ms"] = round(statistics.median(cpu), 3)
            except Exception as e:  # noqa: BLE001 - report, do not crash
                out["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
            print(json.dumps(out), flush=True)
        del bank


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default float32 on the CPU, float16 on cuda")
    p.add_argument("--streams", type=int, nargs="*", default=[1, 8])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--memory-layer", type=int, default=4)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--retrieved-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward")
    p.add_argument("--check", metavar="DIR", help="compare with the library's logits in DIR (longmem_bench_longmem "
                                                  "--export_check=DIR) and exit")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        sys.exit(run_check(a))
    if a.compile:
        a.warmup = max(a.warmup, 3)
    run_bench(a)


if __name__ == "__main__":
    main()
