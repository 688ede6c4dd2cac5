"""Where accepted mail goes: an SMTP MTA (Postfix) or, to try spamgate alone, a Maildir."""

from __future__ import annotations

from ..config import Config
from ..tls import upstream_context
from .base import Upstream, UpstreamError, UpstreamSession
from .maildir import MaildirUpstream
from .smtp import SmtpUpstream


def build_upstream(config: Config) -> Upstream:
    if config.upstream.address.startswith("maildir:"):
        path = config.resolve_path(config.upstream.address[len("maildir:") :])
        return MaildirUpstream(path, config.hostname)
    return SmtpUpstream(config.upstream, config.hostname, upstream_context(config))


__all__ = ["Upstream", "UpstreamError", "UpstreamSession", "build_upstream"]
