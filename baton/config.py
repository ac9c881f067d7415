"""``DIR/etc/baton/baton.toml``: daemon settings, parsed with tomllib and validated.

Errors name the file, the key, what was expected and what was found (and
the line, where tomllib gives one). A missing file means the built-in
defaults; unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.paths import Paths
from baton.schema import AnyMap, Bool, Field, Int, ListOf, OneOf, SchemaError, Str, record


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.detail = message


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None


def _mode(text: str) -> int:
    return int(text, 8)


#: The broker socket's group: every jailed worker holds it (its only supplementary
#: group), so a worker in its own uid reaches the socket with no mode 0666; no
#: account on the host should have it.
WORKER_GID = 699999

BROKER_SCHEMA = record(
    socket_mode=Field(Str(8, pattern=r"0?[0-7]{3}"), "0660"),
    # 0: root's group (no jailed worker can connect unless socket_mode opens it to all)
    socket_gid=Field(Int(0, 2**32 - 2), WORKER_GID),
    admin_uids=Field(ListOf(Int(0, 2**32 - 2), 64), factory=lambda: [0]),
    open_allow=Field(ListOf(Str(4096), 256), factory=list),
    allow_tun=Field(Bool(), True),
    max_connections=Field(Int(1, 65536), 1024),
    # Per non-administrator uid (administrators are bounded by max_connections only).
    max_connections_per_uid=Field(Int(1, 65536), 128),
    # Per-VM quotas. The upper bounds keep every fd.list reply of one VM far
    # below the 16 MiB message limit, however the quotas are set.
    max_fds_per_vm=Field(Int(1, 1024), 256),
    max_label_bytes_per_vm=Field(Int(0, 1 << 20), 64 * 1024),
    busy_poll_us=Field(Int(0, 10_000), 100),
)


@dataclass(frozen=True)
class BrokerConfig:
    socket_mode: int
    socket_gid: int
    admin_uids: tuple[int, ...]
    open_allow: tuple[str, ...]
    allow_tun: bool
    max_connections: int
    max_connections_per_uid: int
    max_fds_per_vm: int
    max_label_bytes_per_vm: int
    busy_poll_us: int


RESTART_POLICIES = ("no", "on-failure")

SUPERVISOR_SCHEMA = record(
    socket_mode=Field(Str(8, pattern=r"0?[0-7]{3}"), "0600"),
    admin_uids=Field(ListOf(Int(0, 2**32 - 2), 64), factory=lambda: [0]),
    restart=Field(OneOf(RESTART_POLICIES), "on-failure"),
    restart_max=Field(Int(0, 1000), 5),
    restart_window_s=Field(Int(1, 86400), 60),
    restart_backoff_ms=Field(Int(0, 600_000), 500),
    start_timeout_s=Field(Int(1, 3600), 30),
    stop_timeout_s=Field(Int(1, 3600), 10),
    broker_wait_s=Field(Int(0, 3600), 30),
    # A worker that lives but does not answer is reported "unresponsive" and left
    # alone; with a value here it is killed (confirmed dead) after that many
    # seconds and the restart policy applies. 0: never.
    unresponsive_kill_s=Field(Int(0, 86400), 0),
    # The control socket: connections at a time (one more is refused with an
    # error), and how long one may sit idle between requests before it is closed.
    max_connections=Field(Int(1, 65536), 128),
    idle_timeout_s=Field(Int(1, 86400), 300),
    # Each VM's console log is rotated (copied to NAME.console.log.1, then
    # truncated) once it passes this size; this many old copies are kept.
    console_log_max_bytes=Field(Int(4096, 1 << 40), 4 << 20),
    console_log_keep=Field(Int(1, 100), 3),
    # Start VMs whose memory exceeds the host's MemAvailable (VM files may say so too).
    overcommit=Field(Bool(), False),
)

UPGRADE_SCHEMA = record(
    prepare_timeout_s=Field(Int(1, 3600), 30),
    handoff_timeout_ms=Field(Int(10, 600_000), 5000),
    commit_timeout_ms=Field(Int(10, 600_000), 5000),
    commit=Field(OneOf(("worker", "supervisor")), "worker"),
    max_parallel=Field(Int(1, 256), 1),
    # A pre-warmed incoming worker per VM (supervisor.standby); VM files may override.
    standby=Field(Bool(), False),
    # Standbys offer their private memory to the kernel's page merging while they
    # idle (vmm.idle_merge); merges only where the host runs ksmd.
    standby_merge=Field(Bool(), False),
    # Fork baton-vmm workers from a zygote per worker command (supervisor.zygote).
    zygote=Field(Bool(), True),
    # Old workers' exits and pauses never overlap (supervisor.priority.Exclusion): off by
    # default, it moved no figure on the hosts measured and slowed 100-VM rollouts.
    exclusive_teardown=Field(Bool(), False),
    # The two workers of a worker-commit pause run SCHED_FIFO (supervisor.priority.urgent).
    realtime_pause=Field(Bool(), True),
)

# "host:port" or "[v6addr]:port"; "" (the default) is off.
LISTEN_PATTERN = r"|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}"

METRICS_SCHEMA = record(
    listen=Field(Str(300, pattern=LISTEN_PATTERN), ""),
    # For node_exporter's textfile collector, which reads only *.prom files.
    textfile=Field(Str(4096, pattern=r"|/.*\.prom"), ""),
    textfile_interval_s=Field(Int(1, 86400), 15),
)

TOP_SCHEMA = record(
    broker=Field(AnyMap(), factory=dict),
    supervisor=Field(AnyMap(), factory=dict),
    upgrade=Field(AnyMap(), factory=dict),
    metrics=Field(AnyMap(), factory=dict),
    jail=Field(AnyMap(), factory=dict),  # checked by supervisor.jail (JAIL_SCHEMA)
)


@dataclass(frozen=True)
class SupervisorConfig:
    socket_mode: int
    admin_uids: tuple[int, ...]
    restart: str
    restart_max: int
    restart_window_s: int
    restart_backoff_ms: int
    start_timeout_s: int
    stop_timeout_s: int
    broker_wait_s: int
    unresponsive_kill_s: int
    max_connections: int = 128
    idle_timeout_s: int = 300
    console_log_max_bytes: int = 4 << 20
    console_log_keep: int = 3
    overcommit: bool = False


@dataclass(frozen=True)
class UpgradeConfig:
    prepare_timeout_s: int
    handoff_timeout_ms: int
    commit_timeout_ms: int
    commit: str  # "worker": the new worker resumes by itself before a deadline
    max_parallel: int
    standby: bool = False  # a pre-warmed incoming worker per VM (supervisor.standby)
    standby_merge: bool = False  # standbys' memory offered to KSM while idle (vmm.idle_merge)
    zygote: bool = True  # fork baton-vmm workers from a zygote (supervisor.zygote)
    exclusive_teardown: bool = False  # exits wait for pauses (supervisor.priority.Exclusion)
    realtime_pause: bool = True  # the pause's workers SCHED_FIFO (supervisor.priority.urgent)


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus metrics of the supervisor (``supervisor.metrics``)."""

    listen: tuple[str, int] | None = None  # (host, port) to serve /metrics on; None: off
    textfile: Path | None = None  # rewritten atomically; None: off
    textfile_interval_s: int = 15

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None


@dataclass(frozen=True)
class Settings:
    """Everything in baton.toml."""

    broker: BrokerConfig
    supervisor: SupervisorConfig
    upgrade: UpgradeConfig
    metrics: MetricsConfig = MetricsConfig()


def _section(paths: Paths, raw: dict[str, Any], name: str, schema: Any) -> dict[str, Any]:
    try:
        return schema.check(raw.get(name, {}), name)
    except SchemaError as e:
        raise ConfigError(paths.config_file, str(e)) from None


def load_settings(paths: Paths) -> Settings:
    """baton.toml, validated whole (unknown sections and keys are errors)."""
    raw = load_toml(paths.config_file) if paths.config_file.exists() else {}
    try:
        TOP_SCHEMA.check(raw, "")
    except SchemaError as e:
        raise ConfigError(paths.config_file, str(e)) from None
    sup = _section(paths, raw, "supervisor", SUPERVISOR_SCHEMA)
    up = _section(paths, raw, "upgrade", UPGRADE_SCHEMA)
    return Settings(
        broker=broker_config(paths, raw),
        supervisor=SupervisorConfig(
            **{
                **sup,
                "socket_mode": _mode(sup["socket_mode"]),
                "admin_uids": tuple(sup["admin_uids"]),
            }
        ),
        upgrade=UpgradeConfig(**up),
        metrics=metrics_config(paths, _section(paths, raw, "metrics", METRICS_SCHEMA)),
    )


def metrics_config(paths: Paths, m: dict[str, Any]) -> MetricsConfig:
    listen = None
    if m["listen"]:
        host, _, port = m["listen"].rpartition(":")
        if not 1 <= int(port) <= 65535:
            raise ConfigError(paths.config_file, f"metrics.listen: port {port} is out of range")
        listen = (host.removeprefix("[").removesuffix("]"), int(port))
    return MetricsConfig(
        listen=listen,
        textfile=Path(m["textfile"]) if m["textfile"] else None,
        textfile_interval_s=m["textfile_interval_s"],
    )


def broker_config(paths: Paths, raw: dict[str, Any] | None = None) -> BrokerConfig:
    """The ``[broker]`` table, with the image directory under the root allowed by default."""
    if raw is None:
        raw = load_toml(paths.config_file) if paths.config_file.exists() else {}
    b = _section(paths, raw, "broker", BROKER_SCHEMA)
    allow = b["open_allow"] or [str(paths.lib / "images" / "*")]
    return BrokerConfig(
        socket_mode=_mode(b["socket_mode"]),
        socket_gid=b["socket_gid"],
        admin_uids=tuple(b["admin_uids"]),
        open_allow=tuple(allow),
        allow_tun=b["allow_tun"],
        max_connections=b["max_connections"],
        max_connections_per_uid=b["max_connections_per_uid"],
        max_fds_per_vm=b["max_fds_per_vm"],
        max_label_bytes_per_vm=b["max_label_bytes_per_vm"],
        busy_poll_us=b["busy_poll_us"],
    )
