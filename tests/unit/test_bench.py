"""The benchmark's code paths on the tiny model and the CPU (the card runs the same code at full size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--scale",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def test_every_cpu_section_runs_and_reports(tmp_path):
    res = run_bench(tmp_path)
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    assert not errors, errors
    assert res["reference_median_s"] > 0
    assert res["switch_recompiles"] == 0 and res["variants"]["resident_max"] >= 1
    assert res["e2e"]["size"] == [64, 64] and (tmp_path / "out" / "e2e.png").stat().st_size > 0
    assert res["new_size_and_length"]["new_graphs"] == 0
    assert {"eager_drop_s", "eager_drop_batch_s", "eager_drop_batch_working_s"} <= res.keys()
    assert res["preview"]["median_s"] > 0 and res["preview"]["new_multiplier"]["new_graphs"] == 0
    assert 0 < res["preview"]["per_forward_rel"]["cond"] < 1 and res["preview"]["image_psnr_db"] > 0
    assert "skipped_for_time" not in res


def test_sections_that_would_end_after_the_deadline_are_skipped_and_listed(tmp_path):
    res = run_bench(tmp_path, "--deadline", "1")
    assert res["warmup_s"] >= 0, "the warm-up always runs"
    assert res["skipped_for_time"] == ["reference", "preview", "switch", "e2e", "new_shapes", "ladder"]
    assert ["skipped to end by --deadline", "reference,preview,switch,e2e,new_shapes,ladder"] in res["table"]
