#!/usr/bin/env python3
"""Writes the tiny seed files of tests/fuzz/corpus (standard library only).

Each is a valid safetensors file: 8-byte little-endian header length, JSON header,
data section tiled exactly by the tensors' data_offsets.
"""
import json
import os
import struct
import sys

SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}


def build(tensors, metadata=None, pad=True, compact=True):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in list order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        n = 1
        for d in shape:
            n *= d
        assert len(raw) == n * SIZES[dtype], name
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":") if compact else None).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def main(out):
    os.makedirs(out, exist_ok=True)
    seeds = {
        "all_dtypes.safetensors": build(
            [
                ("a.f16", "F16", [3], struct.pack("<3H", 0x3C00, 0xC000, 0x7BFF)),
                ("b.bf16", "BF16", [1, 2], struct.pack("<2H", 0x3F80, 0x0001)),
                ("c.f32", "F32", [2, 1], struct.pack("<2f", 1.5, -0.25)),
                ("d.f64", "F64", [], struct.pack("<d", 0.1)),
                ("e.i32", "I32", [2], struct.pack("<2i", -7, 2**31 - 1)),
                ("f.i64", "I64", [1], struct.pack("<q", 5_000_000_000)),
            ],
            metadata={"format": "pt", "n_layer": "2"},
        ),
        # odd header length and a 2-byte tensor first: everything after is misaligned
        "misaligned.safetensors": build(
            [
                ("h", "F16", [1], struct.pack("<H", 0x4200)),
                ("w", "F32", [2], struct.pack("<2f", 3.0, -1.0)),
                ("q", "I64", [1, 1], struct.pack("<q", -3)),
            ],
            pad=False,
            compact=False,
        ),
        "shapes.safetensors": build(
            [
                ("empty", "F32", [0], b""),
                ("empty2", "BF16", [2, 0, 3], b""),
                ("rank5", "F16", [1, 1, 2, 1, 1], struct.pack("<2H", 0x3800, 0x0400)),
                ("scalar", "I32", [], struct.pack("<i", 42)),
            ],
            metadata={},
        ),
        "empty.safetensors": build([]),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
