import pytest

from dario_lib.simulator import Simulator

from .helpers import make_settings, running_gateway


@pytest.fixture
def sim():
    simulator = Simulator().start()
    yield simulator
    simulator.stop()


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
