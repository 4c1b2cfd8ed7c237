"""The comparison bench (bench/compare.py, issue 8) in its quick mode, so it never rots.

No speed threshold: the machine is shared. What must hold is that the bench measured:
every workload has a row for every proxy it compares, each with a positive number or
an explicit reason it was skipped, and no proxy failed to start or to carry traffic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

#: bench/run --quick takes 70-90 s: the slow tier (`pytest -m slow`, and .ci/run).
pytestmark = pytest.mark.slow

TCP = ["direct", "gportmap", "socat", "haproxy", "haproxy-splice", "nginx"]
UDP = ["direct", "gportmap", "socat", "nginx"]
TLS = ["gportmap", "haproxy", "nginx"]
EXPECTED = {
    "bulk_1": TCP,
    "bulk_8": TCP,
    "http_keepalive": TCP,
    "http_keepalive_p99": TCP,
    "http_close": TCP,
    "tls_keepalive": TLS,
    "tls_keepalive_cpu": TLS,
    "tls_close": TLS,
    "tls_close_cpu": TLS,
    "held_small_pss": TCP,
    "held_small_rss": TCP,
    "held_large_pss": TCP,
    "held_large_rss": TCP,
    "held_tls_pss": TLS,
    "held_tls_rss": TLS,
    "held_websocket_pss": ["gportmap", "websockify"],
    "held_websocket_rss": ["gportmap", "websockify"],
    "udp_1": UDP,
    "udp_50": UDP,
    "ws_64k": ["gportmap", "websockify"],
    "ws_32": ["gportmap", "websockify"],
    "w2_http_keepalive": ["gportmap", "haproxy", "nginx"],
    "w2_http_close": ["gportmap", "haproxy", "nginx"],
    "pool_close_1": ["gportmap", "haproxy"],
    "pool_close_3": ["gportmap", "haproxy"],
}
#: The only rows allowed to carry no number, and why.
STRUCTURAL_SKIPS = {
    ("held_small_pss", "direct"),
    ("held_small_rss", "direct"),
    ("held_large_pss", "direct"),
    ("held_large_rss", "direct"),
}
#: Skips that say a tool here was built without a feature (TLS rows only); allowed only
#: outside CI (GPORTMAP_REQUIRE_TOOLS unset): Debian's HAProxy and nginx have both.
BUILD_SKIPS = (
    "skipped: this nginx has no stream SSL module",
    "skipped: this HAProxy is built without OpenSSL",
)


def tools_required() -> bool:
    """Whether a missing tool or feature fails this run instead of skipping (CI)."""
    return os.environ.get("GPORTMAP_REQUIRE_TOOLS", "") not in ("", "0")


def run_quick(json_path: Path, timeout: float = 300) -> str:
    """bench/compare.py --quick; on a timeout it gets SIGTERM first, which it answers by
    stopping every process it started, then SIGKILL."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--json", str(json_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench/compare.py --quick ran past {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return out


@pytest.mark.timeout(390)
def test_quick_bench_measures_every_row(tmp_path: Path) -> None:
    for tool in ("socat", "haproxy", "nginx", "iperf3", "wrk"):
        require_tool(tool)
    pytest.importorskip("websockify")
    json_path = tmp_path / "bench.json"
    out = run_quick(json_path)
    document = json.loads(json_path.read_text())
    workloads = document["workloads"]
    assert document["quick"] is True
    assert set(workloads) == set(EXPECTED)
    problems = []
    for key, proxies in EXPECTED.items():
        results = workloads[key]["results"]
        assert set(results) == set(proxies), (key, sorted(results))
        for proxy in proxies:
            entry = results[proxy]
            if "skip" in entry:
                allowed = (key, proxy) in STRUCTURAL_SKIPS  # gportmap has --workers: w2_ rows measure
                built_without = proxy != "gportmap" and entry["skip"].startswith(BUILD_SKIPS)
                allowed = allowed or (built_without and not tools_required())
                if not (allowed and entry["skip"].startswith("skipped: ")):
                    problems.append(f"{key}/{proxy}: unexpected {entry['skip']}")
            elif not (isinstance(entry.get("value"), float | int) and entry["value"] > 0):
                problems.append(f"{key}/{proxy}: {entry.get('failed', entry)}")
    assert not problems, "\n".join(problems)
    # The Markdown table on stdout has a line per workload.
    for workload in workloads.values():
        assert f"| {workload['title']} |" in out
