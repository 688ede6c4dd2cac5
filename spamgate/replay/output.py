"""The replay's report: text for a terminal, JSON for a pipeline, HTML for a browser.

The HTML page stands alone (no script, no style sheet or font from elsewhere; the
chart is inline SVG), so it can be mailed, archived and read offline. Everything
that came from a capture (names, addresses, reply texts) is escaped: a capture
is mail from strangers.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any, TextIO

from .diff import Diff

SUMMARY = (
    ("kept", "kept their outcome"),
    ("newly_refused", "newly refused"),
    ("newly_accepted", "newly accepted"),
    ("changed", "changed code or tag"),
    ("unknown", "unknown"),
    ("skipped", "skipped (bad records)"),
)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _transaction_line(x: dict[str, Any]) -> str:
    to = ", ".join(f"<{a}>" for a in x["to"]) or "-"
    sender = f"<{x['from']}>" if x["from"] is not None else "(no MAIL)"
    return f"{_when(x['time'])}  {x['client']}  {sender} -> {to}  ({x['file']}:{x['line']})"


def printable(text: str) -> str:
    """Capture text on a terminal: no control characters (an escape sequence in a
    HELO name must not drive the reader's terminal)."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def text(diff: Diff, out: TextIO) -> None:
    d = diff.as_dict()
    s = d["summary"]
    files = len(d["files"])
    out.write(
        f"spamgate replay: {d['transactions']} transactions from {files} "
        f"file{'s' if files != 1 else ''}, candidate {d['candidate']}\n"
    )
    for key, label in SUMMARY:
        if key in ("unknown", "skipped") and not s[key]:
            continue
        out.write(f"  {label:<24}{s[key]:>9}\n")
    if s["unknown"]:
        out.write("  (unknown: the candidate asked what the capture does not hold; ")
        out.write("--live-dns asks DNS instead)\n")
    if d["upstream_replies_assumed"]:
        out.write(
            f"  the upstream was not asked {d['upstream_replies_assumed']} time(s) when recorded: "
            "the replay assumed it would have said 250\n"
        )
    if d["asked_live"]:
        out.write(f"  DNS asked live: {d['asked_live']} lookup(s)\n")
    rows = d["rules"]
    if rows:
        out.write("\nby rule:\n")
        out.write(
            f"  {'rule':<36}{'refuses':>9}{'lets in':>9}{'changes':>9}{'clients':>9}"
            f"{'domains':>9}\n"
        )
        for r in rows:
            out.write(
                f"  {printable(r['rule']):<36}{r['newly_refused']:>9}{r['newly_accepted']:>9}"
                f"{r['changed']:>9}{r['clients']:>9}{r['sender_domains']:>9}\n"
            )
    changed = [x for x in d["transactions_listed"] if x["class"] != "unknown"]
    if changed:
        out.write("\nchanged transactions:\n")
        for x in changed:
            out.write(f"  {printable(_transaction_line(x))}\n")
            out.write(f"      before: {printable(x['before']['text'])}\n")
            out.write(f"      after:  {printable(x['after']['text'])}\n")
    unknown = [x for x in d["transactions_listed"] if x["class"] == "unknown"]
    if unknown:
        out.write("\nunknown (the capture does not hold what the candidate asked):\n")
        for x in unknown:
            out.write(f"  {printable(_transaction_line(x))}\n")
            out.write(f"      asked: {printable(', '.join(x['unknown']))}\n")
    if d["transactions_not_listed"]:
        out.write(f"\n... and {d['transactions_not_listed']} more not listed (--show)\n")
    if d["skipped"]:
        out.write("\nskipped:\n")
        for e in d["skipped"]:
            out.write(f"  {printable(e)}\n")


def as_json(diff: Diff, out: TextIO) -> None:
    json.dump(diff.as_dict(), out, indent=1, ensure_ascii=False)
    out.write("\n")


# -- HTML -------------------------------------------------------------------------------

_COLOURS = {"accepted": "#3a7d44", "rejected": "#b3261e", "tempfailed": "#e09f3e"}
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;text-align:left;
border-bottom:1px solid #ddd}td.n,th.n{text-align:right}code{font-size:90%}
.refused{color:#b3261e}.accepted{color:#3a7d44}.changed{color:#8a5a00}.unknown{color:#555}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def chart(diff: Diff) -> str:
    """Outcomes over time, before and after, as inline SVG (a pair of stacked bars
    per hour or day)."""
    unit, buckets = diff.buckets()
    if not buckets:
        return "<p>No transactions.</p>"
    width, height, pad = 960, 240, 40
    most = max(sum(slot[w].values()) for _, slot in buckets for w in ("before", "after")) or 1
    step = (width - 2 * pad) / len(buckets)
    bar = min(40.0, max(1.0, step * 0.38))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        f'role="img" aria-label="outcomes per {unit}, before and after">',
        f'<line x1="{pad}" y1="{height}" x2="{width - pad}" y2="{height}" stroke="#999"/>',
        f'<text x="4" y="{pad - 10}" font-size="11">{most}</text>',
    ]
    for i, (label, slot) in enumerate(buckets):
        for j, which in enumerate(("before", "after")):
            x = pad + i * step + j * (bar + 1)
            y = float(height)
            for cls in ("accepted", "tempfailed", "rejected"):
                n = slot[which].get(cls, 0)
                if not n:
                    continue
                h = (height - pad) * n / most
                y -= h
                parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                    f'fill="{_COLOURS[cls]}" opacity="{1.0 if which == "after" else 0.55}">'
                    f"<title>{_e(label)} {which}: {n} {cls}</title></rect>"
                )
        if len(buckets) <= 24 or i % max(1, len(buckets) // 12) == 0:
            x = pad + i * step
            parts.append(f'<text x="{x:.1f}" y="{height + 14}" font-size="10">{_e(label)}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span style="background:{c}"></span>{k}' for k, c in _COLOURS.items())
    return (
        "".join(parts) + f'<p class="legend">each {unit}: before (pale), after (full){legend}</p>'
    )


def as_html(diff: Diff, out: TextIO) -> None:
    d = diff.as_dict()
    s = d["summary"]
    w = out.write
    w('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
    w(f"<title>spamgate replay: {_e(d['candidate'])}</title><style>{_CSS}</style></head><body>")
    w(f"<h1>spamgate replay</h1><p>Candidate <code>{_e(d['candidate'])}</code>, ")
    w(f"{d['transactions']} transactions from {len(d['files'])} capture file(s).</p>")
    w("<table>")
    for key, label in SUMMARY:
        w(f'<tr><td>{_e(label)}</td><td class="n">{s[key]}</td></tr>')
    w("</table>")
    if d["upstream_replies_assumed"]:
        w(
            f"<p>The upstream was not asked {d['upstream_replies_assumed']} time(s) when "
            "recorded: the replay assumed it would have said 250.</p>"
        )
    w("<h2>Outcomes over time</h2>")
    w(chart(diff))
    if d["rules"]:
        w("<h2>By rule</h2><table><tr><th>rule</th>")
        for h in ("newly refused", "newly accepted", "changed", "clients", "sender domains"):
            w(f'<th class="n">{h}</th>')
        w("</tr>")
        for r in d["rules"]:
            w(f"<tr><td><code>{_e(r['rule'])}</code></td>")
            for k in ("newly_refused", "newly_accepted", "changed", "clients", "sender_domains"):
                w(f'<td class="n">{r[k]}</td>')
            w("</tr>")
        w("</table>")
    if d["transactions_listed"]:
        w("<h2>Transactions</h2><table><tr><th>when</th><th>client</th><th>envelope</th>")
        w("<th>before</th><th>after</th></tr>")
        for x in d["transactions_listed"]:
            to = ", ".join(f"<{a}>" for a in x["to"])
            sender = f"<{x['from']}>" if x["from"] is not None else "(no MAIL)"
            after = x["after"]["text"]
            if x["class"] == "unknown":
                after = "unknown: asked " + ", ".join(x["unknown"])
            w(
                f'<tr class="{x["class"]}"><td>{_e(_when(x["time"]))}<br><small>'
                f"{_e(x['file'])}:{x['line']}</small></td><td>{_e(x['client'])}</td>"
                f"<td>{_e(sender)} &rarr; {_e(to)}</td><td>{_e(x['before']['text'])}</td>"
                f"<td>{_e(after)}</td></tr>"
            )
        w("</table>")
        if d["transactions_not_listed"]:
            w(f"<p>... and {d['transactions_not_listed']} more not listed.</p>")
    if d["skipped"]:
        w("<h2>Skipped records</h2><ul>")
        for e in d["skipped"]:
            w(f"<li><code>{_e(e)}</code></li>")
        w("</ul>")
    w("</body></html>\n")


FORMATS = {"text": text, "json": as_json, "html": as_html}
