"""SPEC §10: ``gportmap ctl`` against a running gportmap, every command and its exit
code (0 done, 2 refused, 1 anything else)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOOPBACK, connect, echoes, free_port, recv_exactly, refused, tcp_rule, wait_for

from gportmap import ctl as ctl_module

DONE, OTHER, REFUSED = 0, 1, 2


def ctl(
    *args: str, stdin: str | None = None, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("GPORTMAP_TOKEN", "CONFIG_PATH")}
    return subprocess.run(
        [sys.executable, "-m", "gportmap", "ctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
        cwd=cwd,
    )


def on_disk(gp) -> dict[str, dict]:
    return {rule["name"]: rule for rule in json.loads(gp.rules_path.read_text())["rules"]}




@pytest.mark.slow
def test_every_command_and_its_exit_code(start_gportmap, echo_target, tmp_path):
    web_port = free_port()
    gp = start_gportmap(
        {"settings": {"drainTimeout": 5}, "rules": [tcp_rule(web_port, echo_target.port, name="web")]}
    )
    admin = ("--admin", f"{LOOPBACK}:{gp.admin_port}")

    status = ctl(*admin, "status")
    assert status.returncode == DONE, status.stderr
    lines = status.stdout.splitlines()
    assert lines[1].split()[:3] == ["RULE", "STATE", "PROTOCOL"]
    assert lines[2].split()[:4] == ["web", "running", "tcp", f"127.0.0.1:{web_port}"]

    rules = ctl(*admin, "rules")
    assert rules.returncode == DONE
    assert rules.stdout.splitlines()[1].split() == [
        "web",
        "tcp",
        f"127.0.0.1:{web_port}",
        f"127.0.0.1:{echo_target.port}",
        "yes",
    ]
    etag = rules.stdout.splitlines()[-1].removeprefix("etag: ")

    got = ctl(*admin, "get", "web")
    assert got.returncode == DONE and json.loads(got.stdout) == tcp_rule(
        web_port, echo_target.port, name="web"
    )
    assert ctl(*admin, "get", "nope").returncode == OTHER

    # add from a file, then from standard input; --dry-run first changes nothing
    added_port, stdin_port = free_port(), free_port()
    rule_file = tmp_path / "added.json"
    rule_file.write_text(json.dumps(tcp_rule(added_port, echo_target.port, name="added")))
    text = gp.rules_path.read_bytes()
    plan = ctl(*admin, "add", str(rule_file), "--dry-run")
    assert plan.returncode == DONE and plan.stdout.startswith("dry run, nothing changed: added added;")
    assert f"listeners opened: 127.0.0.1:{added_port}/tcp (added)" in plan.stdout
    assert gp.rules_path.read_bytes() == text and refused(added_port)
    add = ctl(*admin, "add", str(rule_file))
    assert add.returncode == DONE and add.stdout.startswith("rule added added: added added;"), add.stdout
    assert echoes(added_port)
    stdin_rule = json.dumps(tcp_rule(stdin_port, echo_target.port, name="piped"))
    assert ctl(*admin, "add", "-", stdin=stdin_rule).returncode == DONE
    assert echoes(stdin_port)
    again = ctl(*admin, "add", str(rule_file))
    assert again.returncode == REFUSED and "error 409: a rule named 'added' exists already" in again.stderr
    invalid = ctl(*admin, "add", "-", stdin=json.dumps(tcp_rule(70000, 1, name="bad")))
    assert (
        invalid.returncode == REFUSED
        and "rules[3].listenPort: 70000 is greater than the maximum" in invalid.stderr
    )
    assert ctl(*admin, "add", "-", stdin="{not json").returncode == REFUSED

    # set, patch, disable, enable
    moved = free_port()
    (tmp_path / "moved.json").write_text(json.dumps(tcp_rule(moved, echo_target.port)))
    assert ctl(*admin, "set", "added", str(tmp_path / "moved.json")).returncode == DONE
    assert on_disk(gp)["added"] == {"name": "added", **tcp_rule(moved, echo_target.port)}
    assert echoes(moved) and refused(added_port)
    patched = ctl(*admin, "patch", "added", '{"idleTimeout": 7}', "--json")
    assert patched.returncode == DONE and json.loads(patched.stdout)["rule"]["idleTimeout"] == 7
    assert ctl(*admin, "patch", "added", "{oops").returncode == REFUSED
    assert ctl(*admin, "disable", "web").returncode == DONE
    assert refused(web_port) and on_disk(gp)["web"]["enabled"] is False
    assert ctl(*admin, "enable", "web").returncode == DONE
    assert echoes(web_port)
    stale = ctl(*admin, "disable", "web", "--if-match", etag)
    assert stale.returncode == REFUSED and "error 412" in stale.stderr

    # connections: one held open through web
    with connect(web_port) as held:
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        wait_for(lambda: "web" in ctl(*admin, "connections").stdout, what="the connection listed")
        table = ctl(*admin, "connections")
        assert table.returncode == DONE and table.stdout.split()[:7] == [
            "ID",
            "RULE",
            "CLIENT",
            "TARGET",
            "STARTED",
            "RECEIVED",
            "SENT",
        ]
        assert json.loads(ctl(*admin, "connections", "--json").stdout)[0]["rule"] == "web"
        drain = ctl(*admin, "rm", "web", "--dry-run")
        assert drain.returncode == DONE and "connections to drain: web 1" in drain.stdout

    # rm, reload
    assert ctl(*admin, "rm", "piped").returncode == DONE
    assert "piped" not in on_disk(gp) and refused(stdin_port)
    assert ctl(*admin, "rm", "piped").returncode == OTHER
    reload = ctl(*admin, "reload")
    assert reload.returncode == DONE and reload.stdout.startswith(
        "reloaded: added -; changed -; removed -; unchanged 2"
    )
    assert ctl(*admin, "reload", "--dry-run").returncode == DONE
    gp.rules_path.write_text('{"rules": [{"protocol": "tcp"}]}')
    broken = ctl(*admin, "reload")
    assert broken.returncode == REFUSED and "missing required key 'listenPort'" in broken.stderr


@pytest.mark.slow
def test_the_address_and_the_token_come_from_where_the_server_finds_them(
    start_gportmap, echo_target, tmp_path
):
    token = "ctl-token"
    gp = start_gportmap(
        {
            "settings": {"admin": {"token": token}},
            "rules": [tcp_rule(free_port(), echo_target.port, name="web")],
        }
    )
    # a rules file naming the endpoint, found by $CONFIG_PATH as the server would find it
    other = tmp_path / "other"
    (other / "rules").mkdir(parents=True)
    found = {"settings": {"admin": {"listen": f"{LOOPBACK}:{gp.admin_port}"}}, "rules": []}
    (other / "rules" / "rules.json").write_text(json.dumps(found))
    no_token = ctl("status", cwd=other)
    assert no_token.returncode == OTHER and "error 401" in no_token.stderr
    assert ctl("status", "--token", token, cwd=other).returncode == DONE
    assert ctl("status", env={"GPORTMAP_TOKEN": token}, cwd=other).returncode == DONE
    secret = tmp_path / "secret"
    secret.write_text(token + "\n")  # a mounted secret, as settings.admin.tokenFile reads it
    assert ctl("status", "--token-file", str(secret), cwd=other).returncode == DONE
    assert ctl("status", env={"GPORTMAP_TOKEN_FILE": str(secret)}, cwd=other).returncode == DONE
    secret.write_text("")
    empty = ctl("status", "--token-file", str(secret), cwd=other)
    assert empty.returncode == REFUSED and f"the token file {secret} is empty" in empty.stderr
    missing = ctl("status", "--token-file", str(tmp_path / "nowhere"), cwd=other)
    assert missing.returncode == REFUSED and "cannot read the token file" in missing.stderr
    (tmp_path / "elsewhere.json").write_text(json.dumps(found))
    assert (
        ctl(
            "rules", env={"GPORTMAP_TOKEN": token, "CONFIG_PATH": str(tmp_path / "elsewhere.json")}
        ).returncode
        == DONE
    )
    assert ctl("-c", str(tmp_path / "elsewhere.json"), "--token", token, "get", "web").returncode == DONE


def test_unreachable_is_1_and_the_server_command_line_is_untouched(tmp_path, echo_target):
    down = ctl("--admin", f"{LOOPBACK}:{free_port()}", "status")
    assert down.returncode == OTHER and "cannot reach gportmap" in down.stderr
    assert ctl("--admin", "nonsense", "status").returncode == REFUSED
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([tcp_rule(free_port(), echo_target.port, name="web")]))
    check = subprocess.run(
        [sys.executable, "-m", "gportmap", str(rules), "--check"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stdout.startswith("web")


def test_the_rules_table_shows_a_pools_targets() -> None:
    """A pool rule has no targetHost/targetPort: its TARGET column lists the pool's
    addresses (a backup marked ``*``), not an empty ":"."""
    out = io.StringIO()
    rules = {
        "rules": [
            {"name": "pool", "protocol": "tcp", "listenPort": 9001,
             "targets": [{"host": "127.0.0.1", "port": 8001}, {"host": "::1", "port": 8002, "backup": True}]},
            {"name": "one", "protocol": "tcp", "listenPort": 9002, "targetHost": "127.0.0.1", "targetPort": 8003},
        ]
    }
    ctl_module._show_rules(rules, '"1"', out)
    lines = {line.split()[0]: line.split() for line in out.getvalue().splitlines() if line.strip()}
    assert lines["pool"][3] == "127.0.0.1:8001,[::1]:8002*"
    assert lines["one"][3] == "127.0.0.1:8003"
