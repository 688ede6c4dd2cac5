"""TLS contexts: the certificate offered with STARTTLS, and the upstream client side.

Contexts are built with the configuration snapshot (`Policy`), so a reload that
points at a renewed certificate takes effect for the next connection, and a
certificate that does not load refuses the reload instead of breaking STARTTLS.
"""

from __future__ import annotations

import os
import ssl

from .config import Config
from .config.settings import ConfigError, display_path

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(config: Config) -> ssl.SSLContext | None:
    """The STARTTLS context, or None when no certificate is configured."""
    s = config.tls
    if not s.enabled:
        return None
    cert, key = config.resolve_path(s.cert_file), config.resolve_path(s.key_file)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[s.min_version]
    # SMTP clients seldom present certificates, and an MX must not ask for one.
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = False
    # Renegotiation is a DoS lever and SMTP needs none (TLS 1.2; 1.3 has none).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    problems = []
    for key_name, path in (("cert_file", cert), ("key_file", key)):
        problem = (
            "no such file"
            if not os.path.exists(path)
            else "permission denied"
            if not os.access(path, os.R_OK)
            else None
        )
        if problem:
            text = f"[tls] {key_name} {display_path(path)}: {problem}"
            problems.append(config.where().at("tls", key_name, text))
    if problems:
        raise ConfigError(problems)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        text = f"[tls] cannot load {display_path(cert)} with {display_path(key)}"
        raise ConfigError(
            [config.where().at("tls", None, f"{text}: {exc.strerror or exc}")]
        ) from None
    return ctx


def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The client context for STARTTLS towards the upstream, or None when off."""
    u = config.upstream
    if u.tls == "off":
        return None
    verify = u.tls == "required" and u.tls_verify
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        # Opportunistic TLS (Postfix "may") encrypts without authenticating:
        # a failed check would only push the session back to plaintext.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif u.tls_ca_file:
        path = config.resolve_path(u.tls_ca_file)
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [
                    config.where().at(
                        "upstream",
                        "tls_ca_file",
                        f"[upstream] tls_ca_file {display_path(path)}: {exc}",
                    )
                ]
            ) from None
    return ctx
