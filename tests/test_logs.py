"""baton.logs: journald priority prefixes when stderr is the journal, plain lines elsewhere.

Each case runs a real process whose fd 2 is a file, with ``JOURNAL_STREAM``
set as systemd sets it (``st_dev:st_ino`` of the stream it connected to
stderr), or naming another file, or unset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import logging
from baton import logs
logs.setup("baton-test", debug=True)
log = logging.getLogger("supervisor")
log.debug("d-line")
log.info("i-line")
log.warning("w-line")
log.error("e-line")
"""


def run(stderr_path: Path, journal_stream: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "BATON_DEBUG")}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with open(stderr_path, "wb") as err:
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=err, env=env, check=True)
    return stderr_path.read_text().splitlines()


def stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_lines_have_priorities_and_no_timestamps(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    err.touch()
    lines = run(err, stream_of(err))
    assert lines == [
        "<7>supervisor: d-line",
        "<6>supervisor: i-line",
        "<4>supervisor: w-line",
        "<3>supervisor: e-line",
    ]


PLAIN = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} baton-test\[\d+\] (DEBUG|INFO|WARNING|ERROR) "
    r"supervisor: [diwe]-line"
)


@pytest.mark.parametrize("journal", ["unset", "another file"])
def test_elsewhere_lines_are_plain_and_timestamped(tmp_path: Path, journal: str) -> None:
    """Unset, or naming a stream that is not our stderr (a child that inherited the
    variable but writes to a log file): plain lines with their own timestamps."""
    err = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    lines = run(err, None if journal == "unset" else stream_of(other))
    assert len(lines) == 4
    for line in lines:
        assert PLAIN.fullmatch(line), line
        assert not line.startswith("<")
    assert [line.split()[3] for line in lines] == ["DEBUG", "INFO", "WARNING", "ERROR"]
