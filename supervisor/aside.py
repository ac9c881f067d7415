"""One call run on a thread of its own, to overlap the caller's next ones.

Why: a cold upgrade's steps are mostly round trips (to the broker, to a worker)
and fsyncs, each of which leaves the supervisor idle; two that need nothing of
each other can run at once (the new worker's token minted while its jail is
prepared, the lease offer made while the old worker answers ``check``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Aside(threading.Thread, Generic[T]):
    """``call`` started at once; ``result`` waits for it and returns or raises what it did."""

    def __init__(self, call: Callable[[], T], name: str = "aside") -> None:
        super().__init__(name=name, daemon=True)
        self._call = call
        self._value: T | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as e:  # handed to whoever asks for the result
            self.error = e

    def result(self) -> T:
        self.join()
        if self.error is not None:
            raise self.error
        return self._value  # type: ignore[return-value]
