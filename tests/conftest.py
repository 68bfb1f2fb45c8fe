"""Fixtures shared by the fleet server tests: real servers on 127.0.0.1 (port 0) and the clients of a test."""

import pytest

from fleet.server import ServerThread
from tests.test_fleet_server import make_config


@pytest.fixture
def make_server(tmp_path):
    """Start servers with make_config overrides; they stop after the test (and after its clients)."""
    servers = []

    def start(**overrides) -> ServerThread:
        servers.append(ServerThread(make_config(tmp_path, **overrides)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def clients():
    """Start clients through this list; they are all closed at the end of the test."""
    started = []

    def start(client):
        started.append(client.start())
        return client

    yield start
    for client in started:
        client.close(timeout=2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest (and reproducibly) on one thread, even more so on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
