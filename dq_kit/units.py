"""Byte units and the one byte formatter every message, table and panel uses.

Example:
    >>> human_bytes(1.5 * GIB), human_bytes(3 * MIB), human_bytes(-2048)
    ('1.50 GiB', '3.00 MiB', '-2.0 KiB')
"""

from __future__ import annotations

KIB = 2**10
MIB = 2**20
GIB = 2**30


def human_bytes(n_bytes: float) -> str:
    """``n_bytes`` in GiB, MiB or KiB, whichever reads best (tiny test models are KiB-sized).

    Example:
        >>> human_bytes(0.25 * GIB), human_bytes(12)
        ('0.25 GiB', '12 bytes')
    """
    size = abs(n_bytes)
    if size < 100:
        return f"{int(n_bytes)} bytes"
    if size >= 0.1 * GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    if size >= 0.1 * MIB:
        return f"{n_bytes / MIB:.2f} MiB"
    return f"{n_bytes / KIB:.1f} KiB"


def human_count(n: float) -> str:
    """A parameter count in B (billions), M, K or units, whichever reads best.

    Example:
        >>> human_count(10.67e9), human_count(134_515_008), human_count(135_744), human_count(12)
        ('10.67 B', '134.5 M', '135.7 K', '12')
    """
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)}"
