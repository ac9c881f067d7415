"""Kinds of worker the supervisor runs, one module each, behind ``base.WorkerKind``.

Nothing here imports a kind: the daemon builds its registry
(``supervisor.daemon.build_kinds``), so no kind imports another and none
imports the supervisor's service.
"""
