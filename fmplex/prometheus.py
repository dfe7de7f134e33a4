"""Prometheus text exposition, parsed: shared by the CLI, the watchdog and the autoscaler.

Pure (no client libraries): Triton's metrics port is read with urllib by the callers.
"""

from __future__ import annotations

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str, prefixes: tuple[str, ...] = ("fmplex_",)) -> Series:
    """Prometheus text exposition -> {(name, labels): value}, only the named families."""
    out: Series = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(prefixes):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            pairs = []
            for part in labels.rstrip("}").split('",'):
                if "=" in part:
                    k, v = part.split("=", 1)
                    pairs.append((k.strip(), v.strip().strip('"')))
            out[(name, frozenset(pairs))] = float(value)
        except ValueError:
            continue
    return out
