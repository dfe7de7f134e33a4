"""free_ports: ports a tritonserver can bind, away from the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from fmplex.control.server import free_ports


def test_three_distinct_bindable_ports_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        ports = free_ports()
        values = [ports.http, ports.grpc, ports.metrics]
        assert len(set(values)) == 3
        if low > 21000:  # outgoing connections take ports from the range, Ray workers below 20000
            assert all(20000 <= p < low for p in values)
        for p in values:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))  # free now
