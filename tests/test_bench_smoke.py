"""bench/run.py end to end in --quick mode: it runs, prints its table and summary, writes JSON.

No figure is compared with a target here (timings depend on the machine); only the
halt-to-block count is asserted, because a request reaching upstream after the halt is
a correctness failure, not a slow machine.
"""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("direct", "dario")
ROWS = ("latency_p50_ms", "latency_p99_ms", "throughput_16_rps", "throughput_64_rps",
        "ttfb_chunked_ms", "ttfb_close_ms", "lag_chunked_ms", "lag_close_ms", "lag_max_ms",
        "coalesced_reads", "held_streams", "growth_throughput_1", "growth_bodies_5MB")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_prints_the_table_and_summary_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--no-nginx", "--runs", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("SUMMARY: ") and "targets met" in lines[-1]
    assert sum(1 for line in lines if line.startswith("SUMMARY:")) == 1
    header = next(line for line in lines if line.startswith("measurement"))
    for column in ("direct", "dario", "nginx", "target", "met"):
        assert column in header
    assert "latency p50" in done.stdout and "halt-to-block" in done.stdout

    result = json.loads(out.read_text())
    rows = result["rows"]
    for key in ROWS:
        for column in COLUMNS:
            assert is_number(rows[key][column]), (key, column, rows[key][column])
        assert rows[key]["nginx"] is None          # --no-nginx
    for key in ("halt_late", "startup_ms", "idle_rss_mb", "held_rss_after_mb"):
        assert is_number(rows[key]["dario"]), key
    assert result["summary"] == lines[-1]

    figures = result["figures"]
    halt = figures["halt"]
    assert halt["runs"] == 2 and len(halt["per_run"]) == 2
    assert halt["late_total"] == 0                 # correctness, not timing
    assert halt["sent_after_total"] > 0 and halt["blocked_after_total"] == halt["sent_after_total"]
    for section in ("latency", "throughput", "streams", "bodies", "held"):
        assert set(figures[section]) == {"direct", "dario"}, section
    assert is_number(figures["startup"]["startup_ms"])
