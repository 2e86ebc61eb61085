"""Transport security: TLS settings for the server and its clients, API keys, and failures that say which side.

Triton's own gRPC endpoint speaks TLS, mutual when a client CA is given
(``--grpc-use-ssl-mutual``). Its HTTP endpoint has no TLS: with TLS on,
``cxr serve`` keeps HTTP and metrics on loopback, and remote HTTP goes through a
TLS-terminating proxy (:mod:`cxr.serving.proxy`, nginx). Admin APIs sit behind
a header key (``--grpc-restricted-protocol`` / ``--http-restricted-api``).

When a TLS connection fails, gRPC reports little more than "Socket closed".
:func:`diagnose` repeats the handshake with Python's ``ssl`` module and names
the side at fault: the server's certificate does not verify against the
client's CA, or the server refused the client's certificate (none, unknown CA,
bad certificate).
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cxr.core.errors import CxrError, ExitCode

#: APIs the admin key guards (Triton's names; the same on gRPC and HTTP).
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
#: The API the config key guards: clients read the threshold, labels and rules from it.
CONFIG_APIS = ("model-config",)
ADMIN_HEADER = "admin-key"
CONFIG_HEADER = "config-key"
#: Triton expects a restricted gRPC protocol's key under this prefix (HTTP takes the header name as given).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def grpc_header(name: str) -> str:
    """The gRPC metadata key for a restricted-API header (``admin-key`` -> ``triton-grpc-protocol-admin-key``)."""
    return GRPC_HEADER_PREFIX + name


class TlsError(CxrError):
    """A TLS connection failed; the message says which side's certificate (or which file) is at fault."""

    exit_code = ExitCode.USAGE


def _need_file(path: Path | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} not found: {p}")
    return p


@dataclass(frozen=True)
class TlsClient:
    """A client's TLS settings.

    Attributes:
        ca: CA bundle that the server's certificate must verify against.
        cert: The client's certificate chain (mutual TLS).
        key: The client's private key (mutual TLS).
        server_name: Name to verify in the server's certificate (default: the host dialled).
    """

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        _need_file(self.ca, "--tls-ca")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.cert is not None:
            _need_file(self.cert, "--tls-cert")
            _need_file(self.key, "--tls-key")

    def grpc_kwargs(self) -> dict:
        """Keyword arguments for ``tritonclient.grpc.InferenceServerClient``."""
        kw: dict = {"ssl": True, "root_certificates": str(self.ca)}
        if self.cert is not None:
            kw.update(private_key=str(self.key), certificate_chain=str(self.cert))
        if self.server_name:
            kw["channel_args"] = [("grpc.ssl_target_name_override", self.server_name)]
        return kw

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class TlsServer:
    """The server's TLS settings: its certificate and key, and the CA of accepted clients (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        _need_file(self.cert, "--tls-cert")
        _need_file(self.key, "--tls-key")
        if self.client_ca is not None:
            _need_file(self.client_ca, "--tls-client-ca")

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def tritonserver_flags(self) -> list[str]:
        flags = [f"--grpc-server-cert={Path(self.cert).resolve()}", f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.client_ca is not None:
            flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.client_ca).resolve()}"]
        else:
            flags.append("--grpc-use-ssl=true")
        return flags


@dataclass(frozen=True)
class HttpAuth:
    """How the HTTP doors (DICOMweb, FHIR) authenticate: a bearer token (read from a private file), a client
    certificate for mutual TLS, and the CA the server's certificate must verify against.

    Attributes:
        token: The bearer token (never shown: not in the repr, logs or audit records).
        cert: This client's certificate chain (with ``key``).
        key: Its private key.
        ca: CA bundle for the server's certificate (default: the system's).
    """

    token: str | None = field(default=None, repr=False)
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give --web-tls-cert and --web-tls-key together")
        if self.cert is not None:
            _need_file(self.cert, "--web-tls-cert")
            _need_file(self.key, "--web-tls-key")
        if self.ca is not None:
            _need_file(self.ca, "--web-tls-ca")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the bearer token must be one line without spaces")

    @classmethod
    def of(cls, token_file: Path | None = None, cert: Path | None = None, key: Path | None = None,
           ca: Path | None = None) -> HttpAuth | None:
        """From command-line files (``None`` when none is given); the token file must be private (mode 600)."""
        if token_file is None and cert is None and key is None and ca is None:
            return None
        token = read_private_text(token_file, "bearer token").strip() if token_file is not None else None
        return cls(token, cert, key, ca)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext:
        """For ``urllib``: the CA (or the system's) and the client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def apply(self, session) -> None:
        """Onto a ``requests.Session``."""
        session.headers.update(self.headers())
        if self.cert is not None:
            session.cert = (str(self.cert), str(self.key))
        if self.ca is not None:
            session.verify = str(self.ca)


def read_private_text(path: Path, what: str) -> str:
    """A secret file's text; refused when it cannot be read or is readable by group or others.

    Raises:
        CxrError: Unreadable, or readable by others.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as exc:
        raise CxrError(f"cannot read {what} file {p}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CxrError(f"{what} file {p} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    return text


def read_key(path: Path, what: str = "key") -> str:
    """An API key from a file: one token, no spaces, ``,``, ``:`` or ``=``; the file must not be group/world readable.

    Raises:
        CxrError: Missing, empty, malformed, or readable by others.
    """
    p = Path(path)
    value = read_private_text(p, what).strip()
    if len(value) < 16 or any(c.isspace() or c in ",:=" for c in value):
        raise CxrError(f"{what} in {p} must be one token of at least 16 characters without spaces, ',', ':' or '='")
    return value


def restricted_flags(admin_key: str | None, config_key: str | None) -> list[str]:
    """tritonserver flags restricting the admin APIs (and the config API) on gRPC and HTTP."""
    flags = []
    for apis, header, key in ((ADMIN_APIS, ADMIN_HEADER, admin_key), (CONFIG_APIS, CONFIG_HEADER, config_key)):
        if key:
            spec = f"{','.join(apis)}:{header}={key}"
            flags += [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]
    return flags


def redact(args: list[str], secrets: list[str]) -> list[str]:
    """``args`` with every secret replaced (for logs)."""
    out = []
    for a in args:
        for s in secrets:
            if s:
                a = a.replace(s, "***")
        out.append(a)
    return out


#: ``scheme://user:password@`` (or ``scheme://user@``) in any text: the userinfo part of a URL.
_URL_USERINFO = __import__("re").compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"<>]*@")


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced (``http://user:pw@host/x`` ->
    ``http://***@host/x``): for audit records, logs, spool files and anything printed."""
    return _URL_USERINFO.sub(r"\1***@", str(text))


def check_url(value: str | None, flag: str) -> None:
    """Refuse ``value`` unless it is an http(s) URL with a host: a one-line error naming ``flag`` (the option that
    gave it), credentials never echoed. None passes."""
    from urllib.parse import urlsplit

    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise CxrError(f"{flag} {redact_url(value)!r}: expected an http:// or https:// URL with a host")


def split_url_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``(url without its userinfo, (user, password) or None)``: credentials travel in a header, never in a URL
    that could be logged."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), (unquote(parts.username), unquote(parts.password or ""))


class RedactingStream:
    """A text stream that takes URL credentials out of everything written through it (stdout, stderr)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_url(text) if "@" in text else text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class RedactingFilter:
    """A :mod:`logging` filter that takes URL credentials out of every record's message (install it on a handler)."""

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own business
            return True
        clean = redact_url(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and "@" in str(record.exc_info[1]):
            record.exc_text = redact_url(__import__("logging").Formatter().formatException(record.exc_info))
        return True


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def diagnose(host: str, port: int, tls: TlsClient, *, timeout_s: float = 5.0) -> str:
    """Repeat the TLS handshake and say in one line which side's certificate failed (or that TLS was fine)."""
    ctx = tls.ssl_context()
    ctx.set_alpn_protocols(["h2"])
    name = tls.server_name or host
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as s:
            # TLS 1.3 sends a refusal of the client's certificate after the handshake: read to receive it.
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            s.settimeout(timeout_s)
            answer = s.recv(64)
    except ssl.SSLCertVerificationError as exc:
        return f"the server's certificate does not verify against --tls-ca {tls.ca} ({exc.verify_message})"
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower()
        if "certificate required" in reason or "handshake failure" in reason and tls.cert is None:
            return "the server requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
        if "unknown ca" in reason or "bad certificate" in reason or "certificate unknown" in reason:
            return f"the server refused the client certificate {tls.cert} (not issued by a CA it trusts)"
        if "wrong version" in reason or "record layer failure" in reason or "packet length too long" in reason:
            return "the server does not speak TLS on this port (a plaintext server?)"
        return f"TLS failed: {exc.reason or exc}"
    except (ConnectionResetError, BrokenPipeError):
        return "the server closed the connection during TLS (it may require a client certificate it did not get)"
    except TimeoutError:
        return "TLS handshake timed out"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    if not answer:  # the handshake passed on our side, then the server hung up: it did not accept our certificate
        if tls.cert is None:
            return "the server requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
        return f"the server refused the client certificate {tls.cert} (not issued by a CA it trusts)"
    return "TLS handshake succeeded; the failure is elsewhere"


def split_host_port(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# -- a development PKI (tests, bench, trying it out; never for production keys) -------------------------------------

def make_dev_pki(out_dir: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), name: str = "cxr") -> dict[str, Path]:
    """Write a CA, a server certificate for ``hosts`` and a client certificate (PEM, keys mode 600).

    For tests and local trials only: a hospital uses its own PKI.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def save_key(k, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        os.chmod(path, 0o600)
        return path

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages, sans):
        k = key()
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    # The server certificate may also act as a client (a DICOM node that both receives and sends, like a PACS).
    server_key, server = leaf(f"{name} server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    client_key, client = leaf(f"{name} client", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.pem", "server_cert": out / "server.pem", "client_cert": out / "client.pem"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["server_cert"].write_bytes(server.public_bytes(pem))
    paths["client_cert"].write_bytes(client.public_bytes(pem))
    paths["server_key"] = save_key(server_key, out / "server.key")
    paths["client_key"] = save_key(client_key, out / "client.key")
    return paths
