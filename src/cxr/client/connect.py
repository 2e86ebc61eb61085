"""Connect: the transport for a protocol and a URL (one server, or a fleet of replicas ``A,B,C``)."""

from __future__ import annotations

from cxr.client.fleet import FleetTransport, split_urls
from cxr.client.transport import (
    DEFAULT_URLS,
    PROTOCOLS,
    EmbeddedTransport,
    GrpcTransport,
    HttpTransport,
    Transport,
)
from cxr.core.security import TlsClient


def make_transport(protocol: str, url: str | None, model: str, version: str, *, timeout_s: float,
                   tls: TlsClient | None = None, config_key: str | None = None) -> Transport:
    """Create the transport for ``protocol`` (``grpc``, ``http`` or ``embedded``); ``url`` may list replicas ``A,B,C``."""
    if protocol in ("grpc", "http") and url and "," in url:
        return FleetTransport(split_urls(url), lambda u: make_transport(protocol, u, model, version, timeout_s=timeout_s,
                                                                          tls=tls, config_key=config_key))
    if protocol == "grpc":
        return GrpcTransport(url or DEFAULT_URLS["grpc"], model, version, timeout_s=timeout_s, tls=tls, config_key=config_key)
    if protocol == "http":
        return HttpTransport(url or DEFAULT_URLS["http"], model, version, timeout_s=timeout_s, tls=tls, config_key=config_key)
    if protocol == "embedded":
        from cxr.core.paths import DEFAULT_REPOSITORY

        return EmbeddedTransport(url or DEFAULT_REPOSITORY, model, version)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
