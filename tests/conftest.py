import shutil
import tempfile

import pytest

from dario_lib.simulator import Simulator

from .helpers import make_settings, running_gateway


@pytest.fixture
def sim():
    simulator = Simulator().start()
    yield simulator
    simulator.stop()


@pytest.fixture
def redis_server():
    """A redis-server of this test's own on a free loopback port (tests/redis_kit.py);
    skipped with a reason when redis-server is not installed."""
    from . import redis_kit
    server = redis_kit.redis_server()
    yield server
    server.close()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "dario-home"
    path.mkdir()
    return path


@pytest.fixture
def gateway(sim, home):
    """A gateway in front of the simulator, with default settings."""
    with running_gateway(make_settings(home, sim.url)) as server:
        yield server


def pytest_configure(config):
    """Each run's temporary files go to a folder of its own, removed when the run ends: a
    run leaves nothing in /tmp, and two runs at once never clean up each other's files
    (pytest's shared numbered folders would)."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="dario-tests-")
        config._dario_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    folder = getattr(config, "_dario_basetemp", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
