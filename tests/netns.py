"""Network tests run inside a network namespace of their own, and nowhere else.

``isolated`` wraps a test so that its whole body runs in a forked child in a
new network namespace (``baton_lab.netlab.in_new_netns``: only ``lo``, up;
IPv6 off on new links); the daemons the body starts (the broker, which
creates the taps; the supervisor, which configures them) inherit it, so
nothing the test does can reach any other network. Fixtures are made in the
parent: use only ones that start no process (``root``), and start the
daemons in the body.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from baton_lab.netlab import IsolatedFailure, in_new_netns


def isolated(timeout: float = 240.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated test's body in a new network namespace (a forked child)."""

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            try:
                in_new_netns(lambda: test(*args, **kwargs), timeout)
            except IsolatedFailure as e:
                pytest.fail(str(e), pytrace=False)

        return wrapper

    return decorate
