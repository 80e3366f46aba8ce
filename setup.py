"""Packaging: `pip install .` installs the `dario` command, the package and the man pages."""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    # Read, don't import: importing dario_lib at build time would need its dependencies.
    with open(os.path.join(HERE, "dario_lib", "__init__.py"), encoding="utf-8") as fh:
        found = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', fh.read(), re.M)
    if not found:
        raise RuntimeError("no __version__ in dario_lib/__init__.py")
    return found.group(1)


def readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return fh.read()


setup(
    name="dario",
    version=version(),
    description="A local gateway for the Anthropic API that halts on overage billing",
    long_description=readme(),
    long_description_content_type="text/markdown",
    py_modules=["dario"],
    packages=["dario_lib"],
    python_requires=">=3.10",
    install_requires=["requests>=2.28", "urllib3>=1.26"],
    # `redis`: the Redis store a team of gateways shares (store.url = redis://...).
    extras_require={"test": ["pytest", "hypothesis", "anthropic", "openai"], "redis": ["redis>=5.0"]},
    # main() returns the exit status; the generated script calls sys.exit(main()).
    entry_points={"console_scripts": ["dario = dario_lib.cli:main"]},
    data_files=[
        ("share/man/man1", ["man/dario.1"]),
        ("share/man/man5", ["man/dario-config.5"]),
    ],
    classifiers=[
        "Environment :: Console",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Programming Language :: Python :: 3",
    ],
)
