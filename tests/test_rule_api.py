"""SPEC §10: the rule API end to end, gportmap as a subprocess.

Each write is checked three ways: the answer, the rules file on disk afterwards
(parsed, and byte for byte where nothing may change), and the traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LOOPBACK,
    Gportmap,
    connect,
    echoes,
    free_port,
    recv_exactly,
    refused,
    require_tool,
    tcp_rule,
    wait_for,
)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int
    data: Any
    headers: dict[str, str]


def api(
    gp: Gportmap,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    """One request to the admin endpoint, its JSON answer parsed."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(f"http://{LOOPBACK}:{gp.admin_port}{path}", data=data, method=method)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=30) as response:
            status, raw, reply_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, reply_headers = error.code, error.read(), dict(error.headers)
    return Reply(status, json.loads(raw) if raw.strip() else None, reply_headers)


def document(*rules: dict, **settings: Any) -> dict:
    return {"settings": {"drainTimeout": 10, **settings}, "rules": list(rules)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_disk(gp: Gportmap) -> dict[str, dict]:
    """The rules of the file as it is now, by name."""
    data = json.loads(gp.rules_path.read_bytes())
    rules = data["rules"] if isinstance(data, dict) else data
    return {rule.get("name") or f"{rule['protocol']}-{rule['listenPort']}": rule for rule in rules}




def stats(gp: Gportmap) -> dict:
    return gp.admin_json("/stats")


def running(gp: Gportmap) -> dict[str, str]:
    return {rule["name"]: rule["state"] for rule in stats(gp)["rules"]}


class WrappedGportmap(Gportmap):
    """gportmap started through a wrapper command: a mount namespace, a capability
    dropped. (``Gportmap`` with ``prefix`` in front of its command.)"""

    def __init__(self, tmp_path: Path, rules_path: Path, prefix: list[str]) -> None:
        self.rules_path = rules_path
        self.log_path = tmp_path / "gportmap.log"
        self._log = open(self.log_path, "wb")
        self._records: list[dict] = []
        self._offset = 0
        self.admin_port = free_port()
        cmd = [*prefix, sys.executable, "-m", "gportmap", str(rules_path), "--log-format", "json"]
        cmd += ["--admin", f"{LOOPBACK}:{self.admin_port}"]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path
        )


@pytest.fixture
def wrapped(tmp_path: Path):
    started: list[Gportmap] = []

    def start(rules_path: Path, prefix: list[str]) -> Gportmap:
        gp = WrappedGportmap(tmp_path, rules_path, prefix)
        started.append(gp)
        gp.wait_started()
        return gp

    yield start
    for gp in started:
        gp.close()


# -- reading ---------------------------------------------------------------------------


def test_get_serves_the_rules_as_written_with_the_files_digest(start_gportmap, echo_target):
    rules = [tcp_rule(free_port(), echo_target.port, name="web"), tcp_rule(free_port(), echo_target.port)]
    gp = start_gportmap(document(*rules, watch=False))
    reply = api(gp, "GET", "/rules")
    assert reply.status == 200
    assert reply.data == {"settings": {"drainTimeout": 10, "watch": False}, "rules": rules}, (
        "as written: no defaults"
    )
    assert reply.headers["ETag"] == f'"{sha256(gp.rules_path)}"'
    default_name = f"tcp-{rules[1]['listenPort']}"
    assert api(gp, "GET", f"/rules/{default_name}").data == rules[1]
    assert api(gp, "GET", "/rules/web").headers["ETag"] == reply.headers["ETag"]
    assert api(gp, "GET", "/rules/nope").status == 404
    assert api(gp, "PUT", "/rules").status == 405


# -- each verb end to end -------------------------------------------------------------------


def test_post_adds_a_rule_that_forwards_and_the_watcher_does_not_apply_it_again(start_gportmap, echo_target):
    """A write is applied once: its digest is recorded as seen, so the watcher's event
    for the rename finds nothing new. Without that, the watcher applied the same
    version a second time (generation +2)."""
    web = tcp_rule(free_port(), echo_target.port, name="web")
    gp = start_gportmap(document(web))
    before_text = gp.rules_path.read_text()
    before = stats(gp)["config"]
    port = free_port()
    added = tcp_rule(port, echo_target.port, name="added")
    reply = api(gp, "POST", "/rules", added)
    assert reply.status == 201, reply.data
    assert echoes(port, b"hello"), "the answer comes after the apply"
    assert reply.data["changes"] == {"added": ["added"], "changed": [], "removed": [], "unchanged": ["web"]}
    assert reply.data["etag"] == sha256(gp.rules_path) and reply.headers["ETag"] == f'"{reply.data["etag"]}"'
    assert reply.headers["Location"] == "/rules/added"
    assert on_disk(gp) == {"web": web, "added": added}
    assert gp.rules_path.read_text().startswith(before_text[: before_text.index("}\n  ]")]), (
        "untouched text kept"
    )
    (record,) = gp.wait_event("rules_changed")
    assert record["method"] == "POST" and record["rule"] == "added" and record["client"].startswith(LOOPBACK)
    assert record["changes"] == {"added": ["added"], "changed": [], "removed": []}
    # The watcher sees the rename: its request is served (applies +1) and applies nothing.
    wait_for(
        lambda: stats(gp)["config"]["applies"] >= before["applies"] + 2, what="the watcher's request served"
    )
    after = stats(gp)["config"]
    assert after["generation"] == before["generation"] + 1
    assert after["reloads"]["success"] == before["reloads"]["success"] + 1
    assert [r["source"] for r in gp.events("config_reloaded")] == ["api"]


def test_put_replaces_or_creates_and_the_name_must_match(start_gportmap, echo_target):
    old_port, new_port, other = free_port(), free_port(), free_port()
    gp = start_gportmap(document(tcp_rule(old_port, echo_target.port, name="web"), watch=False))
    replaced = tcp_rule(new_port, echo_target.port, name="web")
    reply = api(gp, "PUT", "/rules/web", replaced)
    assert (
        reply.status == 200
        and reply.data["changes"]["added"] == ["web"]
        and reply.data["changes"]["removed"] == ["web"]
    )
    assert on_disk(gp) == {"web": replaced}
    assert echoes(new_port, b"hello") and refused(old_port)
    created = api(gp, "PUT", "/rules/api", tcp_rule(other, echo_target.port))
    assert created.status == 201 and on_disk(gp)["api"] == {
        "name": "api",
        **tcp_rule(other, echo_target.port),
    }
    assert echoes(other, b"hello")
    mismatch = api(gp, "PUT", "/rules/api", tcp_rule(other, echo_target.port, name="else"))
    assert mismatch.status == 400 and "'else' is not 'api'" in mismatch.data["errors"][0]


def test_patch_disables_and_re_enables_a_rule(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(document(tcp_rule(port, echo_target.port, name="web", maxConnections=5)))
    reply = api(gp, "PATCH", "/rules/web", {"enabled": False, "maxConnections": None})
    assert reply.status == 200 and reply.data["changes"]["removed"] == ["web"]
    assert refused(port), "a disabled rule refuses at once: the answer comes after the apply"
    assert on_disk(gp)["web"] == {**tcp_rule(port, echo_target.port, name="web"), "enabled": False}
    assert running(gp)["web"] == "disabled"
    reply = api(gp, "PATCH", "/rules/web", {"enabled": None})
    assert reply.status == 200 and reply.data["changes"]["added"] == ["web"]
    assert on_disk(gp)["web"] == tcp_rule(port, echo_target.port, name="web")
    assert echoes(port, b"hello")
    assert api(gp, "PATCH", "/rules/nope", {"enabled": False}).status == 404


def test_delete_drains_the_open_connections_and_a_dry_run_counts_them_first(start_gportmap, echo_target):
    port, keep = free_port(), free_port()
    gp = start_gportmap(
        document(tcp_rule(port, echo_target.port, name="gone"), tcp_rule(keep, echo_target.port, name="keep"))
    )
    text = gp.rules_path.read_bytes()
    open_conns = [connect(port) for _ in range(3)]
    for sock in open_conns:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    wait_for(lambda: stats(gp)["connections"]["active"] == 3, what="3 open")
    plan = api(gp, "DELETE", "/rules/gone?dry_run=1")
    assert plan.status == 200 and plan.data["dry_run"] is True
    assert plan.data["changes"] == {"added": [], "changed": [], "removed": ["gone"], "unchanged": ["keep"]}
    assert plan.data["impact"]["connections_to_drain"] == {"gone": 3}
    assert plan.data["impact"]["listeners_closed"] == [
        {"rule": "gone", "transport": "tcp", "listen": f"127.0.0.1:{port}"}
    ]
    assert gp.rules_path.read_bytes() == text and echoes(port, b"hello"), "a dry run changes nothing"
    reply = api(gp, "DELETE", "/rules/gone")
    assert reply.status == 200 and reply.data["changes"]["removed"] == ["gone"]
    assert list(on_disk(gp)) == ["keep"]
    assert refused(port)
    for sock in open_conns:  # the open connections drain: they still carry bytes
        sock.sendall(b"still")
        assert recv_exactly(sock, 5) == b"still"
        sock.close()
    gp.wait_event("rule_stopped", rule="gone", cut_connections=0)
    assert api(gp, "DELETE", "/rules/gone").status == 404


# -- refusals ----------------------------------------------------------------------------------


def test_a_stale_if_match_is_412_with_the_current_etag(start_gportmap, echo_target):
    gp = start_gportmap(document(tcp_rule(free_port(), echo_target.port, name="web")))
    first = api(gp, "GET", "/rules").headers["ETag"]
    ok = api(gp, "PATCH", "/rules/web", {"idleTimeout": 5}, headers={"If-Match": first})
    assert ok.status == 200
    text = gp.rules_path.read_bytes()
    stale = api(gp, "PATCH", "/rules/web", {"idleTimeout": 6}, headers={"If-Match": first})
    assert stale.status == 412
    assert stale.headers["ETag"] == f'"{sha256(gp.rules_path)}"' == f'"{ok.data["etag"]}"'
    assert stale.data["etag"] == ok.data["etag"]
    assert gp.rules_path.read_bytes() == text
    assert (
        api(gp, "PATCH", "/rules/web", {"idleTimeout": 6}, headers={"If-Match": stale.headers["ETag"]}).status
        == 200
    )


def test_a_hand_edit_is_detected_by_the_digest_and_never_overwritten(start_gportmap, echo_target):
    """watch off: the hand edit is on disk, not applied. A write naming the version it
    read gets 412; one without If-Match is made on the file as it is, hand edit kept."""
    web, manual = (
        tcp_rule(free_port(), echo_target.port, name="web"),
        tcp_rule(free_port(), echo_target.port, name="manual"),
    )
    gp = start_gportmap(document(web, watch=False))
    etag = api(gp, "GET", "/rules").headers["ETag"]
    gp.rules_path.write_text(json.dumps(document(web, manual, watch=False), indent=2))
    hand = gp.rules_path.read_bytes()
    stale = api(gp, "PATCH", "/rules/web", {"enabled": False}, headers={"If-Match": etag})
    assert stale.status == 412 and stale.data["etag"] == hashlib.sha256(hand).hexdigest()
    assert gp.rules_path.read_bytes() == hand
    merged = api(gp, "PATCH", "/rules/web", {"enabled": False})
    assert merged.status == 200
    assert on_disk(gp) == {"web": {**web, "enabled": False}, "manual": manual}
    assert merged.data["changes"]["added"] == ["manual"] and merged.data["changes"]["removed"] == ["web"]
    assert echoes(manual["listenPort"])


def test_an_invalid_write_is_400_with_the_check_messages_and_the_file_unchanged(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(document(tcp_rule(port, echo_target.port, name="web")))
    text = gp.rules_path.read_bytes()
    before = stats(gp)["config"]
    bad = api(gp, "POST", "/rules", tcp_rule(70000, echo_target.port, name="bad", colour="red"))
    assert bad.status == 400
    assert bad.data == {
        "errors": [
            f"{gp.rules_path}: rules[1].listenPort: 70000 is greater than the maximum of 65535",
            f"{gp.rules_path}: rules[1].colour: unknown key",
        ]
    }
    clash = api(gp, "PUT", "/rules/other", tcp_rule(port, echo_target.port))
    assert clash.status == 400 and "rules[1]: listen address 127.0.0.1:" in clash.data["errors"][0]
    assert api(gp, "POST", "/rules", tcp_rule(free_port(), 1, name="web")).status == 409
    for data, words in [
        (b"{nope", "the body is not valid JSON"),
        (b"", "the request has no body"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"[1]", "a rule must be a JSON object, not an array"),
    ]:
        reply = api(gp, "POST", "/rules", data=data)
        assert reply.status == 400 and words in json.dumps(reply.data), (data, reply.data)
    huge = api(gp, "POST", "/rules", data=b" " * (4 * 1024 * 1024 + 1))
    assert huge.status == 413 and "limit" in huge.data["error"]
    assert gp.rules_path.read_bytes() == text, "byte for byte unchanged"
    after = stats(gp)["config"]
    assert (after["generation"], after["reloads"], after["last_error"]) == (
        before["generation"],
        before["reloads"],
        None,
    )
    assert echoes(port, b"hello")


def _read_only_mount(folder: Path) -> list[str]:
    """A private mount namespace in which ``folder`` is a read-only bind mount: the
    write fails for root too (EROFS), as on a ConfigMap or a read-only volume."""
    if (
        not shutil.which("unshare")
        or subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0"',
                str(folder),
            ],
            capture_output=True,
        ).returncode
    ):
        pytest.skip("no mount namespace here (unshare -m and mount need CAP_SYS_ADMIN)")
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
        str(folder),
    ]


@pytest.mark.parametrize("how", ["read-only-mount", "immutable-file", "configmap", "mode-0444"])
def test_a_rules_file_that_cannot_be_written_is_409_and_nothing_changes(
    how, tmp_path, start_gportmap, wrapped, echo_target
):
    """Root ignores permission bits, so each case is one that stops root: a read-only
    mount (EROFS), an immutable file (rename: EPERM), a ConfigMap layout (refused by
    its ..data links), and a file with no write bit at all (refused by gportmap)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    port = free_port()
    text = json.dumps(document(tcp_rule(port, echo_target.port, name="web")), indent=2).encode()
    path = folder / "rules.json"
    expected = {
        "read-only-mount": "Read-only file system",
        "immutable-file": "Operation not permitted",
        "configmap": "Kubernetes ConfigMap",
        "mode-0444": "read-only (mode 0444)",
    }[how]
    immutable = False
    if how == "configmap":
        version = folder / "..2024_01_01_00_00_00.1"
        version.mkdir()
        (version / "rules.json").write_bytes(text)
        (folder / "..data").symlink_to(version.name)
        path.symlink_to("..data/rules.json")
    else:
        path.write_bytes(text)
    if how == "mode-0444":
        path.chmod(0o444)
    try:
        if how == "immutable-file":
            chattr = require_tool("chattr")
            if subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode:
                pytest.skip("chattr +i is not supported on this file system")
            immutable = True
        if how == "read-only-mount":
            gp = wrapped(path, _read_only_mount(folder))
        else:
            gp = start_gportmap(None, rules_path=path)
        listing = sorted(os.listdir(folder))
        reply = api(gp, "PATCH", "/rules/web", {"enabled": False})
        assert reply.status == 409, reply.data
        assert expected in reply.data["error"]
        assert path.read_bytes() == text and sorted(os.listdir(folder)) == listing, (
            "nothing written, nothing left"
        )
        assert echoes(port, b"hello") and stats(gp)["config"]["generation"] == 1
        assert gp.events("rules_changed") == []
        plan = api(gp, "PATCH", "/rules/web?dry_run=1", {"enabled": False})
        assert plan.status == 200, "a dry run writes nothing, so it is answered"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.slow  # starts gportmap three times
def test_writes_need_the_token_or_a_loopback_endpoint(start_gportmap, echo_target):
    token = "rule-api-token"
    gp = start_gportmap(
        {
            "settings": {"admin": {"token": token}},
            "rules": [tcp_rule(free_port(), echo_target.port, name="web")],
        }
    )
    for method, path, body in [
        ("GET", "/rules", None),
        ("GET", "/rules/web", None),
        ("PATCH", "/rules/web", {"enabled": False}),
        ("DELETE", "/rules/web", None),
    ]:
        assert api(gp, method, path, body).status == 401, (method, path)
        assert api(gp, method, path, body, token="wrong").status == 401, (method, path)
    assert api(gp, "PATCH", "/rules/web?dry_run=1", {"enabled": False}, token=token).status == 200
    gp.close()

    admin_port = free_port()
    open_rules = [tcp_rule(free_port(), echo_target.port, name="web")]
    gp = start_gportmap(open_rules, "--admin", f"0.0.0.0:{admin_port}", wait=False)
    gp.admin_port = admin_port
    gp.wait_started()
    read = api(gp, "GET", "/rules")
    assert read.status == 200 and read.headers["Allow"] == "GET, HEAD"
    text = gp.rules_path.read_bytes()
    for method, path, body in [
        ("POST", "/rules", tcp_rule(free_port(), 1)),
        ("PATCH", "/rules/web", {"enabled": False}),
        ("DELETE", "/rules/web", None),
    ]:
        reply = api(gp, method, path, body)
        assert (
            reply.status == 403
            and "writes need a token" in reply.data["error"]
            and "0.0.0.0" in reply.data["error"]
        )
    assert gp.rules_path.read_bytes() == text
    gp.close()

    gp = start_gportmap(open_rules)  # loopback, no token: writes are taken
    assert api(gp, "GET", "/rules").headers["Allow"] == "GET, HEAD, POST"
    assert api(gp, "PATCH", "/rules/web", {"enabled": False}).status == 200


# -- dry runs ------------------------------------------------------------------------------


def test_a_dry_run_reports_ports_taken_by_another_process_and_changes_nothing(start_gportmap, echo_target):
    web = tcp_rule(free_port(), echo_target.port, name="web")
    gp = start_gportmap(document(web))
    text = gp.rules_path.read_bytes()
    before = stats(gp)["config"]
    tcp_taken = socket.socket()
    tcp_taken.bind((LOOPBACK, 0))
    tcp_taken.listen(1)
    udp_taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # SO_REUSEADDR on both sides lets a second UDP socket bind beside this one (the
    # real listener would, and share its datagrams): the probe must not set it.
    udp_taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp_taken.bind((LOOPBACK, 0))
    free = free_port()
    try:
        tcp_port, udp_port = tcp_taken.getsockname()[1], udp_taken.getsockname()[1]
        cases = [
            (tcp_rule(tcp_port, echo_target.port, name="t"), "tcp", tcp_port, "already in use"),
            (
                {**tcp_rule(udp_port, 53, name="u"), "protocol": "udp"},
                "udp",
                udp_port,
                "a UDP socket is bound there",
            ),
        ]
        for rule, transport, port, words in cases:
            plan = api(gp, "POST", "/rules?dry_run=1", rule)
            assert plan.status == 200 and plan.data["dry_run"] is True
            assert plan.data["changes"]["added"] == [rule["name"]]
            assert plan.data["impact"]["listeners_opened"] == [
                {"rule": rule["name"], "transport": transport, "listen": f"127.0.0.1:{port}"}
            ]
            (problem,) = plan.data["impact"]["problems"]
            assert problem["rule"] == rule["name"] and words in problem["problem"], problem
        clean = api(gp, "POST", "/rules?dry_run=1", tcp_rule(free, echo_target.port, name="f"))
        assert clean.status == 200 and clean.data["impact"]["problems"] == []
        # web's own listener holds the port, but this change closes it first: no problem
        widened = api(gp, "PATCH", "/rules/web?dry_run=1", {"listenHost": "0.0.0.0"})
        assert widened.data["changes"]["added"] == widened.data["changes"]["removed"] == ["web"]
        assert widened.data["impact"]["problems"] == []
        assert refused(free), "the probe bound nothing that stays"
    finally:
        tcp_taken.close()
        udp_taken.close()
    assert gp.rules_path.read_bytes() == text
    assert stats(gp)["config"]["generation"] == before["generation"]
    assert list(running(gp)) == ["web"]
    # POST /reload?dry_run=1: what a reload of the file as it is would do, nothing applied.
    gp.rules_path.write_text(
        json.dumps(document(web, tcp_rule(free, echo_target.port, name="f"), watch=False))
    )
    plan = api(gp, "POST", "/reload?dry_run=1")
    assert plan.status == 200 and plan.data["changes"]["added"] == ["f"]
    assert gp.admin("/reload?dry_run=oops", "POST")[0] == 400


def test_a_dry_run_reports_a_privileged_port_without_the_capability(wrapped, tmp_path, echo_target):
    """Root without CAP_NET_BIND_SERVICE (dropped from the bounding set) cannot bind
    below net.ipv4.ip_unprivileged_port_start; the dry run says so."""
    require_tool("setpriv")
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    low = next((port for port in range(1023, 0, -1) if port < start and _free_tcp(port)), None)
    if low is None:
        pytest.skip("every port below ip_unprivileged_port_start is in use or unprivileged")
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(document(tcp_rule(free_port(), echo_target.port, name="web"))))
    gp = wrapped(path, ["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"])
    plan = api(gp, "POST", "/rules?dry_run=1", tcp_rule(low, echo_target.port, name="low"))
    assert plan.status == 200
    (problem,) = plan.data["impact"]["problems"]
    assert "permission denied" in problem["problem"] and "CAP_NET_BIND_SERVICE" in problem["problem"]


def _free_tcp(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# -- concurrency and workers ---------------------------------------------------------------


@pytest.mark.slow
def test_twenty_concurrent_writers_each_add_a_rule_and_none_is_lost(start_gportmap, echo_target):
    gp = start_gportmap(document(tcp_rule(free_port(), echo_target.port, name="base")))
    ports = [free_port() for _ in range(20)]
    barrier = threading.Barrier(20)
    replies: dict[int, Reply] = {}

    def writer(i: int) -> None:
        barrier.wait()
        replies[i] = api(gp, "POST", "/rules", tcp_rule(ports[i], echo_target.port, name=f"w{i}"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(reply.status for reply in replies.values()) == [201] * 20
    assert len({reply.data["etag"] for reply in replies.values()}) == 20, "20 versions, one per write"
    assert set(on_disk(gp)) == {"base", *(f"w{i}" for i in range(20))}
    assert set(running(gp).values()) == {"running"} and len(running(gp)) == 21
    assert all(echoes(port, b"hello") for port in ports)
    assert len(gp.events("rules_changed")) == 20


@pytest.mark.slow
def test_writes_fan_out_to_the_workers(start_gportmap, echo_target):
    gp = start_gportmap(document(tcp_rule(free_port(), echo_target.port, name="base")), "--workers", "2")
    wait_for(
        lambda: len([w for w in stats(gp)["workers"] if w["state"] == "running"]) == 2, what="two workers"
    )
    port = free_port()
    reply = api(gp, "POST", "/rules", tcp_rule(port, echo_target.port, name="added"))
    assert reply.status == 201
    assert all(echoes(port, b"hello") for _ in range(20)), "every worker serves it when the answer comes"
    assert api(gp, "PATCH", "/rules/added", {"enabled": False}).status == 200
    assert all(refused(port) for _ in range(10))
    assert json.loads(gp.rules_path.read_text())["rules"][1]["enabled"] is False


# -- the dashboard ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_dashboard_disables_and_enables_a_rule(start_gportmap, echo_target, tmp_path):
    from cdp import Chromium

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    port = free_port()
    gp = start_gportmap(document(tcp_rule(port, echo_target.port, name="web")))
    button = "document.querySelector('tr[data-rule=\"web\"] button.toggle')"
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(
            lambda: chromium.evaluate(f"{button}?.textContent") == "Disable", timeout=15, what="the button"
        )
        assert chromium.evaluate("document.body.classList.contains('writable')") is True
        chromium.evaluate(f"{button}.click()")
        wait_for(lambda: on_disk(gp)["web"].get("enabled") is False, what="the file says disabled")
        assert refused(port)
        wait_for(
            lambda: chromium.evaluate(f"{button}?.textContent") == "Enable", timeout=10, what="Enable shown"
        )
        chromium.evaluate(f"{button}.click()")
        wait_for(lambda: on_disk(gp)["web"].get("enabled") is True, what="the file says enabled")
        assert echoes(port, b"hello")
    finally:
        chromium.close()
