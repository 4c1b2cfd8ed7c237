"""SPEC §1: the command line, rules path resolution, --check, exit codes, log formats."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, connect, free_port, recv_exactly, tcp_rule

from gportmap import __version__


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gportmap", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write_rules(tmp_path: Path, content: object | str, name: str = "rules.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"gportmap {__version__}"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "rules").glob("*.json")))
def test_check_accepts_every_shipped_example(example: str) -> None:
    result = run_cli("--check", str(ROOT / "rules" / example))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    rules = json.loads((ROOT / "rules" / example).read_text())
    rules = rules["rules"] if isinstance(rules, dict) else rules
    assert len(lines) == len(rules) + 1
    assert lines[-1].endswith("valid")


def test_shipped_examples_listen_on_and_target_only_loopback() -> None:
    """rules/ holds runnable examples: none may open a port beyond this machine (a rule
    without listenHost listens on 0.0.0.0) nor send traffic anywhere else."""
    paths = sorted((ROOT / "rules").glob("*.json"))
    assert paths
    for path in paths:
        data = json.loads(path.read_text())
        for rule in data["rules"] if isinstance(data, dict) else data:
            assert rule["targetHost"] in ("127.0.0.1", "::1"), (path.name, rule)
            assert rule.get("listenHost") in ("127.0.0.1", "::1"), (path.name, rule)


def test_check_prints_one_line_per_rule_and_binds_nothing(tmp_path: Path) -> None:
    holder = socket.socket()  # the port is taken: --check must not care, it binds nothing
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    path = write_rules(
        tmp_path,
        [tcp_rule(port, 9, name="web"), tcp_rule(free_port(), 10, name="off", enabled=False)],
    )
    result = run_cli("--check", str(path))
    assert result.returncode == 0
    first, second, summary = result.stdout.splitlines()
    assert re.fullmatch(rf"web\s+tcp\s+127\.0\.0\.1:{port}\s+-> 127\.0\.0\.1:9\s+enabled", first)
    assert second.split()[0] == "off" and second.endswith("disabled")
    assert summary == f"{path}: 2 rule(s), valid"
    holder.close()


# Ten-plus different mistakes: each exits 2 and names file, JSON path and problem.
MISTAKES = [
    ("bad_json", '[{"protocol": "tcp",, }]', "invalid JSON at line 1, column 21"),
    ("empty", "", "the file is empty"),
    ("top_level", '"rules"', 'the file must be a list of rules or an object with "rules"'),
    ("wrong_type", [tcp_rule("80", 81)], "rules[0].listenPort: '80' is not a valid listenPort (a port from 1 to 65535, or a range \"A-B\")"),
    ("port_range", [tcp_rule(70000, 81)], "rules[0].listenPort: 70000 is greater than the maximum of 65535"),
    ("unknown_key", [{**tcp_rule(80, 81), "listenPrt": 80}], "rules[0].listenPrt: unknown key (did you mean 'listenPort'?)"),
    ("missing_key", [{"protocol": "tcp", "listenPort": 80, "targetHost": "127.0.0.1"}], "rules[0]: missing required key 'targetPort'"),
    ("duplicate_port", [tcp_rule(80, 81, name="a"), tcp_rule(80, 82, name="b")], "rules[1]: listen address 127.0.0.1:80 is already used by rules[0] ('a')"),
    ("duplicate_name", [tcp_rule(80, 81, name="a"), tcp_rule(90, 82, name="a")], "rules[1].name: 'a' is already used by rules[0]"),
    ("bad_protocol", [{**tcp_rule(80, 81), "protocol": "tpc"}], "rules[0].protocol: 'tpc' is not a supported protocol"),
    ("bad_host", [{**tcp_rule(80, 81), "targetHost": "http://example"}], "rules[0].targetHost: 'http://example' is not an IP address or host name"),
    ("negative_timeout", [{**tcp_rule(80, 81), "connectTimeout": 0}], "rules[0].connectTimeout: 0 must be greater than 0"),
    ("settings_key", {"settings": {"drainTimout": 1}, "rules": []}, "settings.drainTimout: unknown key (did you mean 'drainTimeout'?)"),
    ("bool_as_int", [{**tcp_rule(80, 81), "maxConnections": True}], "rules[0].maxConnections: true is not of type 'integer'"),
]


@pytest.mark.parametrize("content,expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_invalid_rules_exit_2_naming_file_path_and_problem(tmp_path: Path, content: object, expected: str) -> None:
    path = write_rules(tmp_path, content)
    checked = run_cli("--check", str(path))
    assert checked.returncode == 2
    assert f"{path}: {expected}" in checked.stderr, checked.stderr
    assert checked.stdout == ""


def test_invalid_rules_at_start_up_exit_2_with_config_invalid_event(tmp_path: Path) -> None:
    path = write_rules(tmp_path, [tcp_rule(70000, 81), {**tcp_rule(80, 81), "listenPrt": 1}])
    result = run_cli(str(path), "--log-format", "json")
    assert result.returncode == 2
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["event"] == "config_invalid"
    assert record["level"] == "ERROR"
    assert record["errors"] == [
        f"{path}: rules[0].listenPort: 70000 is greater than the maximum of 65535",
        f"{path}: rules[1].listenPrt: unknown key (did you mean 'listenPort'?)",
    ]


def test_invalid_rules_in_text_mode_list_every_error(tmp_path: Path) -> None:
    path = write_rules(tmp_path, [tcp_rule(70000, 81), tcp_rule(80, 0)])
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "config_invalid" in result.stderr
    assert f"  {path}: rules[0].listenPort: 70000 is greater than the maximum of 65535" in result.stderr
    assert f"  {path}: rules[1].targetPort: 0 is less than the minimum of 1" in result.stderr


def test_missing_rules_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("--check", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert f"{tmp_path / 'nope.json'}: cannot read: No such file or directory" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("--bogus",), ("--log-format", "xml"), ("--log-level", "LOUD"), ("a.json", "-c", "b.json")],
    ids=["unknown_flag", "bad_format", "bad_level", "two_paths"],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage: gportmap" in result.stderr


def _rules_dir(tmp_path: Path, name: str, rule_name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    write_rules(folder, [tcp_rule(free_port(), 9, name=rule_name)], "rules.json")
    return folder / "rules.json"


@pytest.mark.slow
def test_rules_path_resolution_order(tmp_path: Path) -> None:
    positional = _rules_dir(tmp_path, "positional", "from-positional")
    flag = _rules_dir(tmp_path, "flag", "from-flag")
    env_path = _rules_dir(tmp_path, "env", "from-env")
    default = tmp_path / "rules" / "rules.json"
    default.parent.mkdir()
    default.write_text(json.dumps([tcp_rule(free_port(), 9, name="from-default")]))

    def first_rule(*args: str, env: dict | None = None) -> str:
        result = run_cli("--check", *args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[0]

    env = {"CONFIG_PATH": str(env_path)}
    assert first_rule(str(positional), env=env) == "from-positional"
    assert first_rule("-c", str(flag), env=env) == "from-flag"
    assert first_rule("--config", str(flag), env=env) == "from-flag"
    assert first_rule(env=env) == "from-env"
    no_env = {k: v for k, v in os.environ.items() if k != "CONFIG_PATH"}
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check"], capture_output=True, text=True, cwd=tmp_path, env=no_env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "from-default"


def test_default_rules_in_the_working_directory_run(tmp_path: Path) -> None:
    """What the README's run command does: gportmap with no argument, in a checkout."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    env = {k: v for k, v in os.environ.items() if k != "CONFIG_PATH"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gportmap"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " started: " in line:
                break
        assert any("rule_started" in line or "rule_failed" in line for line in lines), lines
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_settings_choose_the_log_format_and_flags_override_them(tmp_path: Path, echo_target) -> None:
    port = free_port()
    rules = {"settings": {"logFormat": "json", "logLevel": "warning"}, "rules": [tcp_rule(port, echo_target.port)]}
    path = write_rules(tmp_path, rules)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gportmap", str(path), "--log-level", "DEBUG"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(proc.stderr.readline())  # JSON from settings.logFormat
        if first["event"] == "connections_capped":  # a machine whose ulimit -n is under ~20,000
            first = json.loads(proc.stderr.readline())
        assert first["level"] in ("DEBUG", "INFO")  # DEBUG from the flag beats settings' WARNING
        sock = connect(port)
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc.stderr.close()


@pytest.mark.slow
def test_text_log_format_is_one_readable_line_per_event(tmp_path: Path, echo_target) -> None:
    port = free_port()
    path = write_rules(tmp_path, [tcp_rule(port, echo_target.port, name="txt")])
    proc = subprocess.Popen([sys.executable, "-m", "gportmap", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stderr.readline()
        if " connections_capped: " in started:  # a machine whose ulimit -n is under ~20,000
            started = proc.stderr.readline()
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO rule_started: ", started), started
        assert f"rule=txt protocol=tcp listen=127.0.0.1:{port}" in started
        while " started: " not in (line := proc.stderr.readline()):
            assert line, "gportmap exited before it started"
        sock = connect(port)
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        sock.close()
        closed = proc.stderr.readline()
        assert " INFO connection_closed: connection closed rule=txt client=127.0.0.1:" in closed
        assert "bytes_received=5 bytes_sent=5" in closed and "reason=closed" in closed
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc.stderr.close()


# -- the test helpers' ports (tests/conftest.py) ----------------------------------------


def test_free_ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() -> None:
    """A port a test picks for gportmap cannot be taken meanwhile as the source port of
    some outgoing connection: the kernel draws those from the ephemeral range only."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_low for port in ports) or all(port > 60999 for port in ports)
    for port in ports[:20]:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.bind(("127.0.0.1", port))  # free for TCP and UDP alike


def test_an_admin_port_taken_before_gportmap_binds_it_is_picked_again(start_gportmap, echo_target, monkeypatch) -> None:
    """The race free_port() cannot close on its own: another program binds the port
    between the pick and gportmap's bind. The fixture sees admin_failed and starts
    gportmap again on another port."""
    import conftest

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    real_take = conftest._PORTS.take
    picks = iter([taken])
    monkeypatch.setattr(conftest._PORTS, "take", lambda: next(picks, None) or real_take())
    try:
        port = real_take()
        gp = start_gportmap([tcp_rule(port, echo_target.port)])
        assert gp.admin_port != taken
        assert gp.admin_json("/healthz")["status"] == "ok"
        with connect(port) as sock:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
    finally:
        blocker.close()


def test_start_up_imports_only_what_serving_needs() -> None:
    """A start pays for prometheus_client only at the first /metrics scrape (the
    admin tests scrape it), and gevent's monkeypatching looks its plugins up in one
    scan of the installed packages, with importlib.metadata left as it was."""
    probe = (
        "import sys\n"
        "from importlib import metadata\n"
        "real = metadata.entry_points\n"
        "calls = []\n"
        "def counted(**params):\n"
        "    calls.append(params)\n"
        "    return real(**params)\n"
        "metadata.entry_points = counted\n"
        "import gportmap.__main__\n"
        "import gevent.monkey\n"
        "print(json.dumps({'prometheus': 'prometheus_client' in sys.modules, 'scans': len(calls),\n"
        "    'restored': metadata.entry_points is counted, 'patched': gevent.monkey.is_module_patched('socket')}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "prometheus": False,
        "scans": 1,
        "restored": True,
        "patched": True,
    }
