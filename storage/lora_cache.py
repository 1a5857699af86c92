"""LoRA downloads into a local cache addressed by content, shared by the worker processes of a node.

::

    <root>/blobs/<sha256>.safetensors    one file per distinct content, checked as safetensors
    <root>/blobs/.download-*.part        downloads in progress (unique names, same filesystem)
    <root>/index/<digest>.json           (bucket, key, ETag) -> sha256, size
    <root>/lock                          flock'ed around index updates and eviction

``LoraCache.fetch`` HEADs the object; an ETag already in the index whose blob is present is a hit
and downloads nothing. Otherwise the object is streamed into a temp file while hashing, its
safetensors header is checked (no torch: ``validate_safetensors_header``), and the file is renamed
into place with ``os.replace``, so readers never see a partial blob. A re-uploaded object has a new
ETag and is fetched again; identical content under two keys is stored once.

Size bound: after a download, least recently used blobs (file mtime, touched on every use) are
deleted until the blobs total at most ``max_bytes``. The blob just fetched and the ``keep`` blobs the
caller names (the other LoRAs of the same request) are never evicted; the bound may then be
exceeded until they age out. Objects larger than ``max_file_bytes`` are refused after the HEAD,
before any byte is downloaded, and a download that grows past the limit is aborted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.client import BaseClient

from storage.keys import uri
from storage.s3 import storage_errors, strip_etag
from tasks.errors import InvalidLora
from tasks.request_text import quoted

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own bound
# Names in a header (tensors, their fields, metadata items), all objects together. A LoRA for every
# Chroma layer holds about 1,700 tensors (7,000 names) and a few hundred metadata items; a header of
# a million zero-size tensors takes half a minute and gigabytes to read.
MAX_HEADER_NAMES = 200_000
CHUNK_BYTES = 1 << 20
STALE_DOWNLOAD_SECONDS = 3600.0
BLOB_SUFFIX = ".safetensors"

# Bits per element of every safetensors dtype (as of safetensors 0.8).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HOW_TO_FIX = "upload a .safetensors file written by the safetensors library"


@dataclass(frozen=True)
class CachedLora:
    """A LoRA file in the local cache, ready to load."""

    path: Path
    sha256: str
    etag: str | None
    size: int
    uri: str


class LoraCache:
    """LoRA files by content hash under ``root_dir``, bounded to ``max_bytes`` in total."""

    def __init__(self, root_dir: str | os.PathLike[str], max_bytes: int, max_file_bytes: int) -> None:
        if max_bytes < 0 or max_file_bytes < 1:
            raise ValueError("max_bytes must be >= 0 and max_file_bytes >= 1")
        self.root = Path(root_dir).expanduser()
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.blobs = self.root / "blobs"
        self.index = self.root / "index"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.index.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "lock"

    def fetch(
        self, client: BaseClient, bucket: str, key: str, *, field: str, keep: Collection[str] = ()
    ) -> CachedLora:
        """The local copy of ``s3://bucket/key``, downloaded and checked unless already cached.

        ``field`` names the request field in every error (``loras.0.path``); ``keep`` lists sha256s
        that eviction must not delete (the LoRAs already fetched for the same request).
        """
        where = uri(bucket, key)
        with storage_errors("HEAD", bucket, key, lora_field=field):
            head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        check_lora_size(size, self.max_file_bytes, field)  # before any byte is downloaded
        etag = strip_etag(head.get("ETag"))

        cached = self._lookup(bucket, key, etag, where)
        if cached is not None:
            logger.info("LoRA %s: cache hit %s", where, cached.sha256[:12])
            return cached

        started = time.monotonic()
        temp, sha256, size, etag = self._download(client, bucket, key, field)
        try:
            check_lora_file(temp, self.max_file_bytes, field)  # the checks a local LoRA file gets too
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        blob = self._blob_path(sha256)
        os.chmod(temp, 0o644)  # mkstemp makes it owner-only; other worker users may share the cache
        with self._locked():
            os.replace(temp, blob)
            _touch(blob)
            if etag is not None:
                self._write_index(bucket, key, etag, sha256, size)
            self._evict(protect={sha256, *keep})
        logger.info(
            "LoRA %s: downloaded %d bytes in %.2fs, sha256 %s",
            where,
            size,
            time.monotonic() - started,
            sha256[:12],
        )
        return CachedLora(path=blob, sha256=sha256, etag=etag, size=size, uri=where)

    def total_bytes(self) -> int:
        """Bytes held by cached blobs (downloads in progress excluded)."""
        return sum(size for _, size, _ in self._blob_stats())

    def _lookup(self, bucket: str, key: str, etag: str | None, where: str) -> CachedLora | None:
        if etag is None:  # no version tag: a re-upload could not be told apart, so always download
            return None
        with self._locked():
            entry = self._read_index(bucket, key, etag)
            if entry is None:
                return None
            blob = self._blob_path(entry["sha256"])
            try:
                if blob.stat().st_size != entry["size"]:
                    return None
                _touch(blob)
            except FileNotFoundError:
                return None
        return CachedLora(path=blob, sha256=entry["sha256"], etag=etag, size=entry["size"], uri=where)

    def _download(
        self, client: BaseClient, bucket: str, key: str, field: str
    ) -> tuple[Path, str, int, str | None]:
        """Stream the object into a unique temp file next to the blobs: (temp, sha256, size, ETag)."""
        digest = hashlib.sha256()
        received = 0
        fd, name = tempfile.mkstemp(dir=self.blobs, prefix=".download-", suffix=".part")
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, storage_errors("download", bucket, key, lora_field=field):
                response = client.get_object(Bucket=bucket, Key=key)
                body = response["Body"]
                try:
                    check_lora_size(int(response["ContentLength"]), self.max_file_bytes, field)
                    while chunk := body.read(CHUNK_BYTES):
                        received += len(chunk)
                        if received > self.max_file_bytes:
                            raise InvalidLora(
                                f"LoRA download passed this worker's limit of {self.max_file_bytes} bytes "
                                "(the object grew after it was checked); upload a smaller file",
                                field=field,
                            )
                        digest.update(chunk)
                        out.write(chunk)
                finally:
                    body.close()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp, digest.hexdigest(), received, strip_etag(response.get("ETag"))

    def _blob_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}{BLOB_SUFFIX}"

    def _index_path(self, bucket: str, key: str, etag: str) -> Path:
        name = hashlib.sha256(json.dumps([bucket, key, etag]).encode("utf-8")).hexdigest()
        return self.index / f"{name}.json"

    def _read_index(self, bucket: str, key: str, etag: str) -> dict[str, Any] | None:
        path = self._index_path(bucket, key, etag)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("LoRA cache index %s is unreadable; downloading again", path.name)
            return None
        valid = (
            isinstance(entry, dict)
            and [entry.get("bucket"), entry.get("key"), entry.get("etag")] == [bucket, key, etag]
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"]) is not None
            and isinstance(entry.get("size"), int)
        )
        return entry if valid else None

    def _write_index(self, bucket: str, key: str, etag: str, sha256: str, size: int) -> None:
        entry = {"bucket": bucket, "key": key, "etag": etag, "sha256": sha256, "size": size}
        path = self._index_path(bucket, key, etag)
        fd, name = tempfile.mkstemp(dir=self.index, prefix=".entry-", suffix=".part")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(entry, out)
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def _blob_stats(self) -> Iterator[tuple[Path, int, float]]:
        for blob in self.blobs.glob(f"*{BLOB_SUFFIX}"):
            try:
                stat = blob.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            yield blob, stat.st_size, stat.st_mtime

    def _evict(self, protect: Collection[str]) -> None:
        """Delete least recently used blobs until the total fits. Call with the lock held."""
        blobs = sorted(self._blob_stats(), key=lambda item: item[2])
        total = sum(size for _, size, _ in blobs)
        evicted: set[str] = set()
        for blob, size, _ in blobs:
            if total <= self.max_bytes:
                break
            sha256 = blob.name.removesuffix(BLOB_SUFFIX)
            if sha256 in protect:
                continue
            blob.unlink(missing_ok=True)
            total -= size
            evicted.add(sha256)
            logger.info("LoRA cache: evicted %s (%d bytes)", sha256[:12], size)
        if total > self.max_bytes:
            logger.warning(
                "LoRA cache holds %d bytes, above its %d byte bound: the LoRAs in use do not fit",
                total,
                self.max_bytes,
            )
        if evicted:
            self._drop_index_entries(evicted)
        self._drop_stale_downloads()

    def _drop_index_entries(self, sha256s: Collection[str]) -> None:
        for path in self.index.glob("*.json"):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except ValueError:
                path.unlink(missing_ok=True)
                continue
            if not isinstance(entry, dict) or entry.get("sha256") in sha256s:
                path.unlink(missing_ok=True)

    def _drop_stale_downloads(self) -> None:
        """Temp files left by a process that died mid-download (live ones are written every second)."""
        cutoff = time.time() - STALE_DOWNLOAD_SECONDS
        for directory in (self.blobs, self.index):
            for temp in directory.glob(".*.part"):
                try:
                    if temp.stat().st_mtime < cutoff:
                        temp.unlink(missing_ok=True)
                except FileNotFoundError:
                    continue

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_lora_size(size: int, max_bytes: int, field: str | None) -> None:
    """A LoRA file larger than ``max_bytes`` is refused (before any byte is read from S3)."""
    if size > max_bytes:
        raise InvalidLora(
            f"LoRA file is {size} bytes; this worker accepts at most {max_bytes} bytes "
            f"({max_bytes / 2**20:.0f} MiB)",
            field=field,
        )


def check_lora_file(path: str | os.PathLike[str], max_bytes: int, field: str | None) -> None:
    """The checks every LoRA file gets before it is parsed, wherever it came from (S3 or a local
    folder): the size limit, then the safetensors header (``validate_safetensors_header``)."""
    check_lora_size(os.stat(path).st_size, max_bytes, field)
    validate_safetensors_header(path, field=field, require_tensors=True)


def validate_safetensors_header(
    path: str | os.PathLike[str], *, field: str | None = None, require_tensors: bool = False
) -> dict[str, Any]:
    """The parsed header of a safetensors file, checked against the file's size. No torch.

    Checks the 8-byte little-endian header length, that the header is a JSON object of tensor
    entries (``dtype``, ``shape``, ``data_offsets``) plus an optional ``__metadata__`` of strings,
    and that the entries tile the data section exactly (contiguous, no gaps, no overlap, no bytes
    past the end), with each entry's byte length equal to its dtype size times its element count.
    Raises ``InvalidLora`` naming ``field`` with what is wrong.
    """
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        if file_size < 8:
            raise InvalidLora(
                f"file is {file_size} bytes, too short to be safetensors (empty or truncated upload); "
                + _HOW_TO_FIX,
                field=field,
            )
        prefix = handle.read(8)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
            raise InvalidLora(_bad_length_message(prefix, header_len, file_size), field=field)
        raw = handle.read(header_len)

    names = 0

    def counted(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal names
        names += len(pairs)
        if names > MAX_HEADER_NAMES:
            raise _TooManyNames
        return _no_duplicate_keys(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=counted)
    except _TooManyNames:
        raise InvalidLora(
            f"safetensors header holds more than {MAX_HEADER_NAMES} names (tensors, their fields and "
            f"metadata items); a LoRA holds a few thousand; {_HOW_TO_FIX}",
            field=field,
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidLora(
            f"safetensors header is not valid JSON ({exc}); {_HOW_TO_FIX}", field=field
        ) from exc
    except RecursionError:
        raise InvalidLora(f"safetensors header is nested too deeply; {_HOW_TO_FIX}", field=field) from None
    if not isinstance(header, dict):
        raise InvalidLora(f"safetensors header is not a JSON object; {_HOW_TO_FIX}", field=field)

    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidLora("safetensors __metadata__ must map names to strings", field=field)

    data_size = file_size - 8 - header_len
    spans = sorted(
        (_tensor_span(name, entry, field) for name, entry in header.items() if name != "__metadata__"),
        key=lambda span: (span[0], span[1]),
    )
    if require_tensors and not spans:
        raise InvalidLora(f"safetensors file holds no tensors; {_HOW_TO_FIX}", field=field)
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise InvalidLora(
                f"tensor {quoted(name)} starts at data byte {begin}, expected {position} "
                "(overlapping or missing data): the file is corrupt",
                field=field,
            )
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "padded with unreferenced bytes"
        raise InvalidLora(
            f"tensors need {position} bytes of data but the file has {data_size}: it is {state}; "
            + _HOW_TO_FIX,
            field=field,
        )
    return header


def _tensor_span(name: str, entry: Any, field: str | None) -> tuple[int, int, str]:
    """(begin, end, name) of one header entry after checking dtype, shape and byte length."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidLora(
            f"tensor {quoted(name)} header entry must have exactly dtype, shape and data_offsets", field=field
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise InvalidLora(f"tensor {quoted(name)} has unknown dtype {quoted(str(dtype))}", field=field)
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise InvalidLora(f"tensor {quoted(name)} shape must be a list of non-negative integers", field=field)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InvalidLora(f"tensor {quoted(name)} data_offsets must be [begin, end] integers", field=field)
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    if end < begin or bits % 8 or end - begin != bits // 8:
        raise InvalidLora(
            f"tensor {quoted(name)} spans bytes {begin}..{end} but {dtype} {shape} needs {bits / 8:g} bytes: "
            "the file is corrupt",
            field=field,
        )
    return begin, end, name


def _touch(blob: Path) -> None:
    """Mark ``blob`` most recently used. An explicit nanosecond time: the kernel's own clock for
    "now" is coarse (~4 ms), which would tie two uses in quick succession."""
    now = time.time_ns()
    os.utime(blob, ns=(now, now))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _TooManyNames(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate key {quoted(name)}")
        out[name] = value
    return out


def _bad_length_message(prefix: bytes, header_len: int, file_size: int) -> str:
    if prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80":
        kind = "a pickled PyTorch checkpoint (torch.save), which is never loaded"
    elif header_len > MAX_HEADER_BYTES:
        kind = f"a header of {header_len} bytes (the limit is {MAX_HEADER_BYTES})"
    else:
        kind = f"a {header_len} byte header in a {file_size} byte file (truncated)"
    return f"not a safetensors file: its first bytes describe {kind}; {_HOW_TO_FIX}"
