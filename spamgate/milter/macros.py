"""The macros spamgate reads at each stage, and how Postfix is told to send them.

Postfix sends a stage's macros in an SMFIC_MACRO packet just before the event
(MILTER_README, "Sendmail macro emulation"). Which names it sends comes from one of
two places:

* the filter's own lists, sent in the option negotiation (SMFIF_SETSYMLIST, Sendmail
  8.14 and Postfix >= 2.6). These take precedence, for this filter only: Postfix
  starts from empty lists and fills in the stages the filter names (milter8.c,
  milter8_connect). spamgate asks this way by default, so no main.cf line is needed;
* the `milter_*_macros` parameters of main.cf, shared by every milter. `postfix_lines`
  gives the lines to set if the negotiated lists are turned off: Postfix's defaults
  with spamgate's names added, so that other milters lose nothing.

Postfix sends only macros that have a value: `{auth_authen}` only after AUTH,
`{tls_version}` only with TLS. A name in `ALWAYS` that does not arrive means the
lists are not what spamgate asked for, which `missing` reports.

Postfix picks the queue id (`i`) after the first accepted RCPT, so spamgate asks for
it at DATA and at the end of the message, not at MAIL.
"""

from __future__ import annotations

from collections.abc import Mapping

from .protocol import MacroStage

SPAMGATE_MACROS: dict[MacroStage, tuple[str, ...]] = {
    MacroStage.CONNECT: (
        "j",
        "{daemon_name}",
        "{client_addr}",
        "{client_port}",
        "{client_name}",
        "{client_ptr}",
    ),
    MacroStage.HELO: ("{tls_version}", "{cipher}", "{cipher_bits}"),
    MacroStage.MAIL: ("{auth_authen}", "{auth_type}"),
    MacroStage.DATA: ("i",),
    MacroStage.END_OF_MESSAGE: ("i",),
}
"""What spamgate's checks read, per stage (the client facts the proxy gets from the
socket, XCLIENT and its own TLS and AUTH state)."""

ALWAYS: dict[MacroStage, frozenset[str]] = {
    MacroStage.CONNECT: frozenset(SPAMGATE_MACROS[MacroStage.CONNECT]),
    MacroStage.DATA: frozenset({"i"}),
    MacroStage.END_OF_MESSAGE: frozenset({"i"}),
}
"""Names Postfix sends at every occurrence of the stage when they are in its list."""

PARAMETER: dict[MacroStage, str] = {
    MacroStage.CONNECT: "milter_connect_macros",
    MacroStage.HELO: "milter_helo_macros",
    MacroStage.MAIL: "milter_mail_macros",
    MacroStage.RCPT: "milter_rcpt_macros",
    MacroStage.DATA: "milter_data_macros",
    MacroStage.END_OF_HEADERS: "milter_end_of_header_macros",
    MacroStage.END_OF_MESSAGE: "milter_end_of_data_macros",
}

POSTFIX_DEFAULTS: dict[MacroStage, tuple[str, ...]] = {
    MacroStage.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    MacroStage.HELO: (
        "{tls_version}",
        "{cipher}",
        "{cipher_bits}",
        "{cert_subject}",
        "{cert_issuer}",
    ),
    MacroStage.MAIL: (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    ),
    MacroStage.RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    MacroStage.DATA: ("i",),
    MacroStage.END_OF_HEADERS: ("i",),
    MacroStage.END_OF_MESSAGE: ("i",),
}
"""`postconf -d milter_*_macros` of Postfix 3.7 (unchanged since 3.2)."""


def postfix_lines(
    wanted: Mapping[MacroStage, tuple[str, ...]] = SPAMGATE_MACROS,
) -> list[str]:
    """main.cf lines that send `wanted` without taking a default macro from another
    milter: for each stage that lacks one of our names, the default list plus ours."""
    lines = []
    for stage, parameter in PARAMETER.items():
        names = list(POSTFIX_DEFAULTS[stage])
        extra = [n for n in wanted.get(stage, ()) if n not in names]
        if extra:
            lines.append(f"{parameter} = {' '.join(names + extra)}")
    return lines


def missing(stage: MacroStage, received: Mapping[str, str]) -> list[str]:
    """The names Postfix always sends at `stage` (if asked) that did not arrive."""
    return sorted(ALWAYS.get(stage, frozenset()) - received.keys())
