import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_benchmark_run_writes_into_its_out_folder_only(tmp_path):
    """Protects the published results: a benchmarks/run.py run (its cheapest section, --quick) writes its
    JSON and Markdown into --out and leaves the tracked benchmarks/results/ as it was."""
    published = _tree(ROOT / "benchmarks" / "results")
    out = tmp_path / "bench"
    subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--sections", "kv-cache", "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "results.json"]
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] is True and [r["tokens"] for r in res["kv_cache"]] == [64, 256]
    assert all(r["cached_ms"] > 0 and r["recompute_ms"] > 0 for r in res["kv_cache"])
    assert "### KV cache" in (out / "RESULTS.md").read_text()
    assert _tree(ROOT / "benchmarks" / "results") == published
