"""The LoRA cache: downloads checked and kept by content, re-uploads fetched again, the size bound,
two caches on one directory, malformed files refused before anything is kept."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

from storage import CachedLora, LoraCache, lora_location, validate_safetensors_header
from tasks.errors import InvalidLora
from tests.unit.storage.objects import FIELD, leftovers, lora_bytes, put


def test_fetch_downloads_checks_and_caches(
    client: BaseClient, bucket: str, tmp_path: Path, get_calls: list[str]
) -> None:
    data = lora_bytes()
    etag = put(client, bucket, "job/a.safetensors", data)
    cache = LoraCache(tmp_path / "cache", max_bytes=10**6, max_file_bytes=10**6)

    first = cache.fetch(client, bucket, "job/a.safetensors", field=FIELD)
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.path == tmp_path / "cache" / "blobs" / f"{first.sha256}.safetensors"
    assert first.path.read_bytes() == data
    assert (first.etag, first.size, first.uri) == (etag, len(data), f"s3://{bucket}/job/a.safetensors")
    inode = first.path.stat().st_ino

    second = cache.fetch(client, bucket, "job/a.safetensors", field=FIELD)
    assert second == first
    assert get_calls == ["job/a.safetensors"]  # the hit downloaded nothing
    assert second.path.stat().st_ino == inode
    assert leftovers(cache) == []


def test_reupload_is_fetched_again(
    client: BaseClient, bucket: str, tmp_path: Path, get_calls: list[str]
) -> None:
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    put(client, bucket, "a.safetensors", lora_bytes(seed=1))
    old = cache.fetch(client, bucket, "a.safetensors", field=FIELD)
    put(client, bucket, "a.safetensors", lora_bytes(seed=2))
    new = cache.fetch(client, bucket, "a.safetensors", field=FIELD)
    assert new.etag != old.etag
    assert new.sha256 != old.sha256
    assert new.path.read_bytes() == lora_bytes(seed=2)
    assert len(get_calls) == 2


def test_keys_with_colons_and_spaces_are_fetched(client: BaseClient, bucket: str, tmp_path: Path) -> None:
    """ai-toolkit names checkpoints by step; S3 keys may hold ':' and ' ' (sent URL-encoded)."""
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    _, key = lora_location("run:v2/my lora_000001000.safetensors", lora_bucket=bucket, lora_prefix="team")
    put(client, bucket, key, lora_bytes(seed=3))
    fetched = cache.fetch(client, bucket, key, field=FIELD)
    assert fetched.path.read_bytes() == lora_bytes(seed=3)
    assert fetched.uri == f"s3://{bucket}/team/run:v2/my lora_000001000.safetensors"


def test_same_content_under_two_keys_is_stored_once(client: BaseClient, bucket: str, tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    put(client, bucket, "a.safetensors", lora_bytes())
    put(client, bucket, "b.safetensors", lora_bytes())
    a = cache.fetch(client, bucket, "a.safetensors", field=FIELD)
    b = cache.fetch(client, bucket, "b.safetensors", field=FIELD)
    assert a.path == b.path
    assert len(list(cache.blobs.glob("*.safetensors"))) == 1


def test_size_bound_evicts_least_recently_used(
    client: BaseClient, bucket: str, tmp_path: Path, get_calls: list[str]
) -> None:
    blobs = {name: lora_bytes(seed=i) for i, name in enumerate("abc")}
    for name, data in blobs.items():
        put(client, bucket, f"{name}.safetensors", data)
    size = len(blobs["a"])
    cache = LoraCache(tmp_path, max_bytes=2 * size, max_file_bytes=10**6)

    def fetch(name: str) -> CachedLora:
        return cache.fetch(client, bucket, f"{name}.safetensors", field=FIELD)

    a, b = fetch("a"), fetch("b")
    fetch("a")  # a is now more recently used than b
    c = fetch("c")
    assert a.path.exists() and c.path.exists()
    assert not b.path.exists()
    assert cache.total_bytes() == 2 * size <= cache.max_bytes
    assert len(list(cache.index.glob("*.json"))) == 2  # b's index entry went with its blob

    get_calls.clear()
    assert fetch("b").path.exists()
    assert get_calls == ["b.safetensors"]


def test_eviction_spares_the_fetched_blob_and_kept_ones(
    client: BaseClient, bucket: str, tmp_path: Path
) -> None:
    put(client, bucket, "a.safetensors", lora_bytes(seed=1))
    put(client, bucket, "b.safetensors", lora_bytes(seed=2))
    put(client, bucket, "c.safetensors", lora_bytes(seed=3))
    cache = LoraCache(tmp_path, max_bytes=0, max_file_bytes=10**6)
    a = cache.fetch(client, bucket, "a.safetensors", field=FIELD)
    assert a.path.exists()  # over the bound, but just fetched
    b = cache.fetch(client, bucket, "b.safetensors", field=FIELD, keep={a.sha256})
    assert a.path.exists() and b.path.exists()
    c = cache.fetch(client, bucket, "c.safetensors", field=FIELD)
    assert c.path.exists()
    assert not a.path.exists() and not b.path.exists()


def test_oversized_object_is_refused_before_download(
    client: BaseClient, bucket: str, tmp_path: Path, get_calls: list[str]
) -> None:
    data = lora_bytes(rank=64)
    put(client, bucket, "big.safetensors", data)
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=len(data) - 1)
    with pytest.raises(InvalidLora) as info:
        cache.fetch(client, bucket, "big.safetensors", field=FIELD)
    assert FIELD in str(info.value)
    assert str(len(data) - 1) in str(info.value)
    assert get_calls == []
    assert list(cache.blobs.iterdir()) == []


def test_two_caches_share_a_directory(client: BaseClient, bucket: str, tmp_path: Path) -> None:
    contents = {f"l{i}.safetensors": lora_bytes(seed=i) for i in range(6)}
    for name, data in contents.items():
        put(client, bucket, name, data)
    caches = [LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6) for _ in range(2)]
    results: list[CachedLora] = []
    errors: list[BaseException] = []

    def worker(cache: LoraCache) -> None:
        try:
            results.extend(cache.fetch(client, bucket, name, field=FIELD) for name in contents)
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 2 * len(contents)
    for result in results:
        assert result.path.read_bytes() == contents[result.uri.rsplit("/", 1)[1]]
    assert leftovers(caches[0]) == []


def _pickle_bytes() -> bytes:
    return pickle.dumps({"lora_A.weight": [0.5] * 64}, protocol=4)


def _torch_zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", _pickle_bytes())
    return buffer.getvalue()


def _header(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(body)) + body + data


MALFORMED: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "too short"),
    "truncated": (lambda: lora_bytes()[:-10], "truncated"),
    "trailing bytes": (lambda: lora_bytes() + b"junk", "unreferenced bytes"),
    "truncated header": (lambda: lora_bytes()[:40], "truncated"),
    "pickle": (_pickle_bytes, "pickled"),
    "torch zip": (_torch_zip_bytes, "pickled"),
    "header claims 10 GB": (lambda: struct.pack("<Q", 10 * 2**30) + b"{}", "limit"),
    "header not JSON": (lambda: _header(None, raw=b"not json at all!"), "not valid JSON"),
    "header a list": (lambda: _header([1, 2]), "not a JSON object"),
    "offsets out of range": (
        lambda: _header({"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}, b"\0" * 16),
        "truncated",
    ),
    "offsets disagree with shape": (
        lambda: _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 16 bytes",
    ),
    "overlapping tensors": (
        lambda: _header(
            {
                "a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
                "b": {"dtype": "F16", "shape": [4], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        "overlapping",
    ),
    "unknown dtype": (
        lambda: _header({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
        "unknown dtype",
    ),
    "no tensors": (lambda: _header({"__metadata__": {"format": "pt"}}), "no tensors"),
    "duplicate names": (
        lambda: _header(
            None,
            b"\0" * 4,
            raw=b'{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},'
            b' "w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}',
        ),
        "duplicate",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_is_invalid_lora(client: BaseClient, bucket: str, tmp_path: Path, case: str) -> None:
    make, words = MALFORMED[case]
    put(client, bucket, "bad.safetensors", make())
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    with pytest.raises(InvalidLora) as info:
        cache.fetch(client, bucket, "bad.safetensors", field=FIELD)
    assert str(info.value).startswith(f"{FIELD}: ")
    assert words in str(info.value)
    assert list(cache.blobs.iterdir()) == []  # nothing kept, no temp file left


def test_header_parser_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    numpy = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    written = tmp_path / "lib.safetensors"
    st.save_file(
        {"a": numpy.ones((3, 5), dtype=numpy.float16), "b": numpy.zeros((7,), dtype=numpy.float32)},
        str(written),
        metadata={"ss_network_alpha": "4"},
    )
    header = validate_safetensors_header(written)
    assert header["a"]["shape"] == [3, 5] and header["b"]["dtype"] == "F32"
    assert header["__metadata__"] == {"ss_network_alpha": "4"}

    handmade = tmp_path / "handmade.safetensors"
    handmade.write_bytes(lora_bytes())
    parsed = validate_safetensors_header(handmade)
    loaded = st.load(lora_bytes())
    assert {name: list(array.shape) for name, array in loaded.items()} == {
        name: entry["shape"] for name, entry in parsed.items() if name != "__metadata__"
    }
    for case, (make, _) in MALFORMED.items():
        if case in ("no tensors", "duplicate names"):
            continue  # the library loads these; a LoRA cache refuses them (empty / ambiguous)
        with pytest.raises(Exception):  # noqa: B017 - the library's own error types vary by case
            st.load(make())


def test_a_header_of_a_hundred_thousand_tensors_is_refused_by_its_count(tmp_path: Path) -> None:
    # Zero-size tensors cost the file nothing and a reader seconds and gigabytes each million.
    entry = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}
    path = tmp_path / "many.safetensors"
    path.write_bytes(_header({f"t{i}": entry for i in range(100_000)}))
    with pytest.raises(InvalidLora, match="more than 200000 names"):
        validate_safetensors_header(path, field=FIELD)


def test_names_from_the_file_are_cut_short_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(
        _header({"x" * 1_000_000: {"dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0")
    )
    with pytest.raises(InvalidLora) as info:
        validate_safetensors_header(path, field=FIELD)
    assert "xxx..." in info.value.message and len(info.value.message) < 400
