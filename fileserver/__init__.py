"""The afsfuse fileserver: durable volumes, FS.* handlers, callback promises and
their breaks, volume location and administration.

Run it with ``afs-fileserver serve``; embed it with
``fileserver.server.FileServer(fileserver.config.ServerConfig(data_dir=...))``.
"""

from fileserver.config import ServerConfig

__all__ = ["FileServer", "ServerConfig"]


def __getattr__(name: str) -> object:
    # Lazy, so ``import fileserver.config`` stays light for tools and tests.
    if name == "FileServer":
        from fileserver.server import FileServer

        return FileServer
    raise AttributeError(name)
