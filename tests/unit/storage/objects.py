"""What the storage tests put in S3 and look for: hand-written safetensors files, the secret that
must never show in an error, the request field a LoRA error names."""

from __future__ import annotations

import json
import struct
from typing import Any

from botocore.client import BaseClient

from storage import LoraCache

SECRET = "test-secret-access-key-do-not-log"
FIELD = "loras.1.path"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], seed: int = 0) -> bytes:
    """A safetensors file written by hand: u64 LE header length, JSON header, tensor data."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name, (dtype, shape) in tensors.items():
        numel = 1
        for dim in shape:
            numel *= dim
        length = numel * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + length]}
        data += bytes((seed + i) % 251 for i in range(length))
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def lora_bytes(rank: int = 4, seed: int = 0) -> bytes:
    return safetensors_bytes(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": ("F16", [rank, 16]),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": ("F16", [48, rank]),
        },
        seed=seed,
    )


def put(client: BaseClient, bucket: str, key: str, data: bytes) -> str:
    return str(client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]).strip('"')


def leftovers(cache: LoraCache) -> list[str]:
    return sorted(p.name for p in cache.root.rglob("*.part"))
