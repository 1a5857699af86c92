"""The compile cache is keyed by everything compiled code depends on, and checked before use."""

from __future__ import annotations

import json
import os

import pytest
import torch

from worker import compile_cache

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_env(monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


def test_the_key_changes_with_each_version_it_depends_on():
    base = compile_cache.versions(CPU)
    assert set(base) == {"torch", "triton", "cuda", "device", "capability", "python", "code"}
    keys = {compile_cache.compile_key(base)}
    for name in base:
        keys.add(compile_cache.compile_key({**base, name: base[name] + "-other"}))
    assert len(keys) == len(base) + 1


def test_activate_points_both_caches_at_the_keyed_folder(tmp_path):
    cache = compile_cache.activate(tmp_path, CPU)
    assert cache.folder == tmp_path / cache.key and not cache.warm
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.folder / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache.folder / "triton")
    assert json.loads((cache.folder / "manifest.json").read_text()) == cache.manifest


def test_a_finished_warm_up_makes_the_next_start_warm(tmp_path):
    first = compile_cache.activate(tmp_path, CPU)
    (first.folder / compile_cache.ARTIFACTS).write_bytes(b"artifacts")
    assert compile_cache.activate(tmp_path, CPU).warm


def test_a_folder_of_other_versions_under_the_key_is_never_used(tmp_path):
    first = compile_cache.activate(tmp_path, CPU)
    (first.folder / compile_cache.ARTIFACTS).write_bytes(b"artifacts of another torch")
    (first.folder / "manifest.json").write_text(json.dumps({**first.manifest, "torch": "0.0"}))
    again = compile_cache.activate(tmp_path, CPU)
    assert not again.warm and not (again.folder / compile_cache.ARTIFACTS).exists()


def test_old_keys_are_pruned(tmp_path):
    for n in range(compile_cache.KEYS_KEPT + 2):
        old = tmp_path / f"old{n}"
        old.mkdir()
        (old / "manifest.json").write_text("{}")
    compile_cache.activate(tmp_path, CPU)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == compile_cache.KEYS_KEPT


@pytest.mark.parametrize(
    "uri, bucket, key",
    [
        ("s3://cache", "cache", "k.bin"),
        ("s3://cache/", "cache", "k.bin"),
        ("s3://cache/compile/v1/", "cache", "compile/v1/k.bin"),
    ],
)
def test_remote_artifacts_live_under_the_prefix_by_key(uri, bucket, key):
    assert compile_cache.remote_artifacts(uri, "k") == (bucket, key)
