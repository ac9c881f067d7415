"""The systemd units in etc/systemd/ pass ``systemd-analyze verify``.

verify checks that every command a unit runs exists, so each unit is
copied with ``/usr/bin/baton-*`` and ``/usr/bin/vmctl`` replaced by the entry point this test's
interpreter has installed (the same console scripts a package puts in
/usr/bin). Skipped where systemd-analyze is missing (.ci/run installs it);
it needs no running systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "etc" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def installed_copies(dest: Path) -> list[Path]:
    """Every unit, with its baton commands pointing at the installed entry points."""
    bindir = Path(sys.executable).parent

    def local(m: re.Match[str]) -> str:
        script = bindir / m.group(1)
        assert script.exists(), f"a unit runs {m.group(0)}, but {script} is not installed"
        return str(script)

    out = []
    for unit in sorted(UNITS.glob("*.service")):
        copy = dest / unit.name
        copy.write_text(re.sub(r"/usr/bin/(baton-[a-z]+|vmctl)\b", local, unit.read_text()))
        out.append(copy)
    return out


def verify(units: list[Path]) -> tuple[int, list[str]]:
    """verify's exit status, and what it said about these units."""
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units[0].parent,
    )
    names = {u.name for u in units}
    said = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if any(n in line for n in names) or str(units[0].parent) in line
    ]
    return r.returncode, said


def test_units_verify(tmp_path: Path) -> None:
    units = installed_copies(tmp_path)
    assert {u.name for u in units} == {
        "baton-brokerd.service",
        "baton-supervisord.service",
        "baton-suspend.service",
    }
    code, said = verify(units)
    assert code == 0 and said == [], said


def test_verify_notices_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: a misspelt key and a missing command are reported."""
    broken = tmp_path / "baton-broken.service"
    broken.write_text(
        "[Service]\nType=notify\nKilMode=process\nExecStart=/nonexistent/baton-nothing\n"
    )
    code, said = verify([broken])
    text = "\n".join(said)
    assert "KilMode" in text
    assert code != 0 and "/nonexistent/baton-nothing" in text, text
