"""How long a change of the rules file takes to apply, per way of writing it and per
watcher: ``python bench/reload_latency.py [--rounds N]``.

The time is measured from the write to gportmap's ``config_reloaded`` record (its
JSON log on stderr, read as it comes), for the writes editors and deploy tools make:
in place, a rename over the file, delete and re-create, and a Kubernetes ConfigMap's
``..data`` symlink swap; with the inotify watcher and with polling. It moved here
from a wall-clock threshold in tests/test_reload.py (a test asserts the reload
happens, the figure is a benchmark's). Measured here, 2 shared cores: about 0.1 s
with inotify (the watcher's debounce) and 0.5 s when polling, for every write.
Everything runs on 127.0.0.1 and in a temporary folder; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import LOOPBACK, free_port, stop

Writer = Callable[[Path, str], None]


def in_place(path: Path, content: str) -> None:
    with open(path, "r+") as file:  # same inode, truncated and rewritten
        file.truncate(0)
        file.write(content)


def rename_over(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def delete_recreate(path: Path, content: str) -> None:
    path.unlink()
    path.write_text(content)


def configmap_swap(path: Path, content: str) -> None:
    """``path`` is ``folder/rules.json -> ..data/rules.json``: write a new version
    folder and rename a new ``..data`` symlink over the old one, as the kubelet does."""
    folder = path.parent
    version = folder / f"..v{time.monotonic_ns()}"
    version.mkdir()
    (version / "rules.json").write_text(content)
    link = folder / "..data_tmp"
    os.symlink(version.name, link)
    os.replace(link, folder / "..data")


WRITERS: dict[str, Writer] = {
    "in_place": in_place,
    "rename": rename_over,
    "delete_recreate": delete_recreate,
    "configmap": configmap_swap,
}


class LogReader:
    """gportmap's stderr, one JSON record per line, read by a thread; ``wait`` returns
    the monotonic time at which a record of an event was read."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, float]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                event = json.loads(line).get("event", "")
            except ValueError:
                continue
            with self.cond:
                self.seen.append((event, time.monotonic()))
                self.cond.notify_all()

    def wait(self, event: str, after: int, timeout: float = 10.0) -> tuple[int, float]:
        """The index and time of the first ``event`` record at index ``after`` or later."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for index in range(after, len(self.seen)):
                    if self.seen[index][0] == event:
                        return index, self.seen[index][1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {event} within {timeout}s")
                self.cond.wait(left)


def rules(port: int, version: int) -> str:
    return json.dumps(
        {
            "settings": {"admin": False, "statsInterval": 0},
            "rules": [
                {"name": "r", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port,
                 "targetHost": LOOPBACK, "targetPort": 9, "idleTimeout": 100 + version}
            ],
        }
    )


def measure(folder: Path, how: str, watcher: str, rounds: int) -> list[float]:
    port = free_port()
    if how == "configmap":
        (folder / "..v0").mkdir()
        (folder / "..v0" / "rules.json").write_text(rules(port, 0))
        os.symlink("..v0", folder / "..data")
        os.symlink("..data/rules.json", folder / "rules.json")
    else:
        (folder / "rules.json").write_text(rules(port, 0))
    path = folder / "rules.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gportmap", str(path), "--log-format", "json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GPORTMAP_WATCHER": watcher},
        start_new_session=True,
    )
    log = LogReader(proc)
    try:
        index, _ = log.wait("watching", 0, timeout=15)
        samples = []
        for version in range(1, rounds + 1):
            written = time.monotonic()
            WRITERS[how](path, rules(port, version))
            index, applied = log.wait("config_reloaded", index + 1)
            samples.append(applied - written)
        return samples
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 51), metavar="N", help="changes per case (1-50)")
    args = parser.parse_args()
    print(f"{'write':<16} {'watcher':<8} {'median ms':>10} {'max ms':>8}")
    for watcher in ("inotify", "poll"):
        for how in WRITERS:
            with tempfile.TemporaryDirectory(prefix="gportmap-reload-") as tmp:
                samples = measure(Path(tmp), how, watcher, args.rounds)
            print(f"{how:<16} {watcher:<8} {statistics.median(samples) * 1000:>10.1f} {max(samples) * 1000:>8.1f}")


if __name__ == "__main__":
    main()
