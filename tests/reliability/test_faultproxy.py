"""The fault-injecting proxy (tests/faultproxy.py) against a plain echo server: each fault does what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Iterator

import pytest
from faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, EchoServer)
        server.opened += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                break
            if not data:
                break
            self.request.sendall(data)
        server.closed += 1


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    opened = 0
    closed = 0


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.server_address[1], seed=1) as started:
        yield started


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_it_forwards_bytes_both_ways_in_order(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        payload = bytes(range(256)) * 4000  # 1 MB, many chunks
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        sender.join()
        assert got == payload


def test_latency_and_jitter_delay_each_exchange(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"warm")
        proxy.set(latency=0.3, jitter=0.05)
        took = []
        for i in range(3):
            started = time.monotonic()
            assert roundtrip(sock, f"ping {i}".encode()) == f"ping {i}".encode()
            took.append(time.monotonic() - started)
        # Held 0.3-0.35 s each way: never faster than 0.6 s a round trip.
        assert min(took) >= 0.6
        proxy.clear()
        started = time.monotonic()
        roundtrip(sock, b"fast")
        assert time.monotonic() - started < 0.6  # nothing held any more (a loose bound: a loaded machine)


def test_bandwidth_limits_throughput(proxy: FaultProxy) -> None:
    proxy.set(bandwidth=200_000)
    with connect(proxy, timeout=30) as sock:
        started = time.monotonic()
        assert roundtrip(sock, b"x" * 100_000) == b"x" * 100_000
        assert time.monotonic() - started >= 0.5  # 100 kB each way at 200 kB/s, pipelined: at least 0.5 s


def test_reset_is_an_rst_the_client_sees(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"hello")
        assert proxy.reset() == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(10):  # the RST may arrive after the first send
                sock.sendall(b"after")
                if not sock.recv(10):
                    raise ConnectionResetError("EOF instead of RST")
                time.sleep(0.05)
    # New connections work again at once.
    with connect(proxy) as sock:
        assert roundtrip(sock, b"again") == b"again"


def test_a_blackhole_holds_traffic_and_new_connections_then_delivers(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"before")
        proxy.blackhole(1.0)
        started = time.monotonic()
        sock.settimeout(0.5)
        sock.sendall(b"during")
        with pytest.raises(socket.timeout):
            sock.recv(10)  # nothing comes back while it lasts
        sock.settimeout(5)
        assert sock.recv(10) == b"during"  # held, not lost
        assert time.monotonic() - started >= 0.95
    proxy.blackhole(1.0)
    started = time.monotonic()
    with connect(proxy) as late:  # the kernel accepts; nothing gets through until it ends
        assert roundtrip(late, b"new") == b"new"
        assert time.monotonic() - started >= 0.95


def test_half_open_leaves_the_client_hanging_and_the_server_closed(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"hello")
        assert proxy.half_open() == 1
        deadline = time.monotonic() + 5
        while echo.closed < 1:  # the server saw its side close
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sock.settimeout(1.0)
        sock.sendall(b"anyone?")  # accepted by the proxy's socket: no RST
        with pytest.raises(socket.timeout):
            sock.recv(10)  # no reply, and no FIN either (that would be b"")
    with connect(proxy) as sock:
        assert roundtrip(sock, b"fresh") == b"fresh"


def test_refuse_fails_new_connections_at_once(proxy: FaultProxy) -> None:
    proxy.set(refuse=True)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        # The RST may come before connect() returns, or on the first exchange.
        with connect(proxy, timeout=2) as sock:
            sock.sendall(b"x")
            if not sock.recv(10):
                raise ConnectionResetError("EOF instead of RST")
    proxy.set(refuse=False)
    with connect(proxy) as sock:
        assert roundtrip(sock, b"ok") == b"ok"


def test_an_unknown_fault_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(TypeError, match="no such fault"):
        proxy.set(lattency=1)
