"""Compatibility name: the timeline moved into the package, ``afsfuse.lab.timeline``."""

from afsfuse.lab.timeline import (  # noqa: F401
    CLIENT_SLACK,
    Event,
    Timeline,
    parse_client_log,
    parse_server_log,
    render,
    write_json,
)
