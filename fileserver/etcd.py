"""A small etcd v3 client over etcd's JSON gateway (HTTP), for trio.

etcd 3.4 serves its gRPC API as JSON at ``/v3/...`` (keys and values
base64, 64-bit numbers as strings).  This module wraps the few calls the
VLDB needs: ``range`` (one key or a prefix), ``put`` (optionally bound to a
lease), ``delete``, a compare-and-put ``txn``, and leases (``grant``,
``keepalive_once``, ``revoke``).  ``EtcdClient`` takes several endpoints
(one per cluster member) and moves to the next when one does not answer,
so losing one member of a cluster is invisible to callers.

May import: httpx, trio, the standard library.  Nothing of the fileserver.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import trio

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]


class EtcdError(Exception):
    """etcd refused a request (``code`` is etcd's gRPC status code)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered (``electing``: some answered, without a quorum)."""

    electing = False


def parse_endpoints(url: str) -> list[Endpoint]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` -> [(host, port), ...]."""
    if not url.startswith("etcd://"):
        raise ValueError(f"not an etcd:// URL: {url!r}")
    out = []
    for part in url[len("etcd://") :].strip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad etcd endpoint {part!r} in {url!r}")
        out.append((host.strip("[]"), int(port)))
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"  # every key


class EtcdClient:
    """etcd v3 through the JSON gateway.  Use as ``async with EtcdClient(eps)``."""

    def __init__(self, endpoints: Sequence[Endpoint], *, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self._current = 0  # the endpoint that answered last
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the endpoint that answered last, then each other in turn.

        When members answer but none has a quorum behind it (a leader
        election after a member died: "leader changed", "no leader"), try
        them all again a few times over about 3 s: an election settles in a
        few election timeouts.  Endpoints that do not answer at all fail at
        once."""
        delay = 0.1
        for _attempt in range(5):
            try:
                return await self._post_once(path, body)
            except EtcdUnavailable as exc:
                if not exc.electing:
                    raise
                await trio.sleep(delay)
                delay *= 2
        return await self._post_once(path, body)

    async def _post_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        electing = False
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._current + i) % n
            host, port = self.endpoints[idx]
            url = f"http://{host}:{port}{path}"
            try:
                resp = await self._http.post(url, content=json.dumps(body))
            except httpx.HTTPError as exc:
                last = exc
                continue
            try:
                reply = resp.json()
            except ValueError:
                last = EtcdError(f"{url}: HTTP {resp.status_code}, not JSON")
                continue
            if isinstance(reply, dict) and "error" in reply:
                code = int(reply.get("code", 0))
                if code in (14, 4):  # UNAVAILABLE, DEADLINE_EXCEEDED: no quorum behind it
                    last = EtcdError(f"{url}: {reply['error']}", code)
                    electing = True
                    continue
                self._current = idx
                raise EtcdError(str(reply["error"]), code)
            if resp.status_code != 200 or not isinstance(reply, dict):
                last = EtcdError(f"{url}: HTTP {resp.status_code}")
                continue
            self._current = idx
            return reply
        err = EtcdUnavailable(f"no etcd endpoint of {self.endpoints} answered: {last!r}")
        err.electing = electing
        raise err

    # -- keys -------------------------------------------------------------------

    async def range(self, key: bytes, *, prefix: bool = False) -> list[tuple[bytes, bytes, int]]:
        """``[(key, value, mod_revision), ...]`` for ``key`` or every key under it."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        reply = await self._post("/v3/kv/range", body)
        return [
            (_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv.get("mod_revision", 0)))
            for kv in reply.get("kvs", [])
        ]

    async def get(self, key: bytes) -> bytes | None:
        kvs = await self.range(key)
        return kvs[0][1] if kvs else None

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self._post("/v3/kv/put", body)

    async def delete(self, key: bytes) -> int:
        reply = await self._post("/v3/kv/deleterange", {"key": _b64(key)})
        return int(reply.get("deleted", 0))

    async def put_if(self, key: bytes, value: bytes, mod_revision: int) -> bool:
        """Put only if ``key`` was last changed at ``mod_revision`` (0: absent)."""
        cmp: dict[str, Any] = {"key": _b64(key), "result": "EQUAL"}
        if mod_revision:
            cmp.update(target="MOD", mod_revision=str(mod_revision))
        else:
            cmp.update(target="CREATE", create_revision="0")
        put = {"request_put": {"key": _b64(key), "value": _b64(value)}}
        reply = await self._post("/v3/kv/txn", {"compare": [cmp], "success": [put]})
        return bool(reply.get("succeeded"))

    # -- leases -----------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        reply = await self._post("/v3/lease/grant", {"TTL": str(int(ttl))})
        return int(reply["ID"])

    async def keepalive_once(self, lease: int) -> int:
        """Renew ``lease``; its new TTL, or 0 when it has expired (keys gone)."""
        reply = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != 5:  # NOT_FOUND: it lapsed already
                raise

    async def status(self) -> dict[str, Any]:
        return await self._post("/v3/maintenance/status", {})


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def loads(data: bytes) -> Any:
    return json.loads(data.decode())
