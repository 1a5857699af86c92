"""Shared fixtures: the tiny random Chroma (written once per session) and engines over it.

Every test starts without ``CHROMA_*`` variables: tests pass settings as values, so a developer's
own environment never changes what a test sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_chroma_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CHROMA_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory):
    from worker.tiny import write_tiny_chroma

    return write_tiny_chroma(tmp_path_factory.mktemp("tiny-chroma"))


@pytest.fixture(scope="session")
def engine_factory(tiny_sources):
    """Engines by (quantization, dtype, text_padding), loaded once per session."""
    from worker.engine import Engine, EngineConfig

    engines: dict[tuple[str, str, str], Engine] = {}

    def get(quantization: str = "none", dtype: str = "float32", text_padding: str = "auto") -> Engine:
        key = (quantization, dtype, text_padding)
        if key not in engines:
            engine = Engine(
                EngineConfig(tiny_sources, quantization=quantization, dtype=dtype, text_padding=text_padding)
            )
            engine.load()
            engines[key] = engine
        return engines[key]

    return get


@pytest.fixture(scope="session")
def reference_factory(tiny_sources):
    from tests.reference import ReferenceChroma

    refs = {}

    def get(dtype):
        if dtype not in refs:
            refs[dtype] = ReferenceChroma(tiny_sources, dtype)
        return refs[dtype]

    return get


@pytest.fixture
def tiny_dir(tiny_sources) -> Path:
    return Path(tiny_sources.transformer).parent
