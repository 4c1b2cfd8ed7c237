"""The command line (SPEC §1) and the foreground run loop (SPEC §2).

Exit codes: 0 clean stop, 2 usage or invalid rules at start-up, 1 any other fatal
error. gportmap never daemonizes: supervisord, docker and systemd own the process.
``gportmap.__main__`` has monkeypatched the process before this module loads.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence

import gevent
from gevent.event import Event

from gportmap import __version__
from gportmap.admin import AdminPlane
from gportmap.config import Config, load, parse, parse_listen
from gportmap.engine.pumprelay import configure as configure_relays
from gportmap.errors import ConfigError, GportmapError
from gportmap.events import (
    ConfigInvalid,
    Fatal,
    ReloadIgnored,
    Started,
    Stopped,
    Stopping,
    UsageError,
    WorkerFailed,
)
from gportmap.log import LEVELS, emit, get_logger, route_gevent_errors, setup_logging
from gportmap.platform import Features, detect, raise_fd_limit
from gportmap.runtime.applier import ReloadSource
from gportmap.runtime.backend import RulesBackend
from gportmap.runtime.health import HealthProber
from gportmap.runtime.resume import Resume
from gportmap.runtime.service import Overrides, Service
from gportmap.runtime.supervisor import Supervisor
from gportmap.runtime.systemd import InheritedSockets, Notifier
from gportmap.runtime.upgrade import Upgrader, release_signals
from gportmap.runtime.watcher import choose_mode
from gportmap.runtime.workers import Channel, WorkerLink, WorkerPool, resolve_workers, worker_command
from gportmap.stats import StatsRegistry

logger = get_logger()

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
MAX_WORKERS = 256
DEFAULT_RULES = os.path.join("rules", "rules.json")
#: Seconds a stop waits for a reload in progress before closing the listeners (the
#: supervisor starts nothing more once they are closed, so this only keeps a reload
#: from being cut mid-way in the usual case).
STOP_RELOAD_WAIT = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gportmap",
        description="Forward TCP ports according to a JSON rules file.",
        epilog="The rules file is RULES, else -c, else $CONFIG_PATH, else rules/rules.json. "
        "'gportmap ctl --help': the command-line client of a running gportmap.",
    )
    parser.add_argument("rules", nargs="?", metavar="RULES", help="path of the rules file")
    parser.add_argument("-c", "--config", metavar="RULES", help="path of the rules file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the rules, print one line per rule and exit (0 valid, 2 invalid)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="overrides settings.logFormat")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL; overrides settings.logLevel",
    )
    parser.add_argument(
        "--admin",
        type=admin_address,
        metavar="HOST:PORT|off",
        help="where the admin endpoint listens (replaces settings.admin.listen), or off",
    )
    parser.add_argument(
        "--workers",
        type=workers_count,
        metavar="N|auto",
        help="processes sharing every listening port (SO_REUSEPORT, Linux); auto = one per core; "
        "overrides settings.workers",
    )
    parser.add_argument("--version", action="version", version=f"gportmap {__version__}")
    # How a master starts its workers; not for people.
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    # An upgrade's pre-flight: does this code read that version of the state document?
    parser.add_argument("--upgrade-state", type=int, help=argparse.SUPPRESS)
    return parser


def workers_count(text: str) -> int | str:
    """``--workers``: a count from 1, or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_WORKERS} or auto, got {text!r}")
    return count


def admin_address(text: str) -> str | tuple[str, int]:
    """``--admin``: "off" or HOST:PORT ([IPV6]:PORT)."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reads_version(version: int) -> bool:
    """Whether this code reads an upgrade's state document of ``version``: imported
    here, not at the top, since only an upgrade's pre-flight asks."""
    from gportmap.runtime.carry import reads_version

    return reads_version(version)


def resolve_rules_path(args: argparse.Namespace, environ: os._Environ | dict = os.environ) -> str:
    """Positional argument, then -c, then $CONFIG_PATH, then rules/rules.json."""
    return args.rules or args.config or environ.get("CONFIG_PATH") or DEFAULT_RULES


def check(path: str, upgrade_state: int | None = None) -> int:
    """``--check``: validate and describe the rules; binds nothing. With
    ``upgrade_state`` (an upgrade's pre-flight), also refuse a state document
    version this code does not read."""
    if upgrade_state is not None and not _reads_version(upgrade_state):
        print(f"this gportmap cannot take over from a running one: it does not read upgrade state "
              f"version {upgrade_state}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return EXIT_USAGE
    rows = [
        (r.name, r.protocol, r.listen, f"-> {r.target}", "enabled" if r.enabled else "disabled")
        for r in config.rules
    ]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{path}: {len(rows)} rule(s), valid")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:  # the client (a rules file named ctl: give it as ./ctl)
        from gportmap.ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rules and args.config and args.rules != args.config:
        parser.error("give the rules file once: as RULES or with -c, not both")
    if args.worker_fd is not None:
        return worker_main(args)
    path = resolve_rules_path(args)
    if args.check:
        return check(path, args.upgrade_state)

    setup_logging(args.log_format or "text", args.log_level or "INFO")
    resume = Resume.from_environ()  # an upgrade in place handed over its state
    try:
        config = resume.load(path) if resume is not None else load(path)
    except ConfigError as exc:
        emit(
            logger,
            ConfigInvalid(path=path, errors=exc.errors, outcome=f"the rules file is invalid ({exc.count}); nothing started"),
        )
        return EXIT_USAGE
    overrides = Overrides(args.log_format, args.log_level, args.admin, args.workers)
    setup_logging(*overrides.logging(config.settings))
    inherited = InheritedSockets.from_environ()  # systemd's socket activation, if any
    if resume is not None:
        inherited = resume.inherited(inherited)
    features = detect()
    workers = resolve_workers(overrides.workers or config.settings.workers)
    if resume is not None:
        workers = resume.workers(workers)  # an upgrade keeps the processes it had
    if workers > 1 and inherited is not None:
        emit(logger, UsageError(workers=workers, sockets=len(inherited)))
        inherited.close()
        return EXIT_USAGE
    if workers > 1 and not features.reuse_port:
        emit(logger, UsageError(workers=workers))
        return EXIT_USAGE
    backend = (
        WorkerPool(workers, worker_command(workers, args.log_format, args.log_level)) if workers > 1 else None
    )
    if resume is not None and backend is not None:
        resume.adopt_workers(backend)
    try:
        return run(config, overrides, features, backend, inherited=inherited, resume=resume)
    except GportmapError as exc:
        emit(logger, Fatal(error=str(exc)))
        return EXIT_FATAL


def worker_main(args: argparse.Namespace) -> int:
    """A worker process: rules from the master over the inherited channel, listeners
    shared with the other workers, no admin endpoint, watcher or stats log."""
    import socket

    setup_logging(args.log_format or "text", args.log_level or "INFO", worker=args.worker_index)
    link = WorkerLink(Channel(socket.socket(fileno=args.worker_fd)), args.worker_index)
    resume = Resume.from_environ()  # upgraded in place: it runs the rules it ran
    try:
        if resume is not None:
            raw, path = resume.rules_raw(), resume.state.path
            link.resumed(resume.state.link_generation)
        else:
            raw, path = link.first_config()
        config = parse(raw, path)
    except (OSError, GportmapError, ValueError) as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
        emit(logger, WorkerFailed(errors=errors, what="the worker cannot start"))
        return EXIT_USAGE
    overrides = Overrides(args.log_format, args.log_level, "off", args.workers, worker=args.worker_index)
    setup_logging(*overrides.logging(config.settings), worker=args.worker_index)
    try:
        inherited = resume.inherited(None) if resume is not None else None
        return run(config, overrides, detect(), link=link, inherited=inherited, resume=resume)
    except GportmapError as exc:
        emit(logger, Fatal(error=str(exc)))
        return EXIT_FATAL


def run(
    config: Config,
    overrides: Overrides | None = None,
    features: Features | None = None,
    backend: WorkerPool | None = None,
    link: WorkerLink | None = None,
    inherited: InheritedSockets | None = None,
    resume: Resume | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; a second signal cuts the drain short. With a
    ``backend`` this is a master and its workers serve; with a ``link`` this is one
    of those workers. ``inherited``: sockets systemd passed (socket activation), or
    the listeners an upgrade in place handed over with ``resume``, its state."""
    features = features or detect()
    features = configure_relays(features)  # the relay mode (GPORTMAP_RELAY, GPORTMAP_PUMP) as detected at start, once
    # Only the main process talks to systemd (NotifyAccess=main): never a worker.
    notifier = Notifier.from_environ() if link is None else Notifier(None)
    route_gevent_errors()
    if features.fd_limit and backend is None:
        raise_fd_limit()
    stop, force = Event(), Event()

    def on_stop_signal(signum: int) -> None:
        if stop.is_set():
            emit(logger, Stopping(signal=signum))
            force.set()
        else:
            notifier.stopping(service.supervisor.stats.active)
            stop.set()

    def on_stats_signal(signum: int) -> None:
        plane.stats_log.log_now("signal")

    def on_reload_signal(signum: int) -> None:
        if link is not None:
            emit(logger, ReloadIgnored(signal=signum))
            return
        service.request_reload(ReloadSource.SIGNAL)  # queued: the applier logs the outcome

    open_files = open_file_limit() if features.fd_limit else None
    if link is not None:
        workers = resolve_workers(overrides.workers if overrides else None)
        stats = StatsRegistry(workers=workers, index=link.index)
        backend_here: RulesBackend = Supervisor(
            stats, splice=features.splice, reuse_port=True, open_files=open_files, inherited=inherited
        )
    else:
        backend_here = backend or Supervisor(
            splice=features.splice, open_files=open_files, inherited=inherited
        )
    service = Service(config, choose_mode(features), overrides, backend=backend_here, worker=link is not None)
    HealthProber.attach(service)  # active health checks: in a workers' master one prober for all; none in a worker
    plane = AdminPlane(service)  # a worker's master serves the endpoint and the stats log
    if link is None:
        service.on_applied.append(plane.apply)
        service.reload_listeners.append(notifier)
    # Handlers before the first rule starts: a signal during start-up is handled too.
    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            install_signal_handler(getattr(signal, name), on_stop_signal)
    if features.posix_signals:
        install_signal_handler(signal.SIGHUP, on_reload_signal)
        install_signal_handler(signal.SIGUSR1, on_stats_signal)

    def stop_services() -> None:  # what the drainer of an upgrade in place must not keep
        if link is not None:
            link.detach()  # the channel is the upgraded worker's now (first: the rest may yield)
        plane.stop()
        notifier.close()

    upgrader = Upgrader(service, stop_services, features, stop, link=link)
    if link is not None:
        link.on_upgrade = upgrader.run
    if hasattr(signal, "SIGUSR2"):
        install_signal_handler(signal.SIGUSR2, upgrader.request)
    release_signals()  # those an upgrade held across its exec are handled from here on
    if resume is not None:
        resume.prepare(service)
    changes = service.start()
    if resume is not None:
        resume.resume(service)
        upgrader.drainers = resume.pending  # still running: a further upgrade hands them on
    # What start-up built (modules, the rules, a port range's thousands of listeners)
    # lives as long as the process: out of the collector's sight, a full collection
    # no longer walks it, and no longer stalls the hub for tens of milliseconds.
    gc.freeze()
    if link is not None:
        link.serve(service, changes, stop)
    else:
        workers = backend.count if backend is not None else 1
        emit(
            logger,
            Started(
                version=__version__,
                config=config.path,
                pid=os.getpid(),
                rules=len(config.enabled_rules),
                workers=workers,
                features=features.enabled(),
            ),
        )
        if inherited is not None:
            inherited.report_unmatched(config.enabled_rules)
        notifier.ready(service)
    stop.wait()

    service.stop_reloading(STOP_RELOAD_WAIT)
    plane.stats_log.stop()
    supervisor = service.supervisor
    drain = service.config.settings.drain_timeout
    supervisor.close_listeners()
    emit(logger, Stopping(drain_timeout=drain, active=supervisor.stats.active))
    supervisor.drain(drain, force)
    service.stop_watching()
    plane.stop()
    notifier.close()
    emit(logger, Stopped())
    return EXIT_OK


def install_signal_handler(signum: int, callback: Callable[[int], None]) -> None:
    """gevent's handler runs the callback in a greenlet; where gevent cannot (some
    platforms), fall back to the plain signal module."""
    try:
        gevent.signal_handler(signum, callback, signum)
    except (ValueError, OSError, NotImplementedError, AttributeError):
        signal.signal(signum, lambda num, _frame: callback(num))


def open_file_limit() -> int | None:
    """The soft open-file limit now in force (after ``raise_fd_limit``), or None if unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft
