#!/usr/bin/env python3
"""Where gportmap's time goes on the new-connection path (issue 23): HTTP with a new
connection per request (wrk ``Connection: close``) through one tcp rule to an nginx
backend, profiled two ways, beside HAProxy (mode tcp, one thread) on the same traffic.

1. System calls per connection: ``strace -c -f`` attached to the proxy while wrk
   runs, the counts divided by the requests wrk completed (each request is one
   client connection and one target connection). strace slows the traced proxy
   several-fold, so its rate here means nothing; the counts per connection do.
2. Python, top-down: ``py-spy record --format raw`` (collapsed stacks) on the
   untraced gportmap, summed into each function's inclusive share (samples in which
   it is on the stack) and self share (samples in which it is the innermost frame)
   of the samples py-spy took while gportmap was busy (idle waits dropped).

    python bench/profile_newconn.py --seconds 5 --json /tmp/profile.json
    python bench/profile_newconn.py --log-level INFO      # the default level's cost
    # before and after, in the same minutes: the last commit in a worktree beside
    git worktree add /var/tmp/old HEAD
    python bench/profile_newconn.py --log-level WARNING,INFO --old /var/tmp/old --rounds 7
    # the C engine against the Python relay, same code, same turns
    python bench/profile_newconn.py --baseline-env GPORTMAP_PUMP=off --rounds 7

Every gportmap (one per level, and per tree with ``--old``) and HAProxy take turns
in each round, and the report gives each pair's ratio round by round (new over
old, INFO over WARNING, each over HAProxy): on a shared machine the load of the
moment moves every absolute figure by ±20 %, a ratio of two runs seconds apart
much less.

Needs wrk, nginx, strace, haproxy (its rows are skipped without it) and py-spy
(``pip install py-spy``; ``--py-spy PATH``). Everything runs on 127.0.0.1; every
process started is stopped with its process group on every path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
import loads  # noqa: E402
from anchors import MAX_CONNECTIONS, Processes  # noqa: E402
from common import LOOPBACK  # noqa: E402

#: wrk's concurrent connections while profiling (fewer than compare.py's 100: the
#: traced proxy is slow, and wrk's 5 s timeout must not fire).
CONNECTIONS = 20
#: wrk's connections in the py-spy run (untraced: compare.py's count).
UNTRACED_CONNECTIONS = 100
#: Untraced rounds of the user/system CPU split, each proxy once per round.
SPLIT_ROUNDS = 3
#: Frames whose share the report lists.
TOP = 25


def start_nginx(procs: Processes, workdir: Path) -> int:
    confdir = workdir / "backend"
    confdir.mkdir()
    port = anchors.free_port()
    (confdir / "nginx.conf").write_text(anchors.nginx_http_config(confdir, port))
    proc = procs.start("backend", ["nginx", "-p", str(confdir), "-c", str(confdir / "nginx.conf"),
                                   "-e", str(confdir / "error.log")])  # fmt: skip
    anchors.wait_tcp_listening(port, proc)
    return port


#: ``python -m gportmap`` from the tree first on PYTHONPATH: an editable install's
#: finder (a meta path hook) would otherwise load this checkout whatever the path says.
FROM_PATH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
             "repr(f).lower()]; sys.argv[0] = 'gportmap'; runpy.run_module('gportmap', run_name='__main__', "
             "alter_sys=True)")  # fmt: skip


def start_gportmap(
    procs: Processes,
    workdir: Path,
    target: int,
    level: str,
    tree: Path | None = None,
    label: str = "gportmap",
    extra_env: dict[str, str] | None = None,
) -> anchors.Proxy:
    """gportmap with one tcp rule, admin and watcher off, at ``level`` (logging to a
    file). ``tree``: run the package from that source tree instead (another
    checkout, e.g. a ``git worktree`` of the last commit: old and new code measured
    in the same minutes). ``extra_env``: set for this gportmap only (e.g.
    ``GPORTMAP_PUMP=off``: the same code on its Python relay)."""
    port = anchors.free_port()
    rules = {
        "settings": {"admin": False, "watch": False, "statsInterval": 0, "logLevel": level,
                     "maxConnections": MAX_CONNECTIONS},
        "rules": [{"protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
                   "targetPort": target, "maxConnections": MAX_CONNECTIONS}],
    }  # fmt: skip
    path = workdir / f"{label}-{level}.json"
    path.write_text(json.dumps(rules))
    # Both sides started alike (``-m gportmap``), from their tree: this checkout's by
    # default. Not from this directory: ``-m`` puts the working directory first on
    # the path, before PYTHONPATH, and every side would run this checkout.
    command = [sys.executable, "-c", FROM_PATH]
    env = {**os.environ, "PYTHONPATH": str(tree or Path(__file__).resolve().parent.parent), **(extra_env or {})}
    proc = procs.start(f"{label}-{level}", [*command, str(path), "--admin", "off", "--log-level", level],
                       env=env, cwd=workdir)  # fmt: skip
    anchors.wait_tcp_listening(port, proc)
    return anchors.Proxy("gportmap", port, proc)


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far (a single-process proxy)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / loads.CLOCK_TICKS, int(fields[12]) / loads.CLOCK_TICKS


def cpu_split(pid: int, port: int, seconds: int, close: bool = True) -> dict:
    """Untraced: the proxy's user and system CPU per new connection, apart (Python and
    the interpreter run in user time; system calls and the kernel's TCP in system)."""
    user0, system0 = user_system(pid)
    result = loads.wrk_http(port, seconds, UNTRACED_CONNECTIONS, close=close)
    user1, system1 = user_system(pid)
    requests = result["requests"]
    return {
        "requests": requests,
        "rate": result["rate"],
        "user_us": (user1 - user0) * 1e6 / requests,
        "system_us": (system1 - system0) * 1e6 / requests,
    }


def strace_counts(pid: int, port: int, seconds: int, workdir: Path, close: bool = True) -> dict:
    """``strace -c -f`` on ``pid`` while wrk makes new connections through ``port``:
    calls per syscall, in all and per connection."""
    out = workdir / f"strace-{pid}.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        time.sleep(0.5)  # attached (strace prints nothing when it is; a short wait, bounded)
        if tracer.poll() is not None:
            raise RuntimeError(f"strace exited: {tracer.stderr.read().decode(errors='replace')[-300:]}")
        result = loads.wrk_http(port, seconds, CONNECTIONS, close=close)
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches and writes the summary
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
        tracer.stderr.close()
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    requests = result["requests"]
    return {
        "requests": requests,
        "calls": calls,
        "per_connection": {name: n / requests for name, n in sorted(calls.items(), key=lambda kv: -kv[1])},
        "total_per_connection": sum(calls.values()) / requests,
    }


def py_spy_profile(
    py_spy: str, pid: int, port: int, seconds: int, workdir: Path, keep: Path | None = None, close: bool = True
) -> dict:
    """py-spy's collapsed stacks of ``pid`` while wrk makes new connections through
    ``port``: each function's inclusive and self share of the busy samples."""
    out = workdir / f"py-spy-{pid}.txt"
    spy = subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(seconds + 1), "-r", "250",
                            "--format", "raw", "-o", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        time.sleep(0.5)
        if spy.poll() is not None:
            raise RuntimeError(f"py-spy exited: {spy.stderr.read().decode(errors='replace')[-300:]}")
        result = loads.wrk_http(port, seconds, UNTRACED_CONNECTIONS, close=close)
    finally:
        try:
            spy.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        spy.stderr.close()
    if keep is not None:
        shutil.copyfile(out, keep)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        raw_frames = stack.split(";")  # outermost first: [0] is where its thread started
        frames = [short(frame) for frame in raw_frames]
        n = int(count)
        total += n
        threads[frames[0]] += n
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
            own_lines[short(raw_frames[-1], line=True)] += n
    return {
        "requests": result["requests"],
        "rate": result["rate"],
        "samples": total,
        "inclusive": {f: n / total for f, n in inclusive.most_common(TOP)} if total else {},
        "self": {f: n / total for f, n in own.most_common(TOP)} if total else {},
        # The line of the innermost Python frame: which call (often a system call
        # made from C, which py-spy counts to the Python line that made it).
        "self_lines": {f: n / total for f, n in own_lines.most_common(TOP)} if total else {},
        # By the outermost frame, which says the thread: the hub, the log writer.
        "threads": {name: n / total for name, n in threads.most_common(5)} if total else {},
    }


def short(frame: str, line: bool = False) -> str:
    """``function (path/to/module.py:123)`` -> ``module.py:function``: a frame per
    function, whichever line of it was running (``line``: ``module.py:function:123``)."""
    match = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not match:
        return frame
    function, path, number = match.groups()
    parts = Path(path).parts
    if "gportmap" in parts:
        path = "/".join(parts[parts.index("gportmap") :])
    else:
        path = Path(path).name
    return f"{path}:{function}" + (f":{number}" if line else "")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="length of each traced run (1-30)")
    parser.add_argument("--log-level", default="WARNING",
                        help="gportmap's log level, or several comma-separated (WARNING,INFO): one "
                             "gportmap per level, measured in turns")  # fmt: skip
    parser.add_argument("--old", type=Path,
                        help="also run the package from this source tree (a worktree of the last "
                             "commit), at every level, in the same turns: before and after")  # fmt: skip
    parser.add_argument("--baseline-env", metavar="NAME=VALUE", action="append", default=[],
                        help="also run this checkout with these environment variables as the baseline "
                             "(e.g. GPORTMAP_PUMP=off), in the same turns; with --old, the old tree "
                             "gets them")  # fmt: skip
    parser.add_argument("--keep-alive", action="store_true",
                        help="profile keep-alive requests (wrk without Connection: close) instead of a "
                             "new connection per request: the figures are then per request")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=SPLIT_ROUNDS, help="untraced rounds of the CPU split (1-9)")
    parser.add_argument("--no-trace", action="store_true", help="the CPU split only (no strace, no py-spy)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or anchors._venv_script("py-spy") or "",
                        help="the py-spy program")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every count and share here")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    seconds = max(1, min(args.seconds, 30))
    rounds = max(1, min(args.rounds, 9))
    levels = [level.strip().upper() for level in args.log_level.split(",") if level.strip()]
    baseline_env = dict(item.split("=", 1) for item in args.baseline_env if "=" in item)
    for tool in ("wrk", "nginx", "strace"):
        if anchors._venv_script(tool) is None:
            print(f"profile_newconn: {tool} is not installed", file=sys.stderr)
            return 2
    close = not args.keep_alive
    report: dict[str, object] = {"seconds": seconds, "log_level": ",".join(levels), "rounds": rounds,
                                 "unit": "connection" if close else "keep-alive request"}  # fmt: skip
    anchors.raise_fd_soft_limit()
    with tempfile.TemporaryDirectory(prefix="gportmap-profile-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            backend = start_nginx(procs, workdir)
            # Every proxy measured, by the label its rows carry.
            proxies: dict[str, anchors.Proxy] = {}
            for level in levels:
                proxies[f"gportmap {level}"] = start_gportmap(procs, workdir, backend, level)
                if args.old is not None or baseline_env:
                    proxies[f"old {level}"] = start_gportmap(procs, workdir, backend, level, args.old, "old",
                                                             baseline_env)  # fmt: skip
            if anchors.missing_tool("haproxy") is None:
                proxies["haproxy"] = anchors.start_proxy(procs, workdir, "haproxy", backend)
            for proxy in proxies.values():
                loads.wrk_http(proxy.port, 1, CONNECTIONS, close=True)  # warm up
            cpu: dict[str, list[dict]] = {name: [] for name in proxies}
            for _ in range(rounds):  # taking turns: the load of the moment hits every proxy
                for name, proxy in proxies.items():
                    cpu[name].append(cpu_split(proxy.proc.pid, proxy.port, seconds, close))
            report["cpu"] = cpu
            if not args.no_trace:
                report["strace"] = {
                    name: strace_counts(proxy.proc.pid, proxy.port, seconds, workdir, close)
                    for name, proxy in proxies.items()
                }
                first = proxies[f"gportmap {levels[0]}"]
                if args.py_spy and os.path.exists(args.py_spy):
                    report["py_spy"] = py_spy_profile(
                        args.py_spy, first.proc.pid, first.port, seconds, workdir, args.raw, close
                    )
                else:
                    print(
                        "profile_newconn: py-spy not found (pip install py-spy; --py-spy PATH)", file=sys.stderr
                    )
        finally:
            procs.stop_all()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def paired_ratios(cpu: dict[str, list[dict]], a: str, b: str) -> tuple[list[float], list[float]]:
    """``a`` over ``b`` in each round (measured within seconds of each other: a
    shared machine's load of the moment cancels out better than in the medians)."""
    total = [(x["user_us"] + x["system_us"]) / (y["user_us"] + y["system_us"]) for x, y in zip(cpu[a], cpu[b])]
    rate = [x["rate"] / y["rate"] for x, y in zip(cpu[a], cpu[b])]
    return total, rate


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def print_report(report: dict) -> None:
    cpu = report.get("cpu") or {}
    if cpu:
        print(f"Proxy CPU per {report.get('unit', 'connection')}, untraced (wrk -c{UNTRACED_CONNECTIONS}, median of "
              f"{report['rounds']} rounds taken in turns, [min-max])")  # fmt: skip
        print("| proxy | user µs | system µs | total µs | per second |\n| --- | --- | --- | --- | --- |")
        for name, runs in cpu.items():
            cells = []
            for key in ("user_us", "system_us", "total_us", "rate"):
                values = [run[key] if key != "total_us" else run["user_us"] + run["system_us"] for run in runs]
                digits = 0 if key == "rate" else 1
                cells.append(f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-"
                             f"{max(values):.{digits}f}]")  # fmt: skip
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
        pairs = [(f"gportmap {level}", f"old {level}") for level in report["log_level"].split(",")]
        levels = report["log_level"].split(",")
        if len(levels) > 1:
            pairs += [(f"{tree} {level}", f"{tree} {levels[0]}") for tree in ("gportmap", "old") for level in levels[1:]]
        pairs += [(f"{tree} {level}", "haproxy") for tree in ("gportmap", "old") for level in levels]
        ratios = [(a, b, paired_ratios(cpu, a, b)) for a, b in pairs if a in cpu and b in cpu]
        if ratios:
            print("Paired ratios, round by round (median [min-max]): total CPU per unit, and rate")
            print("| this | over that | CPU | rate |\n| --- | --- | --- | --- |")
            for a, b, (cpu_ratios, rate_ratios) in ratios:
                print(f"| {a} | {b} | {spread(cpu_ratios)} | {spread(rate_ratios)} |")
            print()
    traces = report.get("strace") or {}
    if traces:
        print(f"System calls per {report.get('unit', 'connection')} (strace -c -f, wrk -c{CONNECTIONS} Connection: close)")
        labels = list(traces)
        print("| syscall | " + " | ".join(labels) + " |\n|" + " --- |" * (len(labels) + 1))
        names: list[str] = []
        for trace in traces.values():
            names += [n for n in trace["per_connection"] if n not in names]
        for name in names:
            row = [traces[label]["per_connection"].get(name, 0.0) for label in labels]
            if max(row) >= 0.05:
                print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        print("| **total** | " + " | ".join(f"**{traces[label]['total_per_connection']:.1f}**" for label in labels)
              + " |")  # fmt: skip
    spy = report.get("py_spy")
    if spy:
        print(
            f"\npy-spy, {spy['samples']} busy samples, {spy['requests']} connections at {spy['rate']:.0f}/s"
        )
        print("| function | inclusive | self |\n| --- | --- | --- |")
        for frame, share in spy["inclusive"].items():
            print(f"| {frame} | {share:.1%} | {spy['self'].get(frame, 0.0):.1%} |")
        print(
            "\nby thread (its outermost frame): "
            + ", ".join(f"{name} {share:.1%}" for name, share in spy["threads"].items())
        )
        print("\nself time by line, top:")
        for frame, share in spy["self_lines"].items():
            print(f"  {share:6.1%}  {frame}")


if __name__ == "__main__":
    sys.exit(main())
