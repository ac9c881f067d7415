"""Emulated devices. Each owns its state: its versioned schema (a ``Component``)
is defined in its own module, and ``save()``/``restore()`` are driven from that
one field list. Guest access comes through the buses (``vmm.bus``)."""
