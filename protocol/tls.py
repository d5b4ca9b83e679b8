"""Mutual TLS 1.3 bound to the cell (SPEC section 4.0, SECURITY.md).

Every connection (client <-> fileserver, VL lookups, admin, a fileserver
registering with a VL server) runs inside TLS 1.3; the cell key handshake of
``protocol.auth`` still runs inside it.  The trust root is a per-cell CA:

- the **cell CA** (``cell-ca.pem``: CA certificate and its private key,
  0600) lives next to the cell key (``DATA_DIR/cell.key`` by default) and is
  created with it at a fileserver's first start.  Servers of one cell share
  it as they share the key (copy both files, or point ``--key-file`` /
  ``--ca-file`` at one copy);
- each fileserver has its own certificate (``DATA_DIR/tls/server.pem``,
  0600), signed by the CA, renewed at start when it is within 30 days of
  expiry or was signed by another CA.  It carries the server UUID in its
  subject and both EKUs (serverAuth, and clientAuth for VL registration and
  the admin CLI);
- a client machine gets a **client bundle** (its certificate, its key, the
  CA certificate; 0600) from ``afs-fileserver issue-client-cert``; its
  certificate has only the clientAuth EKU, so OpenSSL's purpose check never
  accepts it as a server's;
- ``cell-ca.revoked`` next to the CA file is the deny-list: one serial (hex)
  per line.  A server re-reads it when it changes, refuses new connections
  with a listed certificate and closes the open ones.

A server asks OpenSSL to skip the client certificate's validity period and
checks it itself right after the handshake: then an expired (or revoked)
certificate gets a clear ``EACCES`` reply naming the reason on its first
call, instead of a bare TLS alert.  Nothing runs before that check.

May import: the standard library, trio, cryptography, ``protocol.errors``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import RpcError

log = logging.getLogger(__name__)

#: File name of the cell CA (certificate + private key), next to the cell key.
CA_FILE = "cell-ca.pem"
#: The deny-list of revoked client certificate serials, next to the CA file.
REVOKED_SUFFIX = ".revoked"
#: A fileserver's own certificate and key, under its data dir.
SERVER_CERT = Path("tls") / "server.pem"
#: Environment variable naming the client bundle (like $AFSFUSE_KEY_FILE).
CERT_ENV = "AFSFUSE_CERT_FILE"

CA_DAYS = 20 * 365
SERVER_DAYS = 365
CLIENT_DAYS = 365
#: A server certificate is renewed at start when it has less than this left.
RENEW_BEFORE = dt.timedelta(days=30)
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the server checks validity itself.
_NO_CHECK_TIME = 0x200000
_TLS_RECORD_HANDSHAKE = 0x16  # first byte of a TLS ClientHello


class TLSRefused(RpcError):
    """A TLS peer or credential problem; EACCES, with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__("EACCES", message)


# -- keys and certificates -----------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\r?\n?", re.S)


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode(), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


_CA_USAGE = dict.fromkeys(
    ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
     "key_agreement", "encipher_only", "decipher_only"], False,
) | {"key_cert_sign": True, "crl_sign": True}  # fmt: skip


def _not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


@dataclass
class CellCA:
    """The cell's certificate authority: signs server and client certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def revoked_file(self) -> Path:
        return self.path.with_name(self.path.name + REVOKED_SUFFIX)

    @classmethod
    def load(cls, path: Path | str) -> CellCA:
        path = Path(path)
        data = path.read_bytes()
        certs = [b for kind, b in _pem_blocks(data) if kind == "CERTIFICATE"]
        keys = [b for kind, b in _pem_blocks(data) if kind.endswith("PRIVATE KEY")]
        if not certs or not keys:
            raise ValueError(f"{path}: not a cell CA (needs a certificate and its key)")
        key = serialization.load_pem_private_key(keys[0], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: the CA key must be an EC key")
        if path.stat().st_mode & 0o077:
            log.warning("cell CA %s is readable by group/others (chmod 600 it)", path)
        return cls(x509.load_pem_x509_certificate(certs[0]), key, path)

    @classmethod
    def create(cls, path: Path | str, cell: str) -> CellCA:
        path = Path(path)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "afsfuse"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"afsfuse cell CA {cell}"[:64]),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(**_CA_USAGE),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(path, _cert_pem(cert) + _key_pem(key))
        log.info("created cell CA %s", path)
        return cls(cert, key, path)

    @classmethod
    def load_or_create(cls, path: Path | str, cell: str) -> CellCA:
        path = Path(path)
        return cls.load(path) if path.exists() else cls.create(path, cell)

    def issue(
        self,
        common_name: str,
        *,
        days: float,
        server: bool,
        hosts: Iterable[str] = (),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A new key and certificate signed by this CA (serverAuth+clientAuth
        for a server, clientAuth only for a client)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "afsfuse"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        sans: list[x509.GeneralName] = []
        for h in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(self.key, hashes.SHA256()), key

    def signed(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.cert)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False


def ca_file_for(key_file: Path | str) -> Path:
    """The default CA file: next to the cell key."""
    return Path(key_file).parent / CA_FILE


def ensure_server_cert(ca: CellCA, path: Path, uuid: str, hosts: Iterable[str]) -> Path:
    """``path`` holds a current certificate of this CA for this server (made if not)."""
    hosts = ["127.0.0.1", "localhost", socket.gethostname(), *hosts]
    cn = f"afsfuse fileserver {uuid}"
    if path.exists():
        try:
            blocks = _pem_blocks(path.read_bytes())
            cert = x509.load_pem_x509_certificate(next(b for k, b in blocks if k == "CERTIFICATE"))
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if (
                ca.signed(cert)
                and names
                and names[0].value == cn
                and _not_after(cert) - _now() > RENEW_BEFORE
            ):
                return path
        except (ValueError, StopIteration):
            pass
        log.info("renewing the server certificate %s", path)
    cert, key = ca.issue(cn, days=SERVER_DAYS, server=True, hosts=hosts)
    _write_private(path, _cert_pem(cert) + _key_pem(key) + ca.cert_pem)
    log.info("server certificate %s, serial %x", path, cert.serial_number)
    return path


def write_client_bundle(ca: CellCA, out: Path, *, days: float = CLIENT_DAYS,
                        name: str = "") -> x509.Certificate:  # fmt: skip
    """Issue a client certificate; write cert + key + CA cert to ``out`` (0600)."""
    cert, key = ca.issue(name or "afsfuse client", days=days, server=False)
    _write_private(Path(out), _cert_pem(cert) + _key_pem(key) + ca.cert_pem)
    # A record of what was issued, so a lost bundle's serial can be found.
    with open(ca.path.with_name(ca.path.name + ".issued"), "a") as f:
        f.write(f"{cert.serial_number:x} {_not_after(cert).isoformat()} {out} {name}\n")
    return cert


# -- revocation ------------------------------------------------------------------


def parse_serial(text: str) -> int:
    t = text.strip().lower().replace(":", "")
    if t.startswith("0x"):
        t = t[2:]
    if not t or not re.fullmatch(r"[0-9a-f]+", t):
        raise ValueError(f"not a certificate serial (hex): {text!r}")
    return int(t, 16)


def revoke(path: Path, serial: int) -> bool:
    """Add ``serial`` to the deny-list at ``path``; False if it was there."""
    if serial in DenyList(path).serials():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{serial:x}\n")
        f.flush()
        os.fsync(f.fileno())
    return True


class DenyList:
    """Revoked serials from a text file, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    def serials(self) -> frozenset[int]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            out: set[int] = set()
            if stamp != (0, 0, 0):
                for line in self.path.read_text().splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line:
                        try:
                            out.add(parse_serial(line))
                        except ValueError:
                            log.warning("%s: ignoring bad line %r", self.path, line)
            if self._stamp is not None:
                log.info("deny-list %s reloaded: %d serials", self.path, len(out))
            self._serials, self._stamp = frozenset(out), stamp
        return self._serials


# -- contexts ----------------------------------------------------------------------


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(cert_file: Path, ca: CellCA) -> ssl.SSLContext:
    """Requires a client certificate of the cell CA (validity checked by us)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file)
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    ctx.verify_flags |= _NO_CHECK_TIME  # type: ignore[assignment]
    # No session tickets: nothing to resume, and a client then sends its
    # certificate on every connection.
    ctx.num_tickets = 0
    return ctx


@dataclass
class ClientBundle:
    path: Path
    cert: x509.Certificate
    ca_pem: bytes

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> dt.datetime:
        return _not_after(self.cert)


def read_bundle(path: Path | str) -> ClientBundle:
    """A bundle or a server certificate file: leaf cert, key, CA cert."""
    path = Path(path)
    data = path.read_bytes()
    blocks = _pem_blocks(data)
    certs = [x509.load_pem_x509_certificate(b) for k, b in blocks if k == "CERTIFICATE"]
    if not any(k.endswith("PRIVATE KEY") for k, _ in blocks) or len(certs) < 2:
        raise ValueError(f"{path}: not a client bundle (certificate, key and cell CA)")
    leaf, cas = certs[0], []
    for c in certs[1:]:
        try:
            if c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                cas.append(c)
        except x509.ExtensionNotFound:
            pass
    if not cas:
        raise ValueError(f"{path}: the bundle holds no CA certificate")
    if path.stat().st_mode & 0o077:
        log.warning("client bundle %s is readable by group/others (chmod 600 it)", path)
    return ClientBundle(path, leaf, b"".join(_cert_pem(c) for c in cas))


def client_context(
    bundle: Path | str | ClientBundle, *, check_expiry: bool = True
) -> ssl.SSLContext:
    """Trusts only the bundle's cell CA and presents the bundle's certificate.

    Server names are not checked: any certificate the cell CA issued for the
    serverAuth purpose is a server of the cell (servers are found by VL
    address, and the cell key handshake and the UUID at Hello follow)."""
    b = bundle if isinstance(bundle, ClientBundle) else read_bundle(bundle)
    if check_expiry and b.not_after <= _now():
        raise TLSRefused(
            f"client certificate in {b.path} (serial {b.serial:x}) expired on "
            f"{b.not_after:%Y-%m-%d %H:%M} UTC; issue a new one "
            "(afs-fileserver issue-client-cert)"
        )
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(b.path)
    ctx.load_verify_locations(cadata=b.ca_pem.decode())
    return ctx


# -- streams -----------------------------------------------------------------------


#: Plaintext bytes in one TLS record at most.
RECORD = 16 * 1024


class TLSStream(trio.abc.Stream):
    """TLS records over a transport stream, after ``trio.SSLStream``'s handshake.

    The handshake (and ``aclose``, which sends close_notify) is trio's; data
    then goes straight between the stream's ``SSLObject``, its two memory
    BIOs and the transport.  trio's per-call machinery (its retry loop,
    locks and conflict checks, one record per ``receive_some``) cost about
    30 us per call here, more than encrypting a 4 KiB message, and a large
    reply took one trip per 16 KiB record.  Here:

    - ``receive_some`` decrypts every record already received, up to
      ``max_bytes``, into one buffer, reading the transport only when no
      whole record is left;
    - ``send_all`` encrypts the data and sends the records in one transport
      call; sends are serialised by a flag and a parking lot, so bytes a read
      had to queue (a TLS 1.3 KeyUpdate answer, an alert) never interleave
      with a send in progress.

    The connection layer already runs one reader and one writer per stream,
    so neither path ever waits on the other in practice.  Errors follow
    ``trio.SSLStream``: a TLS error or a transport EOF in mid-record is
    ``BrokenResourceError``; a close_notify is EOF (``b""``).

    If trio's private attributes are ever missing (a future trio), every call
    simply goes through the ``SSLStream``."""

    def __init__(self, ssl_stream: trio.SSLStream) -> None:
        self.ssl = ssl_stream
        self.transport = ssl_stream.transport_stream
        # trio's private parts; without them every call goes through trio.
        self._obj = getattr(ssl_stream, "_ssl_object", None)
        self._in = getattr(ssl_stream, "_incoming", None)
        self._out = getattr(ssl_stream, "_outgoing", None)
        self._lean = None not in (self._obj, self._in, self._out)
        self._sending = False
        self._send_lot = trio.lowlevel.ParkingLot()
        self._eof = False
        self._broken = False

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.ssl.getpeercert(binary_form)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._lean:
            return await self.ssl.receive_some(max_bytes)
        obj, incoming, out = self._obj, self._in, self._out
        assert obj is not None and incoming is not None and out is not None
        limit = max_bytes or TRANSPORT_READ
        while True:
            if self._eof:
                return b""
            # Plaintext never exceeds the ciphertext the BIO holds plus what
            # OpenSSL has already decrypted: size the buffer to that.
            cap = min(limit, incoming.pending + obj.pending())
            buf = bytearray(cap)
            view = memoryview(buf)
            n = 0
            try:
                while n < cap:
                    got = obj.read(min(RECORD, cap - n), view[n:])
                    if not got:  # close_notify
                        self._eof = True
                        break
                    n += got
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                await self._broke(exc)
            finally:
                view.release()
            if out.pending:
                await self._flush()
            if n:
                if n < cap:
                    del buf[n:]
                return buf
            if self._eof:
                return b""
            data = await self.transport.receive_some(TRANSPORT_READ)
            if data:
                incoming.write(data)
            else:
                # EOF: a record cut short or no close_notify is an error.
                incoming.write_eof()

    async def _flush(self, data: bytes | bytearray | memoryview | None = None) -> None:
        """Encrypt ``data`` (if any) and send every queued record, alone."""
        while self._sending:
            await self._send_lot.park()
        self._sending = True
        try:
            obj, out = self._obj, self._out
            assert obj is not None and out is not None
            if data is not None:
                try:
                    obj.write(data)
                except ssl.SSLError as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS: {_reason(exc)}") from exc
            if out.pending:
                await self.transport.send_all(out.read())
        finally:
            self._sending = False
            self._send_lot.unpark_all()

    async def _broke(self, exc: ssl.SSLError) -> NoReturn:
        """The session is dead: send the alert OpenSSL queued (best effort)."""
        self._broken = True
        out = self._out
        if out is not None and out.pending and not self._sending:
            with trio.move_on_after(0.5):
                try:
                    await self.transport.send_all(out.read())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        raise trio.BrokenResourceError(f"TLS: {_reason(exc)}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise trio.BrokenResourceError("TLS session broken")
        if not self._lean:
            await self.ssl.send_all(data)
            return
        await self._flush(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        # trio's close sends close_notify through the SSLObject, which a
        # session we found broken (trio does not know) cannot do: close the
        # transport itself then, and always in the end.
        try:
            if not self._broken:
                await self.ssl.aclose()
        finally:
            await trio.aclose_forcefully(self.transport)


#: Plaintext bytes handed to one ``SSLSocket.send`` (a few records).
SEND_CHUNK = 256 * 1024


class SocketTLSStream(trio.abc.Stream):
    """TLS on the socket itself: an ``ssl.SSLSocket`` in non-blocking mode,
    waited on with trio's ``wait_readable``/``wait_writable``.

    OpenSSL then reads and writes the socket directly: a record is decrypted
    from OpenSSL's own read buffer into the reply, and encrypted straight
    onto the socket.  Through memory BIOs (``trio.SSLStream``, ``TLSStream``)
    every byte is also copied into and out of a BIO and through Python
    objects: on this machine a 1 MiB round trip took 3.6 ms that way, 2.1 ms
    here, and 1.0 ms in plaintext; a 4 KiB one 113 / 74 / 68 us.

    Used for every TCP connection (``trio.SocketStream``); other streams get
    ``TLSStream``.  Semantics follow ``trio.SSLStream``: a TLS error is
    ``BrokenResourceError``; EOF is ``b""``; one task may receive while
    another sends (the connection layer runs one reader and one writer), as
    OpenSSL allows for TLS 1.3 on a non-blocking socket."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._closed = False
        self._broken: BaseException | None = None
        # Length of a write OpenSSL asked to retry (``send_nowait``): the next
        # piece ``send_all`` hands it must be the same bytes, of that length.
        self._retry_len = 0
        # The buffer ``receive_view`` decrypts into (made at the first receive, reused).
        self._rview: memoryview | None = None

    @classmethod
    async def handshake(
        cls, stream: trio.SocketStream, ctx: ssl.SSLContext, *, server_side: bool
    ) -> SocketTLSStream:
        """Take the stream's socket over and run the handshake on it.  On
        failure the socket is closed and the ssl/OS error raised."""
        raw = socket.socket(fileno=stream.socket.detach())
        raw.setblocking(False)
        try:
            ssock = ctx.wrap_socket(raw, server_side=server_side, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        self = cls(ssock)
        try:
            while True:
                try:
                    ssock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(ssock)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(ssock)
        except BaseException:
            self._close_now()
            raise
        return self

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.sock.getpeercert(binary_form)

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"TLS session broken: {self._broken!r}")

    def _break(self, exc: BaseException) -> NoReturn:
        self._broken = exc
        why = _reason(exc) if isinstance(exc, ssl.SSLError) else repr(exc)
        raise trio.BrokenResourceError(f"TLS: {why}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return bytes(await self.receive_view(max_bytes))

    async def receive_view(self, max_bytes: int | None = None) -> memoryview:
        """As ``receive_some``, but the bytes are a view of this stream's own
        buffer, valid until the next receive: every record already received
        (up to ``max_bytes``) is decrypted straight into it, so a reader that
        copies them anyway (an unpacker's ``feed``) saves a join and an
        allocation per record (about a sixth of TLS's cost above plaintext on
        a cold read).  EOF is an empty view."""
        self._check()
        # As trio's own streams: a cancellation is seen before any byte is
        # taken, never after (the bytes read would be lost).
        await trio.lowlevel.checkpoint_if_cancelled()
        # At most TRANSPORT_READ (fewer bytes than asked is allowed): the
        # buffer is allocated at the first receive and never grows past it.
        limit = min(max_bytes or TRANSPORT_READ, TRANSPORT_READ)
        view = self._rview
        if view is None:
            view = self._rview = memoryview(bytearray(TRANSPORT_READ))
        waited = False
        while True:
            try:
                n = self.sock.recv_into(view, min(RECORD, limit))
                break
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)
            except (ssl.SSLError, OSError) as exc:
                self._break(exc)
            waited = True
            self._check()
        if n:
            # Every further record already here, in one reply.
            while n < limit:
                try:
                    more = self.sock.recv_into(view[n:], min(RECORD, limit - n))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except (ssl.SSLError, OSError) as exc:
                    self._broken = exc  # raised at the next call, after these bytes
                    break
                if not more:
                    break
                n += more
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()  # a busy reader must not starve others
        return view[:n]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with memoryview(data) as whole:
            mv = whole.cast("B")
            pos, end = 0, len(mv)
            while pos < end:
                # A retried SSL_write must get the same length (OpenSSL's rule).
                piece = mv[pos : pos + (self._retry_len or SEND_CHUNK)]
                try:
                    pos += self.sock.send(piece)
                    self._retry_len = 0
                    continue
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self.sock)
                except ssl.SSLWantReadError:
                    # A post-handshake message is due; the reader task takes it.
                    await trio.sleep(0.001)
                except (ssl.SSLError, OSError) as exc:
                    self._break(exc)
                finally:
                    piece.release()
                waited = True
                self._check()
            mv.release()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        """Send ``data`` (at most ``SEND_CHUNK`` bytes) from the calling task
        if the socket takes it now, without a checkpoint: the bytes sent (0
        if it must wait).  After 0, the next ``send_all`` must start with
        these same bytes (OpenSSL retries the write with them).  Errors as
        ``send_all``'s."""
        self._check()
        if self._retry_len or len(data) > SEND_CHUNK:
            return 0
        try:
            return self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._retry_len = len(data)
            return 0
        except (ssl.SSLError, OSError) as exc:
            self._break(exc)

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self.sock)

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._broken is None:
            # close_notify, best effort: never wait for the peer's.
            try:
                self.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._close_now()
        await trio.lowlevel.checkpoint()


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        return getattr(cause, "verify_message", None) or cause.reason or str(cause)
    return str(exc) or type(exc).__name__


async def wrap_client(
    stream: trio.abc.Stream, ctx: ssl.SSLContext, peer: str
) -> TLSStream | SocketTLSStream:
    """TLS handshake as the client; a failure is a ``TLSRefused`` that says why."""
    try:
        if isinstance(stream, trio.SocketStream):
            return await SocketTLSStream.handshake(stream, ctx, server_side=False)
        s = trio.SSLStream(PrefixedStream(b"", stream), ctx, server_hostname=None)
        await s.do_handshake()
        return TLSStream(s)
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        why = _reason(exc)
        if "CERTIFICATE_VERIFY_FAILED" in repr(exc) or "certificate" in why.lower():
            raise TLSRefused(
                f"TLS with {peer}: the server's certificate is not from this cell's CA "
                f"({why}); is --cert the bundle of this cell?"
            ) from None
        raise TLSRefused(
            f"TLS handshake with {peer} failed ({why}); the server may be running "
            "with --insecure (plaintext), or it is not an afsfuse fileserver"
        ) from None


async def tcp_connect(host: str, port: int, ctx: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP stream to (host, port), inside TLS unless ``ctx`` is None."""
    stream = await trio.open_tcp_stream(host, port)
    if ctx is None:
        return stream
    return await wrap_client(stream, ctx, f"{host}:{port}")


Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


def tls_connector(ctx: ssl.SSLContext) -> Connector:
    async def connect(host: str, port: int) -> trio.abc.Stream:
        return await tcp_connect(host, port, ctx)

    return connect


def refusing_connector(why: str) -> Connector:
    """For a cell with no client certificate: nothing is ever sent in plaintext."""

    async def connect(host: str, port: int) -> trio.abc.Stream:
        raise TLSRefused(why)

    return connect


#: Bytes asked of the socket per read under TLS (trio's default is 64 KiB).
TRANSPORT_READ = 256 * 1024


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read (to tell TLS from not).

    Reads without a size (as ``trio.SSLStream`` makes them) ask for
    ``TRANSPORT_READ`` bytes: a 256 KiB reply then takes one trip through
    SSLStream instead of four."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self.stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.stream.receive_some(max_bytes or TRANSPORT_READ)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.stream.aclose()


async def peek(stream: trio.abc.Stream, timeout: float | None) -> tuple[bytes, trio.abc.Stream]:
    """The first bytes a peer sends, and a stream that still yields them.

    A TCP stream is only peeked at (``MSG_PEEK``): its bytes stay in the
    kernel, so TLS can run on the socket itself (``SocketTLSStream``)."""
    with trio.move_on_after(timeout if timeout is not None else 30.0):
        if isinstance(stream, trio.SocketStream):
            try:
                first = await stream.socket.recv(4096, socket.MSG_PEEK)
            except OSError as exc:
                raise trio.BrokenResourceError(repr(exc)) from exc
            return first, stream
        first = await stream.receive_some(4096)
        return first, PrefixedStream(first, stream)
    return b"", stream


def looks_like_tls(first: bytes) -> bool:
    return bool(first) and first[0] == _TLS_RECORD_HANDSHAKE


class ServerTLS:
    """A fileserver's TLS side: its context, the deny-list, the live sessions."""

    def __init__(self, ctx: ssl.SSLContext, deny: DenyList) -> None:
        self.ctx = ctx
        self.deny = deny
        #: Open connections by client certificate serial, closed on revocation.
        self.sessions: dict[int, set[Any]] = {}

    @classmethod
    def for_server(cls, ca: CellCA, cert_file: Path) -> ServerTLS:
        return cls(server_context(cert_file, ca), DenyList(ca.revoked_file))

    def check_peer(self, s: TLSStream | SocketTLSStream) -> tuple[int, RpcError | None]:
        """(serial, None) for a certificate we accept, else (serial, why not)."""
        der = s.getpeercert(binary_form=True)
        if not der:
            return 0, TLSRefused("no client certificate")
        cert = x509.load_der_x509_certificate(der)
        serial, now = cert.serial_number, _now()
        if cert.not_valid_after_utc <= now:
            return serial, TLSRefused(
                f"client certificate serial {serial:x} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one"
            )
        if cert.not_valid_before_utc > now + dt.timedelta(minutes=5):
            return serial, TLSRefused(f"client certificate serial {serial:x} is not valid yet")
        if serial in self.deny.serials():
            return serial, TLSRefused(f"client certificate serial {serial:x} is revoked")
        return serial, None

    async def accept(
        self, stream: trio.abc.Stream, peer: str, timeout: float | None
    ) -> tuple[TLSStream | SocketTLSStream | None, int, RpcError | None]:
        """Handshake as the server.  (None, 0, None): the handshake failed
        (logged, stream closed); otherwise the TLS stream, the client's
        serial and, if it is refused, why."""
        s: TLSStream | SocketTLSStream
        try:
            with trio.fail_after(timeout if timeout is not None else 30.0):
                if isinstance(stream, trio.SocketStream):
                    s = await SocketTLSStream.handshake(stream, self.ctx, server_side=True)
                else:
                    ssl_stream = trio.SSLStream(stream, self.ctx, server_side=True)
                    await ssl_stream.do_handshake()
                    s = TLSStream(ssl_stream)
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as exc:
            log.warning("%s: TLS handshake failed: %s", peer, _reason(exc))
            await trio.aclose_forcefully(stream)
            return None, 0, None
        serial, refused = self.check_peer(s)
        if refused is not None:
            log.warning("%s: refused: %s", peer, refused.message)
        return s, serial, refused

    def track(self, serial: int, conn: Any) -> None:
        self.sessions.setdefault(serial, set()).add(conn)

    def untrack(self, serial: int, conn: Any) -> None:
        s = self.sessions.get(serial)
        if s is not None:
            s.discard(conn)
            if not s:
                del self.sessions[serial]

    async def watch_revocations(self, interval: float = 1.0) -> None:
        """Close open sessions whose certificate was revoked since they began."""
        while True:
            await trio.sleep(interval)
            revoked = self.deny.serials()
            for serial in [s for s in self.sessions if s in revoked]:
                for conn in list(self.sessions.get(serial, ())):
                    log.warning("%s: client certificate %x revoked: closing", conn.name, serial)
                    await conn.aclose(f"client certificate {serial:x} revoked")


def server_tls(cfg: Any, cell: str, uuid: str) -> tuple[ServerTLS, ssl.SSLContext]:
    """A fileserver's TLS at start (``cfg`` a ``fileserver.config.ServerConfig``):
    the cell CA (created with the cell key if absent), our certificate
    (renewed if due), the server side, and our certificate as a client's."""
    ca = CellCA.load_or_create(cfg.ca_file, cell)
    hosts = [cfg.host] if cfg.host not in ("", "0.0.0.0", "::") else []
    if cfg.advertise is not None:
        hosts.append(cfg.advertise[0])
    cert = ensure_server_cert(ca, Path(cfg.data_dir) / SERVER_CERT, uuid, hosts)
    return ServerTLS.for_server(ca, cert), client_context(cert)


#: Written in a data dir while its server runs --insecure (the admin CLI reads it).
INSECURE_MARK = Path("tls") / "insecure"


def note_mode(data_dir: Path | str, insecure: bool) -> None:
    mark = Path(data_dir) / INSECURE_MARK
    if insecure:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("this server runs --insecure (plaintext)\n")
    else:
        mark.unlink(missing_ok=True)


def admin_context(data_dir: Path | str) -> ssl.SSLContext | None:
    """For the admin CLI on the server machine: the server's own certificate
    as the client's (None when the server runs --insecure)."""
    if (Path(data_dir) / INSECURE_MARK).exists():
        return None
    return client_context(Path(data_dir) / SERVER_CERT)


def cert_command(args: Any, ca_file: Path) -> int:
    """``afs-fileserver issue-client-cert`` / ``revoke-client-cert``."""
    try:
        ca = CellCA.load(ca_file)
    except FileNotFoundError:
        print(f"error: no cell CA at {ca_file}: start the fileserver once (it creates "
              "one), or pass --ca-file / --key-file", file=sys.stderr)  # fmt: skip
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "issue-client-cert":
        if args.days <= 0:
            print("error: --days must be positive", file=sys.stderr)
            return 1
        cert = write_client_bundle(ca, args.out, days=args.days, name=args.name)
        print(f"serial {cert.serial_number:x}, valid until "
              f"{_not_after(cert):%Y-%m-%d %H:%M} UTC, written to {args.out}")  # fmt: skip
        return 0
    try:
        serial = parse_serial(args.serial)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    added = revoke(ca.revoked_file, serial)
    print(f"serial {serial:x} {'revoked' if added else 'was already revoked'} "
          f"({ca.revoked_file}; running servers of this cell reload it)")  # fmt: skip
    return 0
