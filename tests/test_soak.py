"""benchmarks/soak.py (issue 19) runs end to end and writes its rows: a short run of
two attacks against the raw ZMTP delegate; nothing is asserted about the numbers."""

from __future__ import annotations

import json
import numbers
import subprocess

from tests.conftest import PY, REPO

NUMERIC = (
    "seconds", "quiet_seconds", "quiet_p50_us", "quiet_p99_us", "attack_p50_us",
    "attack_p99_us", "p50_ratio", "p99_ratio", "quiet_calls", "attack_calls",
    "attack_errors", "attack_timeouts", "rss_before_mib", "rss_end_mib", "hwm_end_mib",
    "hwm_growth_mib", "rss_growth_mib", "fds_before", "fds_end", "fds_peak", "fds_growth",
    "fds_peak_growth", "cpu_attack_s", "cpu_quiet_s", "cpu_quiet_scaled_s", "recovery_s",
    "recovery_cap_s",
)  # fmt: skip


def test_soak_runs_two_attacks_and_writes_json(tmp_path):
    out = tmp_path / "soak.json"
    argv = [PY, str(REPO / "benchmarks" / "soak.py"), "--seconds", "2", "--quiet-seconds", "1",
            "--attacks", "pings,silent", "--transport", "zmtp", "--clients", "1",
            "--json", str(out)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads(out.read_text())
    assert isinstance(report["host"], dict) and report["host"].get("hostname")
    rows = report["rows"]
    assert [(r["transport"], r["attack"]) for r in rows] == [("zmtp", "pings"), ("zmtp", "silent")]
    for r in rows:
        missing = [k for k in NUMERIC if k not in r]
        assert not missing, (r["attack"], missing)
        for k in NUMERIC:
            v = r[k]
            assert isinstance(v, numbers.Real) and not isinstance(v, bool), (r["attack"], k, v)
        for k in ("recovered", "delegate_alive"):
            assert isinstance(r[k], bool), (r["attack"], k)
        assert isinstance(r["attacker"], dict)
    # one table row per attack on stdout
    lines = res.stdout.splitlines()
    assert sum(line.startswith("zmtp ") for line in lines) == 2
