"""The lab: real fileserver and client processes for scenarios, benchmarks
and integration tests.

``afsfuse.lab.server`` starts a fileserver (a subprocess, or inside a trio
loop) and gives a protocol-level client; ``afsfuse.lab.mount`` starts and
stops client mounts; ``afsfuse.lab.admin`` reads a running server's counters.
May import ``protocol``, ``fileserver`` and ``afsfuse``; nothing in the
cache-manager core imports it.
"""
