"""An example third-party gportmap plugin package.

It registers two plugins and one protocol by entry point, exactly as any package
on PyPI would; gportmap finds them once the package is installed next to it.
"""

from setuptools import setup

setup(
    name="gportmap-example",
    version="1.0.0",
    description="Example plugins and a protocol for gportmap",
    packages=["gportmap_example"],
    python_requires=">=3.11",
    install_requires=["gportmap"],
    entry_points={
        "gportmap.plugins": [
            "uppercase = gportmap_example:UpperCase",
            "per-client-limit = gportmap_example:PerClientLimit",
        ],
        "gportmap.protocols": [
            "greeter = gportmap_example:GreeterServer",
        ],
    },
)
