"""deploy/: every way of running gportmap that the project ships, tried for real.

- supervisord (PyPI ``supervisor``) runs deploy/supervisord.conf, templated into the
  test's directory: it starts gportmap, ``supervisorctl signal HUP`` reloads,
  ``supervisorctl stop`` drains an open stream and gportmap exits 0, a SIGKILLed
  gportmap is restarted.
- deploy/gportmap.service passes ``systemd-analyze verify`` (this sandbox has no
  systemd running, but verify works offline), and its commands run the way systemd
  would run them: as a non-root user with the unit's ambient capability, binding a
  port below 1024, reloaded by ExecReload, stopped by KillSignal.
- deploy/Dockerfile is built with buildah on a Debian base made by debootstrap (no
  image registry is reachable here) and run with ``buildah run`` as the image would
  run: its ENTRYPOINT, CMD, ENV and USER, the rules folder mounted.
- deploy/kubernetes/*.yaml parse, fit together, pass the Kubernetes API's schemas
  (kubernetes-validate, offline), and their rules pass --check.
- No shipped container file exposes the admin endpoint beyond loopback without a token.
- deploy/grafana-dashboard.json queries only metrics (and labels) that a running
  gportmap's /metrics exposes.

All traffic stays on 127.0.0.1; nothing sleeps to synchronise.
"""

from __future__ import annotations

import configparser
import copy
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LOOPBACK,
    ROOT,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    refused,
    require_tool,
    tcp_rule,
    wait_for,
)

DEPLOY = ROOT / "deploy"
#: The default drainTimeout (README, Settings); stop timeouts must exceed it.
DEFAULT_DRAIN_TIMEOUT = 30
VENV_BIN = Path(sys.executable).parent


def require_module(name: str) -> Any:
    """A test dependency from setup.py's "test" extra: skip without it, fail under
    GPORTMAP_REQUIRE_TOOLS=1 (.ci/run installs the extra)."""
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("GPORTMAP_REQUIRE_TOOLS", "") not in ("", "0"):
            pytest.fail(f"python module {name} is required (pip install -e '.[test]')")
        pytest.skip(f"python module {name} is not installed (pip install -e '.[test]')")


def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        data = recv_exactly(sock, len(payload))
        sock.shutdown(socket.SHUT_WR)
        return data


def serves(port: int) -> bool:
    try:
        return echo_once(port) == b"ping"
    except OSError:
        return False



def write_atomically(path: Path, content: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    tmp.chmod(mode)
    os.replace(tmp, path)


def world_readable_dir(prefix: str) -> Path:
    """A folder a non-root user can read (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class JsonLog:
    """gportmap's JSON records in a file that may hold other lines too (supervisord's
    own log on its stdout, buildah's messages): lines that start with "{"."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self, event: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].splitlines()
        records = [json.loads(line) for line in lines if line.startswith(b"{")]
        return [r for r in records if event is None or r.get("event") == event]

    def wait_event(self, event: str, timeout: float = 15.0, count: int = 1, **fields: Any) -> list[dict]:
        def matching() -> list[dict]:
            found = [e for e in self.events(event) if all(e.get(k) == v for k, v in fields.items())]
            return found if len(found) >= count else []

        try:
            return wait_for(matching, timeout, what=f"{count} x {event} {fields} in {self.path}")
        except AssertionError:
            tail = self.path.read_text(errors="replace")[-4000:] if self.path.exists() else "(no log)"
            raise AssertionError(f"no {count} x {event} {fields} within {timeout}s; log:\n{tail}") from None


# --------------------------------------------------------------------------------------
# Docker: static checks of the files (the image itself is built and run further down)
# --------------------------------------------------------------------------------------

SINGLE_FILE_MOUNT = re.compile(r"[:\s\"']/etc/gportmap/rules\.json(:ro|:rw)?[\"']?\s*$", re.MULTILINE)


def test_dockerfile_and_compose_mount_the_rules_folder_not_the_file():
    yaml = require_module("yaml")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ENV" in dockerfile and "CONFIG_PATH=/etc/gportmap/rules.json" in dockerfile
    assert '-v "$PWD/deploy/rules:/etc/gportmap:ro"' in dockerfile  # the documented run command
    assert "moby/moby#22627" in dockerfile
    # No example anywhere bind-mounts the single file (which pins its inode).
    assert not re.search(r"-v\s+\S+:/etc/gportmap/rules\.json", dockerfile)

    compose_text = (DEPLOY / "docker-compose.yml").read_text()
    assert "moby/moby#22627" in compose_text
    compose = yaml.safe_load(compose_text)
    service = compose["services"]["gportmap"]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    volumes = service["volumes"]
    assert volumes, "the rules folder must be mounted"
    for volume in volumes:
        source, target, *options = volume.split(":")
        assert target == "/etc/gportmap", f"mount the folder, not a file: {volume}"
        assert (DEPLOY / source).is_dir() and (DEPLOY / source / "rules.json").is_file(), volume
        assert options == ["ro"]
    assert not SINGLE_FILE_MOUNT.search(compose_text)
    assert service["stop_signal"] == "SIGTERM"
    grace = int(service["stop_grace_period"].rstrip("s"))
    shipped = json.loads((DEPLOY / "rules" / "rules.json").read_text())
    assert grace > shipped["settings"]["drainTimeout"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_essentials():
    instructions = dockerfile_instructions()
    first = instructions[0]
    assert first[0] == "ARG" and first[1].startswith("BASE="), "the base is a build argument"
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and all(args.split()[0] == "${BASE}" for args in froms)
    final = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    last = {word: args for word, args in final}
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert re.fullmatch(r"\d+:\d+", last["USER"]) and not last["USER"].startswith("0:"), "numeric, non-root"
    assert "/healthz" in last["HEALTHCHECK"] and "urllib.request" in last["HEALTHCHECK"]
    assert "8080" in last["EXPOSE"].split()
    assert "9900" not in last["EXPOSE"].split(), "the admin endpoint is not for publishing by default"
    assert json.loads(last["ENTRYPOINT"]) == ["gportmap"]
    cmd = json.loads(last["CMD"])
    assert cmd[cmd.index("--log-format") + 1] == "json"
    # gportmap is installed as a package (pip install of the repository) in the build stage.
    assert any(word == "RUN" and "pip install /src" in args for word, args in instructions)
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "gportmap" not in ignored and "README.md" not in ignored


# --------------------------------------------------------------------------------------
# The admin endpoint of the shipped container files: loopback, or a token
# --------------------------------------------------------------------------------------

#: settings.admin.listen's default (SPEC 3).
DEFAULT_ADMIN = "127.0.0.1:9900"


def admin_endpoint(argv: list[str], rules: Any) -> tuple[str, int, str | None] | None:
    """(host, port, token) of the admin endpoint that a command line and a rules file
    give (``--admin`` replaces only the address), or None when it is off."""
    settings = rules.get("settings", {}) if isinstance(rules, dict) else {}
    admin = settings.get("admin", {})
    if admin is False:
        return None
    listen, token = admin.get("listen", DEFAULT_ADMIN), admin.get("token")
    if "--admin" in argv:
        listen = argv[argv.index("--admin") + 1]
        if listen == "off":
            return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port), token


def exposed_without_token(argv: list[str], rules: Any) -> bool:
    """Whether anyone beyond this host's (container's, pod's) loopback can reach the
    admin endpoint without a token."""
    endpoint = admin_endpoint(argv, rules)
    if endpoint is None or endpoint[2] is not None:
        return False
    host = endpoint[0]
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def test_the_exposure_check_has_teeth():
    assert exposed_without_token(["--admin", "0.0.0.0:9900"], {})  # the files as they were
    assert exposed_without_token([], {"settings": {"admin": {"listen": "[::]:9900"}}})
    assert not exposed_without_token(["--admin", "0.0.0.0:9900"], {"settings": {"admin": {"token": "t"}}})
    assert not exposed_without_token([], {}) and not exposed_without_token(["--admin", "off"], {})
    assert not exposed_without_token(["--admin", "[::1]:9900"], {})


def image_command() -> list[str]:
    last = {word: args for word, args in dockerfile_instructions()}
    return json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"])


def test_container_files_keep_the_admin_endpoint_on_loopback_or_behind_a_token():
    """Docker, Compose and Kubernetes as shipped: the admin endpoint (/stats,
    /connections, /rules, /reload) is reachable from outside the container or pod only
    with a token; the health checks ask it where it listens."""
    yaml = require_module("yaml")
    image_rules = json.loads((DEPLOY / "rules" / "rules.json").read_text())
    argv = image_command()
    assert not exposed_without_token(argv, image_rules)
    host, port, _ = admin_endpoint(argv, image_rules)
    last = {word: args for word, args in dockerfile_instructions()}
    assert f"http://127.0.0.1:{port}/healthz" in last["HEALTHCHECK"]

    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["gportmap"]
    compose_argv = argv[:1] + list(service.get("command", argv[1:]))
    assert not exposed_without_token(compose_argv, image_rules)
    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    assert str(port) not in published, "nothing to publish: the admin endpoint is on the container's loopback"

    objects = kubernetes_objects()
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    pod_rules = json.loads(objects["ConfigMap"]["data"]["rules.json"])
    pod_argv = argv[:1] + container.get("args", argv[1:])
    assert not exposed_without_token(pod_argv, pod_rules)
    host, port, _ = admin_endpoint(pod_argv, pod_rules)
    assert ipaddress.ip_address(host).is_loopback
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in container[probe], "the kubelet's httpGet cannot reach the pod's loopback"
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        assert f"urlopen('http://127.0.0.1:{port}/healthz'" in command[2]
    assert port not in [p["containerPort"] for p in container["ports"]]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") != "true", "a scrape of the pod IP would find nothing"


def test_the_kubernetes_probe_command_fails_on_503_and_passes_on_200(start_gportmap, tmp_path):
    """The probes' command, run for real against gportmap's /healthz: 0 while every
    rule serves, non-zero once one cannot start (exec probes go by the exit code)."""
    (container,) = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    command = container["readinessProbe"]["exec"]["command"]
    with socket.socket() as blocker:
        blocker.bind((LOOPBACK, 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        gp = start_gportmap({"rules": [tcp_rule(taken, 9, name="blocked", enabled=False)]})
        probe = [sys.executable, "-c", command[2].replace("127.0.0.1:9900", f"{LOOPBACK}:{gp.admin_port}")]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
        gp.rules_path.write_text(json.dumps({"rules": [tcp_rule(taken, 9, name="blocked")]}))
        gp.wait_event("rule_failed", rule="blocked")
        failed = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert failed.returncode != 0 and "503" in failed.stderr


def test_shipped_rules_target_loopback_only_and_are_valid():
    rules = json.loads((DEPLOY / "rules" / "rules.json").read_text())
    assert {r["targetHost"] for r in rules["rules"]} == {"127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(DEPLOY / "rules" / "rules.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------


def kubernetes_objects() -> dict[str, dict]:
    yaml = require_module("yaml")
    objects: dict[str, dict] = {}
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            assert doc["kind"] not in objects, f"one {doc['kind']} expected"
            objects[doc["kind"]] = doc
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}
    return objects


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def test_kubernetes_manifests_fit_together():
    objects = kubernetes_objects()
    configmap, deployment, service = objects["ConfigMap"], objects["Deployment"], objects["Service"]
    rules = json.loads(configmap["data"]["rules.json"])
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]

    # The ConfigMap is mounted as a folder, read-only, and never through subPath
    # (a subPath mount is a copy that never receives updates).
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount["mountPath"] == "/etc/gportmap" and mount["readOnly"] is True
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert env.get("CONFIG_PATH", "/etc/gportmap/rules.json") == "/etc/gportmap/rules.json"

    # Both probes ask /healthz where the admin endpoint listens (the pod's loopback:
    # test_container_files_keep_the_admin_endpoint_on_loopback_or_behind_a_token).
    _, admin_port, _ = admin_endpoint(["gportmap", *container["args"]], rules)
    for probe in ("readinessProbe", "livenessProbe"):
        assert "/healthz" in " ".join(container[probe]["exec"]["command"])

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    security = {**pod["spec"]["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False

    # The pod gets longer than preStop plus the drain before it is killed.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = rules.get("settings", {}).get("drainTimeout", DEFAULT_DRAIN_TIMEOUT)
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain

    # The Service's ports lead to ports the pod has and the rules listen on; the
    # admin port is scraped per pod, not through the Service.
    listen_ports = {r["listenPort"] for r in rules["rules"] if r.get("enabled", True)}
    for port in service["spec"]["ports"]:
        target = named_port(container, port["targetPort"])
        assert target in listen_ports and target != admin_port


def test_kubernetes_configmap_rules_pass_check(tmp_path):
    rules_text = kubernetes_objects()["ConfigMap"]["data"]["rules.json"]
    rules = json.loads(rules_text)
    assert {r["targetHost"] for r in rules["rules"]} == {"127.0.0.1"}
    path = tmp_path / "rules.json"
    path.write_text(rules_text)
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule(s), valid" in result.stdout
    # That gportmap follows the ConfigMap's ..data symlink swap is shown by
    # tests/test_reload.py (the "kubernetes" way of changing the file).


#: Kubernetes versions whose API schemas the manifests must pass: an old one still
#: in service and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.28",)


def test_kubernetes_manifests_pass_the_api_schemas():
    """kubernetes-validate checks each object against the Kubernetes OpenAPI schemas
    (bundled, offline: kubectl --dry-run needs a cluster), strictly: an unknown or
    misspelt field fails as the API server would reject it."""
    validator = require_module("kubernetes_validate")
    objects = kubernetes_objects()
    for version in (*KUBERNETES_VERSIONS, validator.latest_version()):
        for doc in objects.values():
            validator.validate(doc, version, strict=True)
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["true"]
    with pytest.raises(validator.ValidationError, match="comand"):
        validator.validate(broken, validator.latest_version(), strict=True)
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["replicas"] = "two"
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, validator.latest_version(), strict=True)


# --------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------

#: PromQL words that are not metric names where a name could stand.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
#: Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = {"instance", "job"}


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector in a PromQL
    expression: strings, ranges and grouping clauses are cut first, and a word
    followed by "(" is a function or an aggregation, not a metric."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = match.groups()
        if call or name in PROMQL_KEYWORDS:
            continue
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        found.append((name, labels))
    return found


def test_promql_selectors_finds_metrics_and_their_labels():
    expr = 'sum by (rule, reason) (rate(a_total{rule=~"$rule", reason!="x"}[$__rate_interval])) / on(instance) b or vector(0)'
    assert promql_selectors(expr) == [("a_total", {"rule", "reason"}), ("b", set())]
    assert promql_selectors('label_values(gportmap_rule_up{instance=~"$instance"}, rule)') == [
        ("gportmap_rule_up", {"instance"}),
        ("rule", set()),
    ]


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL text of the dashboard: panel targets (rows included) and the
    template variables' queries (``label_values(METRIC, LABEL)``: its selector only)."""
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        queries += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            queries.append(match.group(1))
    return queries


def exposition(text: str) -> dict[str, set[str]]:
    """{sample name: label names} of a Prometheus text exposition."""
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?", line)
            labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', match.group(3) or ""))
            samples.setdefault(match.group(1), set()).update(labels)
    return samples


def test_grafana_dashboard_queries_what_gportmap_exports(start_gportmap, echo_target):
    """Every metric the dashboard queries is in /metrics of a gportmap running a tcp
    and a udp rule (so every family has series), with the labels the query matches."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        ids.append(panel["id"])
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    assert len(ids) == len(set(ids)), "panel ids are unique"

    udp = {**tcp_rule(free_port(socket.SOCK_DGRAM), echo_target.port, name="dns"), "protocol": "udp"}
    gp = start_gportmap({"rules": [tcp_rule(free_port(), echo_target.port, name="web"), udp]})
    status, body, _ = gp.admin("/metrics")
    assert status == 200
    exported = exposition(body.decode())
    assert "gportmap_udp_packets_dropped_total" in exported and "process_open_fds" in exported

    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    used = set()
    for query in queries:
        selectors = promql_selectors(query)
        assert selectors, query
        for name, labels in selectors:
            assert name in exported, f"{name} (in {query!r}) is not in gportmap's /metrics"
            assert labels <= exported[name] | SCRAPE_LABELS, f"{name} has no label {labels - exported[name]}: {query!r}"
            used.add(name)
    assert {"gportmap_rule_up", "gportmap_connections_active", "gportmap_udp_sessions_active"} <= used


# --------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, raw
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict, section: str, key: str) -> str:
    values = [v for k, v in unit[section] if k == key]
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_systemd_unit_has_the_required_keys():
    unit = read_unit(DEPLOY / "gportmap.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "Environment": "CONFIG_PATH=/etc/gportmap/rules.json",
    }
    for key, value in expected.items():
        assert unit_value(unit, "Service", key) == value, key
    assert int(unit_value(unit, "Service", "TimeoutStopSec")) > DEFAULT_DRAIN_TIMEOUT
    # Pings come every WatchdogSec/2 from the event loop; a watchdog shorter than a few
    # seconds would kill a busy but healthy gportmap.
    assert 10 <= int(unit_value(unit, "Service", "WatchdogSec")) <= 300
    assert unit_value(unit, "Service", "ExecStart").split()[0] == "/opt/gportmap/bin/gportmap"
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def templated_unit(directory: Path, rules_dir: Path, name: str = "gportmap.service") -> Path:
    """The unit with the venv's gportmap for /opt/gportmap/bin/gportmap and a test folder
    for /etc/gportmap (verify insists that ExecStart's program exists)."""
    text = (DEPLOY / name).read_text()
    text = text.replace("/opt/gportmap/bin/gportmap", str(VENV_BIN / "gportmap"))
    text = text.replace("/etc/gportmap", str(rules_dir))
    path = directory / name
    path.write_text(text)
    return path


def test_systemd_socket_unit_matches_the_shipped_rules():
    """deploy/gportmap.socket passes the sockets of deploy/rules/rules.json: every
    Listen line is an enabled rule's exact transport, address and port (gportmap adopts
    a socket only then), names its descriptors, and lets gportmap accept (Accept=no)."""
    unit = read_unit(DEPLOY / "gportmap.socket")
    rules = json.loads((DEPLOY / "rules" / "rules.json").read_text())["rules"]
    listeners = {
        ("udp" if r["protocol"] == "udp" else "tcp", f"{r.get('listenHost', '0.0.0.0')}:{r['listenPort']}")
        for r in rules
        if r.get("enabled", True)
    }
    sockets = [("tcp", v) for k, v in unit["Socket"] if k == "ListenStream"]
    sockets += [("udp", v) for k, v in unit["Socket"] if k == "ListenDatagram"]
    assert sockets and set(sockets) <= listeners
    assert unit_value(unit, "Socket", "Accept") == "no"
    assert unit_value(unit, "Socket", "FileDescriptorName")
    assert unit_value(unit, "Install", "WantedBy") == "sockets.target"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # systemd-analyze verify works offline, without systemd running (it does not run
    # in this sandbox): it loads the unit, checks every key and value and that the
    # commands exist. Warnings do not change its exit code, so any output fails too.
    analyze = require_tool("systemd-analyze")
    unit = templated_unit(tmp_path, tmp_path)
    sockets = templated_unit(tmp_path, tmp_path, "gportmap.socket")
    result = subprocess.run(
        [analyze, "verify", str(unit), str(sockets)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    # The check has teeth: a misspelt key, a bad signal or a missing program is reported.
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = unit.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGTREM\nKillSignl=SIGTERM")
    (broken / "gportmap.service").write_text(bad)
    result = subprocess.run(
        [analyze, "verify", str(broken / "gportmap.service")], capture_output=True, text=True, timeout=60
    )
    assert "SIGTREM" in result.stderr and "KillSignl" in result.stderr


def low_free_port() -> int:
    """A free port below 1024 on loopback (only root or CAP_NET_BIND_SERVICE may bind it)."""
    for port in range(1023, 899, -1):
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    pytest.fail("no free port between 900 and 1023 on 127.0.0.1")


def test_systemd_unit_commands_run_as_systemd_would(tmp_path, echo_target):
    """No systemd runs here, so its part is played by setpriv: the unit's ExecStart as a
    non-root user (DynamicUser) with exactly the unit's capabilities and
    no_new_privs, binding a port below 1024; ExecReload with $MAINPID; KillSignal."""
    setpriv = require_tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("playing systemd's part (switching user, granting capabilities) needs root")
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 1023:
        pytest.skip("ports below 1024 are not privileged on this machine")
    rules_dir = world_readable_dir("gportmap-unit-")
    try:
        unit = read_unit(templated_unit(tmp_path, rules_dir))
        low, admin = low_free_port(), free_port()
        rules = {
            "settings": {"admin": {"listen": f"{LOOPBACK}:{admin}"}},
            "rules": [tcp_rule(low, echo_target.port)],
        }
        write_atomically(rules_dir / "rules.json", json.dumps(rules))

        nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
        caps = unit_value(unit, "Service", "AmbientCapabilities").lower().replace("cap_", "")
        bounding = unit_value(unit, "Service", "CapabilityBoundingSet").lower().replace("cap_", "")
        as_unit = [
            setpriv,
            *nobody,
            f"--inh-caps=+{caps}",
            f"--ambient-caps=+{caps}",
            f"--bounding-set=-all,+{bounding}",
            "--no-new-privs",
        ]
        env = dict(os.environ)
        for key, value in unit["Service"]:
            if key == "Environment":
                name, _, val = value.partition("=")
                env[name] = val
        assert env["CONFIG_PATH"] == str(rules_dir / "rules.json")

        readable = subprocess.run(
            [setpriv, *nobody, sys.executable, "-c", "import gportmap"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if readable.returncode != 0:
            pytest.skip(
                f"user nobody cannot run this venv's gportmap (a private home?): {readable.stderr[-300:]}"
            )
        # Without the capability the same user cannot bind the port: the test has teeth.
        probe = f"import socket; socket.socket().bind(('127.0.0.1', {low}))"
        denied = subprocess.run(
            [setpriv, *nobody, sys.executable, "-c", probe], capture_output=True, timeout=30
        )
        assert denied.returncode != 0 and b"PermissionError" in denied.stderr

        pre = subprocess.run(
            [*as_unit, *unit_value(unit, "Service", "ExecStartPre").split()],
            env=env, capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert pre.returncode == 0, pre.stdout + pre.stderr
        # Type=notify: systemd's notify socket is root's and writable by every user
        # (/run/systemd/notify); the unit's unprivileged process reports there.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(rules_dir / "notify"))
        os.chmod(rules_dir / "notify", 0o777)
        notify.settimeout(30)
        env["NOTIFY_SOCKET"] = str(rules_dir / "notify")
        env["WATCHDOG_USEC"] = str(int(unit_value(unit, "Service", "WatchdogSec")) * 1_000_000)

        def notified(key: str) -> dict[str, str]:
            """The next datagram that sets ``key`` (in order: datagrams are a queue)."""
            while True:
                lines = notify.recv(4096).decode().split("\n")
                fields = dict(line.split("=", 1) for line in lines if "=" in line)
                if key in fields:
                    return fields
        log_path = tmp_path / "journal.log"
        with open(log_path, "ab") as journal:
            proc = subprocess.Popen(
                [*as_unit, *unit_value(unit, "Service", "ExecStart").split()],
                env=env, stdout=journal, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/",
            )  # fmt: skip
        try:
            log = JsonLog(log_path)
            (started,) = log.wait_event("started")
            assert started["config"] == str(rules_dir / "rules.json")
            with open(f"/proc/{proc.pid}/status") as status:
                uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
            assert set(uids) == {"65534"}
            ready = notified("READY")
            assert ready["STATUS"] == "serving 1 rule, 0 connections" and ready["WATCHDOG"] == "1"
            assert echo_once(low) == b"ping"

            reload = unit_value(unit, "Service", "ExecReload").replace("$MAINPID", str(proc.pid))
            subprocess.run(reload.split(), check=True, timeout=30)
            log.wait_event("config_reloaded", source="signal")
            assert "MONOTONIC_USEC" in notified("RELOADING") and notified("READY")

            proc.send_signal(signal.Signals[unit_value(unit, "Service", "KillSignal")])
            assert notified("STOPPING")["STOPPING"] == "1"
            assert proc.wait(int(unit_value(unit, "Service", "TimeoutStopSec"))) == 0
            log.wait_event("stopped")
        finally:
            notify.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        shutil.rmtree(rules_dir)


# --------------------------------------------------------------------------------------
# supervisord
# --------------------------------------------------------------------------------------


class Supervisord:
    """A real supervisord running deploy/supervisord.conf with its paths moved into the
    test's directories, gportmap's command pointed at this interpreter and the test's
    rules, and the admin endpoint on a free loopback port."""

    def __init__(
        self, tmp_path: Path, rules_path: Path, admin_port: int, program: dict | None = None
    ) -> None:
        require_module("supervisor")
        from supervisor.xmlrpc import SupervisorTransport

        self.supervisord = VENV_BIN / "supervisord"
        self.supervisorctl = VENV_BIN / "supervisorctl"
        # A short folder for the control socket: its path must fit in sun_path.
        self.run_dir = Path(tempfile.mkdtemp(prefix="gpm-sv-"))
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir()
        config = configparser.RawConfigParser(inline_comment_prefixes=(";",))
        config.read(DEPLOY / "supervisord.conf")
        moved = {
            "/opt/gportmap/bin/gportmap": f"{sys.executable} -m gportmap",
            "/etc/gportmap/rules.json": str(rules_path),
            "/var/log/supervisor": str(self.log_dir),
            "/var/run": str(self.run_dir),
        }
        for section in config.sections():
            for key, value in config.items(section):
                for old, new in moved.items():
                    value = value.replace(old, new)
                config.set(section, key, value)
        section = "program:gportmap"
        config.set(section, "command", config.get(section, "command") + f" --admin {LOOPBACK}:{admin_port}")
        config.remove_option(section, "user")  # no account "gportmap" on a test machine
        for key, value in (program or {}).items():
            config.set(section, key, value)
        # Nothing may point outside the test's directories.
        for sect, key in [
            ("unix_http_server", "file"),
            ("supervisord", "logfile"),
            ("supervisord", "pidfile"),
            ("supervisord", "childlogdir"),
        ]:
            assert config.get(sect, key).startswith((str(self.run_dir), str(self.log_dir))), (sect, key)
        self.conf = tmp_path / "supervisord.conf"
        with open(self.conf, "w") as file:
            config.write(file)
        logfile = config.get(section, "stdout_logfile").replace("%(program_name)s", "gportmap")
        assert logfile == "/dev/stdout" or logfile.startswith(str(self.log_dir)), logfile
        self.program_log = JsonLog(
            Path(logfile) if logfile != "/dev/stdout" else tmp_path / "supervisord.out"
        )
        self.stdout_path = tmp_path / "supervisord.out"
        self.pids: set[int] = set()
        # Appending: supervisord writes to this file through its stdout, and a child
        # logging to /dev/stdout opens it again; both must write at its end.
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.supervisord), "--nodaemon", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
            )
        self.serverurl = f"unix://{config.get('unix_http_server', 'file')}"
        self.transport = SupervisorTransport

    def rpc(self) -> Any:
        """A fresh XML-RPC proxy: a failed call leaves a transport unusable."""
        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=self.transport(None, None, self.serverurl)
        )

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")[-4000:]

    def info(self) -> dict:
        """supervisord's view of the program: statename, pid, exitstatus..."""
        try:
            info = self.rpc().supervisor.getProcessInfo("gportmap")
        except (OSError, xmlrpc.client.Fault):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"supervisord exited ({self.proc.returncode}):\n{self.output()}"
                ) from None
            return {}
        if info["pid"]:
            self.pids.add(info["pid"])
        return info

    def wait_state(self, state: str, timeout: float = 20.0, not_pid: int = 0) -> dict:
        def reached() -> dict:
            info = self.info()
            return info if info.get("statename") == state and info.get("pid") != not_pid else {}

        try:
            return wait_for(reached, timeout, what=f"gportmap {state} under supervisord")
        except AssertionError:
            raise AssertionError(f"gportmap not {state}: {self.info()}\n{self.output()}") from None

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.supervisorctl), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # supervisord stops its programs the configured way, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.pids:  # a gportmap that outlived its supervisord (it must not)
            try:
                if b"gportmap" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


def test_supervisord_conf_stops_gracefully_and_restarts():
    config = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    config.read(DEPLOY / "supervisord.conf")
    program = dict(config.items("program:gportmap"))
    assert program["stopsignal"] == "TERM"
    # supervisord's SIGKILL must not cut the drain short (default drainTimeout 30 s).
    assert int(program["stopwaitsecs"]) > DEFAULT_DRAIN_TIMEOUT
    assert program["autorestart"] == "true" and program["autostart"] == "true"
    assert program["exitcodes"] == "0"
    assert program["redirect_stderr"] == "true"
    assert program["command"].split()[0] == "/opt/gportmap/bin/gportmap"
    assert program["user"] == "gportmap"
    assert config.get("supervisorctl", "serverurl") == "unix://" + config.get("unix_http_server", "file")


@pytest.fixture
def supervisord(tmp_path):
    started: list[Supervisord] = []

    def start(rules: dict, program: dict | None = None) -> tuple[Supervisord, int]:
        rules_path = tmp_path / "rules.json"
        rules_path.write_text(json.dumps(rules))
        admin = free_port()
        sv = Supervisord(tmp_path, rules_path, admin, program)
        started.append(sv)
        return sv, admin

    yield start
    for sv in started:
        sv.close()


@pytest.mark.slow
def test_supervisord_runs_reloads_on_hup_and_drains_on_stop(supervisord, tmp_path, echo_target):
    one, two = free_port(), free_port()
    # watch off: only the HUP can have applied the change below.
    rules = {
        "settings": {"watch": False, "drainTimeout": 20},
        "rules": [tcp_rule(one, echo_target.port, name="one")],
    }
    sv, _ = supervisord(rules)
    log = sv.program_log
    log.wait_event("started")
    sv.wait_state("RUNNING")
    assert wait_for(lambda: serves(one), what="traffic through gportmap")
    assert "started" in sv.ctl("tail", "gportmap").stdout

    # supervisorctl signal HUP reloads the rules file.
    rules["rules"].append(tcp_rule(two, echo_target.port, name="two"))
    write_atomically(tmp_path / "rules.json", json.dumps(rules))
    result = sv.ctl("signal", "HUP", "gportmap")
    assert result.returncode == 0 and "signalled" in result.stdout, result.stdout + result.stderr
    (reloaded,) = log.wait_event("config_reloaded", source="signal")
    assert reloaded["added"] == ["two"] and reloaded["unchanged"] == ["one"]
    assert echo_once(two) == b"ping"

    # supervisorctl stop: SIGTERM, the open stream finishes, gportmap exits 0.
    stream = connect(one)
    stream.sendall(b"before")
    assert recv_exactly(stream, 6) == b"before"
    stopper = subprocess.Popen(
        [str(sv.supervisorctl), "-c", str(sv.conf), "stop", "gportmap"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        (stopping,) = log.wait_event("stopping")
        assert stopping["active"] == 1
        assert wait_for(lambda: refused(one), what="listening socket closed during the drain")
        stream.sendall(b"during")
        assert recv_exactly(stream, 6) == b"during"
        stream.shutdown(socket.SHUT_WR)
        assert recv_until_eof(stream) == b""
        out, _ = stopper.communicate(timeout=30)
    finally:
        stream.close()
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait(10)
    assert stopper.returncode == 0 and "gportmap: stopped" in out, out
    info = sv.info()
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    assert "STOPPED" in sv.ctl("status", "gportmap").stdout
    log.wait_event("stopped")
    assert "stopped: gportmap (exit status 0)" in sv.output()


@pytest.mark.slow
def test_supervisord_restarts_gportmap_after_sigkill(supervisord, echo_target):
    port = free_port()
    sv, _ = supervisord({"rules": [tcp_rule(port, echo_target.port, name="web")]})
    first = sv.wait_state("RUNNING")
    assert wait_for(lambda: serves(port), what="traffic through gportmap")

    os.kill(first["pid"], signal.SIGKILL)
    second = sv.wait_state("RUNNING", not_pid=first["pid"])
    assert second["pid"] != first["pid"]
    assert wait_for(lambda: serves(port), what="traffic through the restarted gportmap")
    starts = sv.program_log.wait_event("started", count=2)
    assert [s["pid"] for s in starts] == [first["pid"], second["pid"]]
    assert starts[0]["config"] == starts[1]["config"]


@pytest.mark.slow
def test_supervisord_stdout_variant_puts_the_records_on_its_stdout(supervisord, echo_target):
    """The alternative deploy/supervisord.conf documents for supervisord in the
    foreground (a container's main process): the records on supervisord's stdout."""
    text = (DEPLOY / "supervisord.conf").read_text()
    assert "stdout_logfile=/dev/stdout" in text and "stdout_logfile_maxbytes=0" in text
    port = free_port()
    sv, _ = supervisord(
        {"rules": [tcp_rule(port, echo_target.port, name="web")]},
        program={"stdout_logfile": "/dev/stdout", "stdout_logfile_maxbytes": "0"},
    )
    assert sv.program_log.path == sv.stdout_path
    sv.program_log.wait_event("started")
    sv.wait_state("RUNNING")
    assert wait_for(lambda: serves(port), what="traffic through gportmap")
    sv.program_log.wait_event("connection_closed", rule="web")
    assert not list(sv.log_dir.glob("gportmap*.log"))


# --------------------------------------------------------------------------------------
# The image, built with buildah and run as the image would run
# --------------------------------------------------------------------------------------

#: debootstrap's result, kept between runs: the slow part (about 40 s) happens once.
ROOTFS_CACHE = Path(os.environ.get("GPORTMAP_ROOTFS_CACHE", "/var/tmp/gportmap-test-rootfs"))
SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("GPORTMAP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_IMAGE = f"localhost/gportmap-test-base:{SUITE}"
IMAGE = "localhost/gportmap:test"


def run(cmd: list, timeout: float = 300, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def unmount_below(path: Path) -> None:
    """Unmount whatever an interrupted debootstrap or buildah left mounted below ``path``."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


def remove_tree(path: Path) -> None:
    unmount_below(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=300)


def base_rootfs_tar(debootstrap: str) -> Path:
    """A Debian minbase with python3 and python3-venv as a tar, made once and cached.
    It stands in for python:3.12-slim, which no registry here can serve."""
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    tar = ROOTFS_CACHE / f"{SUITE}-minbase-python3.tar"
    with open(ROOTFS_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if tar.exists():
            return tar
        work = Path(tempfile.mkdtemp(prefix="build-", dir=ROOTFS_CACHE))
        try:
            rootfs = work / "rootfs"
            run(
                [
                    debootstrap,
                    "--variant=minbase",
                    "--include=python3,python3-venv",
                    SUITE,
                    rootfs,
                    DEBIAN_MIRROR,
                ],
                timeout=900,
            )
            run(["tar", "-C", rootfs, "-cf", work / "rootfs.tar", "."], timeout=300)
            os.replace(work / "rootfs.tar", tar)
        finally:
            remove_tree(work)
    return tar


@pytest.mark.slow
@pytest.mark.image
@pytest.mark.timeout(1200)
def test_image_builds_and_runs_as_the_image_would(tmp_path, echo_target):
    buildah = require_tool("buildah")
    podman = require_tool("podman")
    debootstrap = require_tool("debootstrap")
    if os.geteuid() != 0:
        pytest.skip("debootstrap and buildah's chroot isolation need root")

    tar = base_rootfs_tar(debootstrap)
    # A private, throw-away container storage: nothing of the machine's is touched
    # and everything is removed at the end.
    storage = Path(tempfile.mkdtemp(prefix="gportmap-image-", dir="/var/tmp"))
    store = ["--root", storage / "root", "--runroot", storage / "run", "--storage-driver=vfs"]
    rules_dir = world_readable_dir("gportmap-image-rules-")
    proc = None
    gportmap_pid = None
    try:
        run([podman, *store, "--tmpdir", storage / "libpod", "import", tar, BASE_IMAGE], timeout=300)
        build = [buildah, *store, "bud", "--isolation=chroot", "--format=docker", "--layers=false"]
        # Where the network intercepts TLS (as this sandbox's egress does), pip in the
        # build needs the CA that the host trusts; the mount exists only during RUN.
        host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
        if host_ca.is_file():
            build += ["--volume", f"{host_ca}:{host_ca}:ro"]
        build += ["--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, "-f", DEPLOY / "Dockerfile", ROOT]
        run(build, timeout=600)

        inspected = json.loads(run([buildah, *store, "inspect", "--type", "image", IMAGE]).stdout)
        config = inspected["Docker"]["config"]  # the Docker format keeps the HEALTHCHECK
        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["CONFIG_PATH"] == "/etc/gportmap/rules.json"
        assert config["User"] and config["User"].split(":")[0] not in ("0", "root")
        assert config["StopSignal"] == "SIGTERM"
        assert set(config["ExposedPorts"]) == {"8080/tcp"}
        health = config["Healthcheck"]["Test"]
        assert health[0] == "CMD" and "http://127.0.0.1:9900/healthz" in " ".join(health)

        container = run([buildah, *store, "from", IMAGE]).stdout.strip()
        in_image = [buildah, *store, "run", "--isolation=chroot", container, "--"]
        # gportmap is installed as a package into a venv; the sources stayed in the build stage.
        where = run(
            [*in_image, "python3", "-c", "import gportmap; print(gportmap.__file__, gportmap.__version__)"]
        )
        path, version = where.stdout.split()
        assert path.startswith("/opt/gportmap/lib/") and "site-packages" in path
        assert f'__version__ = "{version}"' in (ROOT / "gportmap" / "__init__.py").read_text()
        assert run([*in_image, "test", "-e", "/src"], check=False).returncode != 0
        # The image's own rules are valid and forward to loopback only.
        check = run([*in_image, "gportmap", "--check"])
        assert "/etc/gportmap/rules.json: 1 rule(s), valid" in check.stdout
        shipped = json.loads(run([*in_image, "cat", "/etc/gportmap/rules.json"]).stdout)
        assert shipped == json.loads((DEPLOY / "rules" / "rules.json").read_text())
        assert {r["targetHost"] for r in shipped["rules"]} == {"127.0.0.1"}

        # Run it as the image would: ENTRYPOINT + CMD, with the image's ENV, USER and
        # WORKDIR (buildah run applies them), the rules FOLDER mounted at /etc/gportmap.
        # buildah run shares the host's network, so the admin endpoint moves from
        # its default (127.0.0.1:9900, the container's loopback) to a free loopback port.
        port, admin = free_port(), free_port()
        rules = {"rules": [tcp_rule(port, echo_target.port, name="echo")]}
        write_atomically(rules_dir / "rules.json", json.dumps(rules))
        argv = config["Entrypoint"] + config["Cmd"]
        assert "--admin" not in argv  # the rules' settings.admin.listen decides: loopback
        argv += ["--admin", f"{LOOPBACK}:{admin}"]
        log_path = tmp_path / "container.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [str(c) for c in [buildah, *store, "run", "--isolation=chroot", "--volume",
                                  f"{rules_dir}:/etc/gportmap:ro", container, "--", *argv]],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        log = JsonLog(log_path)  # every record JSON: the image's default
        (started,) = log.wait_event("started", timeout=60)
        gportmap_pid = started["pid"]  # no PID namespace: the host's pid
        assert started["config"] == "/etc/gportmap/rules.json"
        # The build stage had a compiler: the image relays plain TCP with the C engine.
        assert "pump" in started["features"], started["features"]
        with open(f"/proc/{gportmap_pid}/status") as status:
            uid = next(line for line in status if line.startswith("Uid:")).split()[1]
        assert uid == config["User"].split(":")[0]
        log.wait_event("admin_started")
        assert echo_once(port) == b"ping"

        healthcheck = [part.replace("127.0.0.1:9900", f"{LOOPBACK}:{admin}") for part in health[1:]]
        result = run([*in_image, *healthcheck], check=False)
        assert result.returncode == 0, result.stdout + result.stderr

        # Hot reload through the mounted folder: a new version renamed over the file on
        # the host. The added rule's port is taken, so /healthz turns 503 and the
        # HEALTHCHECK fails.
        with socket.socket() as blocker:
            blocker.bind((LOOPBACK, 0))
            blocker.listen()
            rules["rules"].append(tcp_rule(blocker.getsockname()[1], echo_target.port, name="blocked"))
            write_atomically(rules_dir / "rules.json", json.dumps(rules))
            (reloaded,) = log.wait_event("config_reloaded", source="watcher")
            assert reloaded["added"] == ["blocked"]
            log.wait_event("rule_failed", rule="blocked")
            result = run([*in_image, *healthcheck], check=False)
            assert result.returncode != 0 and "503" in result.stderr, result.stdout + result.stderr
        assert echo_once(port) == b"ping"

        # STOPSIGNAL: SIGTERM stops it gracefully, exit 0.
        os.kill(gportmap_pid, signal.Signals[config["StopSignal"]])
        assert proc.wait(60) == 0, log_path.read_text()
        log.wait_event("stopped")

        run([buildah, *store, "rm", container])
        run([buildah, *store, "rmi", "--all", "--force"])
        assert run([buildah, *store, "containers", "--quiet"]).stdout.strip() == ""
        assert run([buildah, *store, "images", "--quiet"]).stdout.strip() == ""
    finally:
        if proc is not None and proc.poll() is None:
            if gportmap_pid is not None:
                try:
                    os.kill(gportmap_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(30)
        subprocess.run([str(buildah), *map(str, store), "rm", "--all"], capture_output=True, timeout=120)
        subprocess.run(
            [str(buildah), *map(str, store), "rmi", "--all", "--force"], capture_output=True, timeout=120
        )
        remove_tree(storage)
        shutil.rmtree(rules_dir, ignore_errors=True)
