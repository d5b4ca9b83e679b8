"""Cell key handshake: mutual HMAC challenge-response (SPEC section 4).

Every machine of a cell holds the same random *cell key* (the fileserver
creates it, mode 0600, in its data dir).  A connection is authenticated in
two calls, before anything else may run on it::

    client                                   server
    Auth.Challenge(cn)          ------->     sn = fresh random nonce
                                <-------     {nonce: sn, proof: H("server", cn, sn)}
    checks the server's proof (CB.* handlers run only after this)
    Auth.Prove(H("client", sn, cn)) ---->    checks it; the connection is now
                                             authenticated (sn is used up)

``H(label, a, b) = HMAC-SHA256(key, "afsfuse-v1 " + label + NUL + a + b)``.
The labels keep the two directions apart (a proof one side produces can
never serve as the other side's proof), and the server's fresh nonce per
connection makes a recorded ``Auth.Prove`` useless on any other connection.
Only proofs travel; the key never does.  Traffic is not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from protocol.errors import AuthError

log = logging.getLogger(__name__)

AUTH_CHALLENGE = "Auth.Challenge"
AUTH_PROVE = "Auth.Prove"
NONCE_BYTES = 32
KEY_BYTES = 32
#: File name of the cell key in a fileserver's data directory.
KEY_FILE = "cell.key"


def proof(key: bytes, label: str, first: bytes, second: bytes) -> bytes:
    msg = b"afsfuse-v1 " + label.encode() + b"\0" + first + second
    return hmac.new(key, msg, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def check_nonce(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != NONCE_BYTES:
        raise AuthError(f"nonce must be {NONCE_BYTES} bytes (bin)")
    return v


def create_key(path: Path) -> bytes:
    """Create a random cell key at ``path`` (mode 0600) unless one exists; return it."""
    path = Path(path)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        log.info("created cell key %s", path)
    return load_key(path)


def load_key(path: Path | str) -> bytes:
    """Read a cell key file (hex text); warn when others may read it."""
    path = Path(path)
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: not a hex cell key") from None
    if len(key) < 16:
        raise ValueError(f"{path}: cell key too short")
    if path.stat().st_mode & 0o077:
        log.warning("cell key %s is readable by group/others (chmod 600 it)", path)
    return key


async def client_handshake(conn: Any, key: bytes, timeout: float | None = None) -> None:
    """Run the client side on a ``protocol.Connection``; marks it authenticated.

    Raises ``RpcError("EACCES")`` when the server does not prove the key (the
    caller closes the connection)."""
    cn = new_nonce()
    reply = await conn.call(AUTH_CHALLENGE, cn, timeout=timeout)
    if not isinstance(reply, dict):
        raise AuthError("malformed Auth.Challenge reply")
    sn, sproof = reply.get("nonce"), reply.get("proof")
    if type(sn) is not bytes or type(sproof) is not bytes or len(sn) != NONCE_BYTES:
        raise AuthError("malformed Auth.Challenge reply")
    if not hmac.compare_digest(sproof, proof(key, "server", cn, sn)):
        log.warning("%s: server failed to prove the cell key", conn.name)
        raise AuthError("server does not know the cell key")
    # The server is who we think: its CB.* calls may run from now on.
    conn.set_authenticated()
    await conn.call(AUTH_PROVE, proof(key, "client", sn, cn), timeout=timeout)


class ServerAuth:
    """The server side, as two handlers bound to one cell key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    async def challenge(self, conn: Any, client_nonce: Any) -> dict[str, bytes]:
        cn = check_nonce(client_nonce)
        if "auth_nonce" in conn.context or conn.authenticated:
            raise AuthError("one Auth.Challenge per connection")
        sn = new_nonce()
        conn.context["auth_nonce"] = (sn, cn)
        return {"nonce": sn, "proof": proof(self.key, "server", cn, sn)}

    async def prove(self, conn: Any, client_proof: Any) -> None:
        pending = conn.context.pop("auth_nonce", None)
        # The nonce is used up whatever happens: a second try needs a new
        # connection (and the gate closes this one on the error anyway).
        conn.context["auth_nonce"] = None
        if conn.authenticated:
            return None
        if pending is None:
            raise AuthError("Auth.Prove without Auth.Challenge")
        sn, cn = pending
        if type(client_proof) is not bytes or not hmac.compare_digest(
            client_proof, proof(self.key, "client", sn, cn)
        ):
            log.warning("%s: client failed to prove the cell key", conn.name)
            raise AuthError("bad cell key proof")
        conn.set_authenticated()
        return None
