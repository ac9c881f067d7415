"""Baton: live upgrade of VMM processes whose guest RAM is held by a broker.

This package holds what every Baton process shares: paths, the wire
protocol, the RPC layer and the daemon plumbing.
"""

__version__ = "0.1.0"
