#!/usr/bin/env python3
"""PyTorch GPU peer of bench/bench_attention_gpu.cu: causal attention, the memory-augmented layer
(gated fusion) and the linear layers, as a skilled PyTorch user runs them on the GPU.

Shape (the issue's): B 8 streams, T 1024, 16 heads, dh 64, K 64 retrieved tokens per (query, head),
ALiBi, a 65,536-token bank per stream and head (DESIGN.md: one bank per stream). Tensors are laid
out as the library lays them out: q, k, v (B, T, H, dh), SDPA gets the (B, H, T, dh) transposed
views (last dim contiguous, as after a q/k/v projection); bank keys/values (B, H, N, dh); retrieved
token ids (B, T, H, K), uniform over the N bank tokens with replacement (--csz 4: K/4 chunks of 4
consecutive tokens, uniform over the N/4 chunks), as the C++ rows ".../uniform" and
".../uniform-csz4".

Cases (--cases picks; rows carry "case" and "backend"):
  sdpa_causal   F.scaled_dot_product_attention(q, k, v, is_causal=True), no bias: the issue's
                reference point. One row per SDPA backend that accepts the dtype (default = no
                restriction, i.e. what a user gets; flash, efficient, cudnn), unsupported ones are
                printed with "skipped".
  sdpa_alibi    SDPA with ALiBi + causal as an additive float mask (1, H, T, T) in the input dtype
                (SDPA has no ALiBi-slopes argument): backends default, efficient, cudnn, math.
  memory_ref    the memory-augmented layer in the reference formulation (LongMem's code on fairseq):
                gather of the retrieved keys/values by advanced indexing bank[b, h, ids], memory
                branch as explicit matmul -> softmax (in fp32, as fairseq's utils.softmax) -> matmul,
                local branch SDPA with the ALiBi mask, out = (1 - sigmoid(g_h)) A + sigmoid(g_h) M.
  memory_user   the same layer user-style: one index_select over the flattened banks (all B streams
                and heads in one call), memory branch through SDPA with the T queries as the batch
                (q (B*T, H, 1, dh) against (B*T, H, K, dh)), local SDPA with the ALiBi mask, gate mix.
  linear        F.linear(x (N, I), w (O, I), b (O)) at the C++ Linear rows' shapes.

The gated formula (include/longmem/fusion.hpp, DESIGN.md): A = softmax(q k^T/sqrt(dh) + alibi + causal) v,
M = softmax(q Kr^T/sqrt(dh)) Vr (its own softmax, no position term), out_h = (1-s(g_h)) A_h + s(g_h) M_h.
Memory rows report ms (gather included) and, timed separately, gather_ms, memory_ms (memory branch
on gathered keys/values), local_ms and nogather_ms (local + memory branch + mix, gather excluded:
compare with the C++ Memory/B8 rows). max_diff_vs_ref (memory_user only) checks that both
formulations compute the same output.

dtypes: fp32 (TF32 off for matmuls and cuDNN, like the C++ fp32 FMA kernels; SDPA has no fp32 flash or
cuDNN kernel, its fp32 rows are the efficient (cutlass) kernel or math), bf16 and fp16 as extra rows
(the reference runs fp16). --linear-dtypes may add "tf32" (fp32 with TF32 on) as a labelled extra.
Timing: torch.cuda.Event around each call on the current stream, --warmup calls first, median (ms)
and minimum (ms_min) of --repeats. Counters as the C++ rows: tflops with the same FLOP count
(causal 4 H dh T(T+1)/2, memory 4 T H K dh, per stream, times B; linear 2 N I O), retrieved_MB =
distinct bank bytes of keys + values the ids touch (each distinct byte once), GB/s on those bytes.
One JSON object per line.

usage: python3 bench/peers/attention_torch_gpu.py [--B 8 1] [--cases ...] [--dtypes fp32 bf16 fp16]
"""
import argparse
import contextlib
import json
import math
import statistics
import warnings

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = None
    sdpa_kernel = None

H, DH = 16, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}
ALL_CASES = ["sdpa_causal", "sdpa_alibi", "memory_ref", "memory_user", "linear"]


def emit(row):
    print(json.dumps(row), flush=True)


def timed(fn, repeats, warmup):
    """Median and minimum milliseconds of fn() over `repeats` calls, CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return round(statistics.median(times), 4), round(min(times), 4)


def backend_ctx(name):
    """Context restricting SDPA to one backend; "default" leaves PyTorch's choice."""
    if name == "default":
        return contextlib.nullcontext()
    if sdpa_kernel is None:
        raise RuntimeError("torch.nn.attention.sdpa_kernel not available")
    enum = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
            "math": "MATH"}[name]
    if not hasattr(SDPBackend, enum):
        raise RuntimeError(f"SDPBackend.{enum} not in this torch")
    return sdpa_kernel([getattr(SDPBackend, enum)])


def alibi_slopes(n_head):
    """As longmem::detail::alibi_slope (Press et al., fairseq): 2^(-8 (h+1) / n) for a power of two n."""
    p = 1
    while p * 2 <= n_head:
        p *= 2
    s = [2.0 ** (-8.0 * (h + 1) / p) for h in range(p)]
    s += [2.0 ** (-8.0 * (2 * e + 1) / (2 * p)) for e in range(n_head - p)]
    return s


def alibi_mask(T, dtype, dev):
    """(1, H, T, T) additive mask: slope_h * (s - t) for s <= t, -inf above the diagonal."""
    t = torch.arange(T, device=dev)
    dist = (t[None, :] - t[:, None]).double()  # s - t
    slopes = torch.tensor(alibi_slopes(H), device=dev, dtype=torch.float64)
    bias = slopes[:, None, None] * dist
    bias = bias.masked_fill(dist > 0, float("-inf"))
    return bias.to(dtype).unsqueeze(0)


def causal_flops(B, T):
    return B * 4.0 * H * DH * T * (T + 1) / 2.0


def memory_flops(B, T, K):
    return B * 4.0 * T * H * K * DH


def make_ids(B, T, K, N, csz, dev, gen):
    """(B, T, H, K) int64 token ids: K/csz chunks per (b, t, h), uniform with replacement."""
    chunks = torch.randint(0, N // csz, (B, T, H, K // csz), device=dev, generator=gen)
    ids = chunks[..., None] * csz + torch.arange(csz, device=dev)
    return ids.reshape(B, T, H, K)


def distinct_rows(ids, N):
    """Distinct (b, h, token) triples the ids touch."""
    B, T, Hh, K = ids.shape
    b = torch.arange(B, device=ids.device)[:, None, None, None]
    h = torch.arange(Hh, device=ids.device)[None, None, :, None]
    return int(torch.unique(((b * Hh + h) * N + ids).reshape(-1)).numel())


# ---------------------------------------------------------------------------------------------
# The memory-augmented layer, gated fusion. q, k, v (B, T, H, dh); bank_k/v (B, H, N, dh);
# ids (B, T, H, K); gate (H,); mask (1, H, T, T). Output (B, T, H, dh).

def local_branch(q, k, v, mask):
    """A = softmax(q k^T / sqrt(dh) + alibi + causal) v through SDPA: (B, H, T, dh) views in, (B, T, H, dh) view out."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def gather_ref(bank_k, bank_v, ids):
    """Advanced indexing, as the reference: bank[b, h, ids] -> (B, T, H, K, dh)."""
    B, _, Hh, _ = ids.shape
    b = torch.arange(B, device=ids.device)[:, None, None, None]
    h = torch.arange(Hh, device=ids.device)[None, None, :, None]
    return bank_k[b, h, ids], bank_v[b, h, ids]


def memory_branch_ref(q, mem_k, mem_v):
    """Explicit matmul + softmax (fp32, as fairseq's utils.softmax) + matmul: M (B, T, H, dh)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.unsqueeze(-2), mem_k.transpose(-1, -2)) * scale  # (B, T, H, 1, K)
    p = F.softmax(s, dim=-1, dtype=torch.float32).type_as(s)
    return torch.matmul(p, mem_v).squeeze(-2)


def mix(A, M, gate):
    g = torch.sigmoid(gate)[None, None, :, None]  # (1, 1, H, 1)
    return (1 - g) * A + g * M


def layer_ref(q, k, v, bank_k, bank_v, ids, gate, mask):
    A = local_branch(q, k, v, mask)
    mem_k, mem_v = gather_ref(bank_k, bank_v, ids)
    return mix(A, memory_branch_ref(q, mem_k, mem_v), gate)


def flat_ids_of(ids, N):
    """Row numbers into the banks flattened to (B * H * N, dh)."""
    B, _, Hh, _ = ids.shape
    b = torch.arange(B, device=ids.device)[:, None, None, None]
    h = torch.arange(Hh, device=ids.device)[None, None, :, None]
    return ((b * Hh + h) * N + ids).reshape(-1)


def gather_user(bank_k, bank_v, flat_ids, shape):
    """One index_select per bank over all streams and heads -> (B, T, H, K, dh)."""
    dh = bank_k.shape[-1]
    return (bank_k.view(-1, dh).index_select(0, flat_ids).view(*shape, dh),
            bank_v.view(-1, dh).index_select(0, flat_ids).view(*shape, dh))


def memory_branch_user(q, mem_k, mem_v):
    """SDPA with the queries as the batch: q (B*T, H, 1, dh) vs (B*T, H, K, dh) -> (B, T, H, dh)."""
    B, T, Hh, K, dh = mem_k.shape
    M = F.scaled_dot_product_attention(q.reshape(B * T, Hh, 1, dh), mem_k.view(B * T, Hh, K, dh),
                                       mem_v.view(B * T, Hh, K, dh))
    return M.view(B, T, Hh, dh)


def layer_user(q, k, v, bank_k, bank_v, flat_ids, ids_shape, gate, mask):
    A = local_branch(q, k, v, mask)
    mem_k, mem_v = gather_user(bank_k, bank_v, flat_ids, ids_shape)
    return mix(A, memory_branch_user(q, mem_k, mem_v), gate)


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--B", type=int, nargs="*", default=[8, 1], help="streams (the C++ B8 rows and the B 1 rows)")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--bank", type=int, default=65536, help="bank tokens per stream and head")
    ap.add_argument("--csz", type=int, nargs="*", default=[1, 4], help="id granularity: 1 tokens, 4 chunks of 4")
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--linear-dtypes", nargs="*", default=["fp32", "bf16", "fp16"], help="also: tf32")
    ap.add_argument("--cases", nargs="*", default=ALL_CASES, choices=ALL_CASES)
    args = ap.parse_args()
    if any(c < 1 or args.K % c or args.bank % c for c in args.csz):
        raise SystemExit("--csz must divide --K and --bank")
    if not torch.cuda.is_available():
        raise SystemExit("attention_torch_gpu.py: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    T, K, N = args.T, args.K, args.bank
    base = {"peer": "torch", "torch": torch.__version__, "device": props.name}
    u = lambda dtype, *s: (torch.rand(*s, device=dev, generator=gen) * 2 - 1).to(dtype)

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns on each refused backend; the row says "skipped"
        for B in args.B:
            for name in args.dtypes:
                dtype = DTYPES[name]
                shape = dict(base, B=B, T=T, H=H, dh=DH, dtype=name)
                q, k, v = u(dtype, B, T, H, DH), u(dtype, B, T, H, DH), u(dtype, B, T, H, DH)
                qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, dh) views

                if "sdpa_causal" in args.cases:
                    flops = causal_flops(B, T)
                    for be in ["default", "flash", "efficient", "cudnn"]:
                        row = dict(shape, case="sdpa_causal", backend=be, pos="none")
                        try:
                            with backend_ctx(be):
                                ms, ms_min = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                                                   args.repeats, args.warmup)
                            row.update(ms=ms, ms_min=ms_min, tflops=round(flops / ms * 1e-9, 2))
                        except (RuntimeError, NotImplementedError) as e:
                            row.update(skipped=str(e).splitlines()[0][:160])
                        emit(row)

                mask = alibi_mask(T, dtype, dev) if any(c in args.cases for c in ALL_CASES[1:4]) else None
                if "sdpa_alibi" in args.cases:
                    flops = causal_flops(B, T)
                    for be in ["default", "efficient", "cudnn", "math"]:
                        row = dict(shape, case="sdpa_alibi", backend=be, pos="alibi_mask")
                        try:
                            with backend_ctx(be):
                                ms, ms_min = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask),
                                                   args.repeats, args.warmup)
                            row.update(ms=ms, ms_min=ms_min, tflops=round(flops / ms * 1e-9, 2))
                        except (RuntimeError, NotImplementedError) as e:
                            row.update(skipped=str(e).splitlines()[0][:160])
                        emit(row)

                if "memory_ref" in args.cases or "memory_user" in args.cases:
                    bank_k, bank_v = u(dtype, B, H, N, DH), u(dtype, B, H, N, DH)
                    gate = u(dtype, H)
                    flops = causal_flops(B, T) + memory_flops(B, T, K)
                    local_ms = timed(lambda: local_branch(q, k, v, mask), args.repeats, args.warmup)[0]
                    for csz in args.csz:
                        ids = make_ids(B, T, K, N, csz, dev, gen)
                        distinct = distinct_rows(ids, N)
                        read = distinct * 2 * DH * q.element_size()  # keys + values, each distinct byte once
                        gathered = 2 * B * T * H * K * DH * q.element_size()
                        mem = dict(shape, K=K, bank=N, csz=csz, ids="uniform" if csz == 1 else f"uniform-csz{csz}",
                                   retrieved_MB=round(read * 1e-6, 1), gathered_MB=round(gathered * 1e-6, 1),
                                   distinct_frac=round(distinct / (B * H * N), 4), local_ms=local_ms)
                        ref_out = None
                        if "memory_ref" in args.cases:
                            mk, mv = gather_ref(bank_k, bank_v, ids)
                            ms, ms_min = timed(lambda: layer_ref(q, k, v, bank_k, bank_v, ids, gate, mask),
                                               args.repeats, args.warmup)
                            g_ms = timed(lambda: gather_ref(bank_k, bank_v, ids), args.repeats, args.warmup)[0]
                            m_ms = timed(lambda: memory_branch_ref(q, mk, mv), args.repeats, args.warmup)[0]
                            ng_ms = timed(lambda: mix(local_branch(q, k, v, mask), memory_branch_ref(q, mk, mv), gate),
                                          args.repeats, args.warmup)[0]
                            ref_out = layer_ref(q, k, v, bank_k, bank_v, ids, gate, mask).float()
                            emit(dict(mem, case="memory_ref", backend="default", ms=ms, ms_min=ms_min,
                                      tflops=round(flops / ms * 1e-9, 2), GBps=round(read / ms * 1e-6, 1),
                                      gather_ms=g_ms, memory_ms=m_ms, nogather_ms=ng_ms,
                                      nogather_tflops=round(flops / ng_ms * 1e-9, 2),
                                      nogather_GBps=round(gathered / ng_ms * 1e-6, 1)))
                            del mk, mv
                        if "memory_user" in args.cases:
                            flat = flat_ids_of(ids, N)
                            mk, mv = gather_user(bank_k, bank_v, flat, ids.shape)
                            ms, ms_min = timed(lambda: layer_user(q, k, v, bank_k, bank_v, flat, ids.shape, gate, mask),
                                               args.repeats, args.warmup)
                            g_ms = timed(lambda: gather_user(bank_k, bank_v, flat, ids.shape), args.repeats,
                                         args.warmup)[0]
                            m_ms = timed(lambda: memory_branch_user(q, mk, mv), args.repeats, args.warmup)[0]
                            ng_ms = timed(lambda: mix(local_branch(q, k, v, mask), memory_branch_user(q, mk, mv), gate),
                                          args.repeats, args.warmup)[0]
                            row = dict(mem, case="memory_user", backend="default", ms=ms, ms_min=ms_min,
                                       tflops=round(flops / ms * 1e-9, 2), GBps=round(read / ms * 1e-6, 1),
                                       gather_ms=g_ms, memory_ms=m_ms, nogather_ms=ng_ms,
                                       nogather_tflops=round(flops / ng_ms * 1e-9, 2),
                                       nogather_GBps=round(gathered / ng_ms * 1e-6, 1))
                            if ref_out is not None:
                                out = layer_user(q, k, v, bank_k, bank_v, flat, ids.shape, gate, mask).float()
                                row["max_diff_vs_ref"] = float((out - ref_out).abs().max())
                                del out
                            emit(row)
                            del mk, mv, flat
                        del ids, ref_out
                    del bank_k, bank_v
                del q, k, v, qs, ks, vs, mask
                torch.cuda.empty_cache()

        if "linear" in args.cases:
            for name in args.linear_dtypes:
                dtype = DTYPES[name]
                torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
                for n_rows in (1024, 8192):
                    for i_dim, o_dim in ((1024, 1024), (1024, 4096), (4096, 1024)):
                        x, w, b = u(dtype, n_rows, i_dim), u(dtype, o_dim, i_dim), u(dtype, o_dim)
                        ms, ms_min = timed(lambda: F.linear(x, w, b), args.repeats, args.warmup)
                        emit(dict(base, case="linear", N=n_rows, I=i_dim, O=o_dim, bias=True, dtype=name, ms=ms,
                                  ms_min=ms_min, tflops=round(2.0 * n_rows * i_dim * o_dim / ms * 1e-9, 2)))
                        del x, w, b
            torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    main()
