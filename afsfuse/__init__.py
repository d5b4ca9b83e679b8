"""afsfuse client: the cache manager that keeps a local cache coherent through
AFS-style callback promises.

The core (``cache_manager.CacheManager`` and the modules it uses: server
records, volume instances, vnodes, validation, the CB.* service, directory
listings, the data cache) never imports pyfuse3; a thin FUSE adapter drives it
and drains its kernel-invalidation queue.  See ``afsfuse.cache_manager`` for
the operations API.
"""
