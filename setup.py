"""Packaging for gportmap. The JSON Schema of the rules file ships as package data."""

import re
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "gportmap" / "__init__.py").read_text()).group(1)

setup(
    name="gportmap",
    version=VERSION,
    description="A multi-protocol port mapper on gevent: TCP forwarding from a JSON rules file",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["gportmap", "gportmap.*"]),
    package_data={"gportmap.config": ["schema/*.json"], "gportmap.admin": ["static/*.html"]},
    include_package_data=True,
    # The plain relay's byte moving in C (gportmap/engine/_pump.c, Linux: epoll and
    # splice). Optional: where it cannot be built (no compiler, another platform)
    # the install goes on and gportmap relays in Python (gportmap.engine.hubrelay),
    # which is also what GPORTMAP_PUMP=off and GPORTMAP_PORTABLE=1 choose.
    ext_modules=[Extension("gportmap.engine._pump", ["gportmap/engine/_pump.c"], optional=True)]
    if sys.platform.startswith("linux")
    else [],
    install_requires=[
        "gevent>=23.9",
        "gevent-websocket>=0.10.1",
        "jsonschema>=4.18",
        "python-json-logger>=3.1",
        # The Prometheus text format and the standard process_* metrics, read
        # through a custom collector at scrape time (see gportmap/admin/metrics.py).
        "prometheus-client>=0.17",
        # Nothing platform-specific: the rules-file watcher reads inotify through
        # ctypes over libc (gportmap/inotify.py) and polls where there is none, so
        # every dependency installs from a wheel on Linux, macOS and Windows
        # (tests/test_packaging.py resolves them for each).
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "hypothesis>=6.90",
            "psutil>=5.9",
            "websocket-client>=1.6",  # drives headless Chromium over CDP, and the WebSocket tests
            "cryptography>=41",  # makes the tests' CAs and certificates
            "supervisor>=4.2",  # tests/test_deploy.py runs deploy/supervisord.conf for real
            "PyYAML>=6.0",  # parses deploy/kubernetes/*.yaml and deploy/docker-compose.yml
            "websockify>=0.11",  # the anchor of bench/compare.py's WebSocket rows (tests/test_bench.py)
            "packaging>=23",  # tests/test_packaging.py evaluates the dependency markers per platform
            "kubernetes-validate>=1.28",  # validates deploy/kubernetes/*.yaml against the API schemas, offline
            "mkdocs>=1.6",  # tests/test_docs.py builds the docs site with --strict
            "mkdocs-material>=9.5",  # its theme; configured to need no external assets
            "toxiproxy-python>=0.1.1",  # Toxiproxy's Python client drives gportmap's Toxiproxy API (tests/test_toxiproxy.py)
        ],
        "lint": ["ruff>=0.4"],
    },
    entry_points={
        "console_scripts": ["gportmap = gportmap.__main__:run"],
        # The built-in protocols register the way a plugin package registers its own.
        "gportmap.protocols": [
            "tcp = gportmap.protocols.tcp:TcpServer",
            "udp = gportmap.protocols.udp:UdpServer",
            "websocket = gportmap.protocols.websocket:WebSocketServer",
        ],
        "gportmap.plugins": [
            "bandwidth = gportmap.plugins.bandwidth:BandwidthLimiter",
            "connlog = gportmap.plugins.connlog:ConnectionLog",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Operating System :: Microsoft :: Windows",
        "Topic :: System :: Networking",
        "Framework :: gevent",
    ],
)
