"""vmctl's hand parser for its commonest commands against argparse.

``supervisor.vmctl.quick_args`` reads ``[--root DIR] [--json] list`` and
``... status NAME`` without argparse (vmctl's start-up); whatever it accepts it
must read exactly as the full parser does, and whatever it does not must be
left to the full parser (None), so that every other command line, and every
mistake, behaves as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import vmctl


def full(argv: list[str]) -> dict[str, object] | None:
    """What argparse makes of ``argv`` (None: it refuses it, or prints help)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return vars(vmctl.build_parser().parse_args(argv, namespace=vmctl.Namespace()))
    except SystemExit:
        return None


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["--json", "list"],
        ["--root", "/tmp/r", "list"],
        ["--root=/tmp/r", "--json", "list"],
        ["--json", "--root", "/x", "--root", "/y", "list"],  # the last --root wins
        ["--root=", "list"],
        ["--root", "", "status", ""],
        ["status", "vm1"],
        ["--json", "status", "vm 1"],
        ["--root=-odd", "status", "vm1"],
    ],
)
def test_quick_reads_what_argparse_reads(argv: list[str]) -> None:
    quick = vmctl.quick_args(argv)
    assert quick is not None, argv
    assert vars(quick) == full(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["list", "-h"],
        ["--help", "list"],
        ["--js", "list"],  # an abbreviation: argparse's business
        ["--ro", "/x", "list"],
        ["list", "--json"],  # refused by argparse: must reach it
        ["list", "extra"],
        ["status"],
        ["status", "-x"],
        ["status", "a", "b"],
        ["--root", "-x", "list"],
        ["--root"],
        ["--json=1", "list"],
        ["--", "list"],
        ["start", "vm1"],
        ["upgrade", "--all"],
    ],
)
def test_quick_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    assert vmctl.quick_args(argv) is None


TOKENS = [
    "list", "status", "vm1", "", "-", "--", "-h", "--help", "--json", "--js", "--json=1",
    "--root", "--root=", "--root=/r", "--ro", "/r", "-1", "-x", "start", "upgrade",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=6))
def test_quick_never_disagrees_with_argparse(argv: list[str]) -> None:
    quick = vmctl.quick_args(argv)
    if quick is not None:
        assert vars(quick) == full(argv), argv


def test_list_imports_neither_argparse_nor_typing(tmp_path: object) -> None:
    """The point of the hand parser: the commonest commands start without these
    (json too: the human output needs none of it)."""
    code = (
        "import sys\n"
        "from supervisor import vmctl\n"
        f"rc = vmctl.main(['--root', {str(tmp_path)!r}, 'list'])\n"
        "assert rc == vmctl.EXIT_UNREACHABLE, rc\n"
        "heavy = {'argparse', 'typing', 'threading', 'shutil', 'json', 'rich',\n"
        "         'baton.config', 'baton.schema', 'broker.client'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert "the supervisor is not running" in r.stderr


def test_run_exits_with_main_s_code_and_message(tmp_path: object) -> None:
    """``run`` (the console script and -m) skips the teardown but not the exit code."""
    for args in (["list"], ["--json", "status", "vm1"], ["start", "vm1"]):
        r = subprocess.run(
            [sys.executable, "-m", "supervisor.vmctl", "--root", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == vmctl.EXIT_UNREACHABLE, (args, r.stderr)
        assert r.stdout == ""
        assert r.stderr.startswith("vmctl: the supervisor is not running"), r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(tmp_path), "list", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == vmctl.EXIT_USAGE and "unrecognized arguments: x" in r.stderr


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json spells them its own way
    | st.text()  # any code point: escaped as ensure_ascii does
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), SCALARS, max_size=6), max_size=4))
def test_to_json_of_flat_rows_is_json_dumps(rows: list[dict[str, object]]) -> None:
    assert vmctl.to_json(rows) == json.dumps(rows, indent=2, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_to_json_of_anything_is_json_dumps(data: object) -> None:
    assert vmctl.to_json(data) == json.dumps(data, indent=2, sort_keys=True)


def test_to_json_writes_a_vm_list_itself() -> None:
    rows = [
        {"name": "vm000", "pid": 7, "uptime_s": 1.5, "image": None, "autostart": True, "r": "é"},
        {"name": "vm001", "pid": None, "uptime_s": None, "image": "/x", "autostart": False},
    ]
    assert vmctl._flat_rows_json(rows) == json.dumps(rows, indent=2, sort_keys=True)
    assert vmctl._flat_rows_json([{"nested": {}}]) is None  # left to json
    assert vmctl._flat_rows_json([{"x": float("nan")}]) is None


@pytest.mark.parametrize("stdout", ["/dev/full", "closed", "/dev/null"])
def test_run_exits_as_sys_exit_would_when_the_output_fails(stdout: str) -> None:
    """The teardown skipped by ``run`` must not hide a failed write: a full disk or
    a closed stdout ends the same way as ``sys.exit(main())`` did."""

    def exit_of(tail: str) -> tuple[int, bool]:
        code = (
            "import sys\n"
            "from supervisor import vmctl\n"
            "vmctl.main = lambda argv: (print('x' * 100), 0)[1]\n"  # a listing, printed
            "sys.argv = ['vmctl', 'list']\n" + tail
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered
        with open(os.devnull if stdout == "closed" else stdout, "w") as out:
            r = subprocess.run(
                [sys.executable, "-c", code],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=60,
                preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
            )
        return r.returncode, "Exception ignored" in r.stderr or "Error" in r.stderr

    assert exit_of("vmctl.run()\n") == exit_of("sys.exit(vmctl.main(None))\n")
