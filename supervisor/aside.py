"""One call run on a thread of its own, to overlap the caller's next ones.

Why: a cold upgrade's steps are mostly round trips (to the broker, to a worker)
and fsyncs, each of which leaves the supervisor idle; two that need nothing of
each other can run at once (the new worker's token minted while its jail is
prepared, the lease offer made while the old worker answers ``check``).

The threads are kept (``_Pool``): ``threading.Thread.start`` waits until the new
thread has run, a sleeping wake-up there and one back, 0.3-0.5 ms each time on
this nested host, on the caller's path; handing a call to a thread that waits
already costs the caller one ``notify`` (~0.05 ms).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: idle threads kept for the next call (a cold upgrade makes two or three at once)
KEEP = 4
#: "0" in the supervisor's environment: a new thread per call (the A/B switch)
POOL_ENV = "BATON_ASIDE_POOL"


class _Pool:
    """Daemon threads that wait for calls; one more is started when none is idle."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: list[Callable[[], None]] = []
        self._idle = 0
        self._pid = os.getpid()

    def submit(self, call: Callable[[], None]) -> None:
        with self._cond:
            if self._pid != os.getpid():  # a fork: its threads stayed behind
                self._calls, self._idle, self._pid = [], 0, os.getpid()
            self._calls.append(call)
            if self._idle > len(self._calls) - 1:
                self._cond.notify()
                return
        threading.Thread(target=self._run, name="aside", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    if self._idle >= KEEP:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                call = self._calls.pop(0)
            call()


_pool = _Pool()


class Aside(Generic[T]):
    """``call`` started at once; ``result`` waits for it and returns or raises what it did."""

    def __init__(self, call: Callable[[], T], name: str = "aside") -> None:
        self.name = name
        self._call = call
        self._value: T | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        if os.environ.get(POOL_ENV, "1") == "0":
            threading.Thread(target=self._run, name=name, daemon=True).start()
        else:
            _pool.submit(self._run)

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as e:  # handed to whoever asks for the result
            self.error = e
        finally:
            self._done.set()

    def join(self) -> None:
        self._done.wait()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        self.join()
        if self.error is not None:
            raise self.error
        return self._value  # type: ignore[return-value]
