"""The WKV6 operator. `wkv6` validates its arguments and dispatches to the fastest path."""
from __future__ import annotations

from .reference import wkv6_reference

__all__ = ["wkv6", "wkv6_reference"]


def wkv6(r, k, v, w, u, state=None):
    # Placeholder dispatch until the fast paths land: the reference recurrence.
    return wkv6_reference(r, k, v, w, u, state)
