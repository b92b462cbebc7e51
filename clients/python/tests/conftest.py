"""Fixtures: the rld binary, daemons on private sockets, clients, fakes.

Integration tests need a built rld (see ``support.find_rld``). Without one
they are skipped, saying why, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterator, List

import pytest

import rld
from support import Daemon, FakeServer, find_rld, short_tempdir


@pytest.fixture(scope="session")
def rld_bin() -> str:
    path, why = find_rld()
    if path is None:
        message = f"no rld binary: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: integration tests must run)")
        pytest.skip(message)
    return path


@pytest.fixture
def start_daemon(rld_bin: str) -> Iterator[Callable[..., Daemon]]:
    """``start_daemon(config="", args=())`` starts an rld and returns it; all
    are stopped (by PID) at the end of the test."""
    started: List[Daemon] = []

    def start(config: str = "", args=()) -> Daemon:
        daemon = Daemon(rld_bin, config, args)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.cleanup()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    """A standalone rld with no rules (default action: allow)."""
    return start_daemon()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[rld.Client]:
    with rld.Client(daemon.socket, timeout=5) as c:
        yield c


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short private directory for sockets."""
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_server(sockdir: str) -> Iterator[Callable[..., FakeServer]]:
    """``fake_server(handler, max_connections=4)`` runs a scripted daemon on
    ``<sockdir>/fake.sock``; its ``path`` is the socket."""
    servers: List[FakeServer] = []

    def start(handler, max_connections: int = 4) -> FakeServer:
        path = os.path.join(sockdir, f"fake{len(servers)}.sock")
        server = FakeServer(path, handler, max_connections)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
