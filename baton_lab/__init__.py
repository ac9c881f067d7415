"""A complete Baton host under a temporary root, for the demo, the tests and the benchmarks.

``baton_lab.harness`` starts the real daemons (broker, supervisor, workers)
under a root of its own and tears them down again; ``baton_lab.demo`` is
``make demo`` (also installed as ``baton-demo``). Nothing in ``baton``,
``broker``, ``vmm`` or ``supervisor`` imports this package: it sits above them
all.
"""
