"""An HAProxy that Serve's HAProxy mode left behind (its manager actor SIGKILLed when
``serve.shutdown()`` timed out) holds the cluster's stats port, and the next Serve on
that cluster cannot start (CI, stop 29: 25 tests errored on "cannot bind socket (Address
already in use)"). The real HAProxy binary Serve ships, orphaned the same way, is reaped.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offramp.cluster.local import haproxy_processes, reap_orphaned_haproxy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _haproxy_binary() -> str:
    try:
        from ray.serve._private.haproxy import get_haproxy_binary
        return get_haproxy_binary()
    except Exception as e:  # noqa: BLE001 - the binary ships with ray[serve]'s HAProxy extra
        pytest.skip(f"no HAProxy binary: {e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_an_orphaned_haproxy_on_the_stats_port_is_reaped(tmp_path: Path):
    binary = _haproxy_binary()
    stats, other = _free_port(), _free_port()

    def orphan(port: int) -> int:
        cfg = tmp_path / f"haproxy-{port}.cfg"
        cfg.write_text("defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
                       f"frontend stats\n  bind 127.0.0.1:{port}\n")
        # started by a shell that exits at once: the HAProxy's parent is gone, as after the
        # manager actor's SIGKILL
        out = subprocess.run(["sh", "-c", f"'{binary}' -f '{cfg}' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True, timeout=10)
        return int(out.stdout.strip())

    mine, theirs = orphan(stats), orphan(other)
    try:
        deadline = time.monotonic() + 10
        while _bindable(stats) or _bindable(other):
            assert time.monotonic() < deadline, "HAProxy did not bind its ports"
            time.sleep(0.1)
        assert f"127.0.0.1:{stats}" in haproxy_processes()[mine]

        assert reap_orphaned_haproxy(stats) == [mine]
        assert mine not in haproxy_processes() and _bindable(stats)
        assert theirs in haproxy_processes(), "an HAProxy on another port is someone else's"
        assert reap_orphaned_haproxy(stats) == []  # nothing left: a no-op
    finally:
        subprocess.run(["kill", "-9", str(mine), str(theirs)], capture_output=True)
