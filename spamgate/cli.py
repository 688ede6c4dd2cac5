"""The `spamgate` command: run the proxy, check a configuration, replay captures.

User mistakes (a missing file, a bad value, a port in use) print one clear line per
problem and exit with status 1; a traceback means a bug in spamgate.

Each subcommand imports what it needs when it runs (`spamgate query` never loads
the checks, `spamgate check` never the server): deliberate, for start-up time.
Every one that builds spamgate asks the composition root (`app`) with the checks
`main` was given: the registry's, or a test's own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from . import __version__
from .config import Config, InvalidConfig, hostname_problem
from .config.settings import ConfigError


def _setup_logging(level: str, *, with_pid: bool = False) -> None:
    """Log to stderr; `with_pid` (several workers) names the process, as Postfix's
    `smtpd[1234]:` does, so a session's lines can be told from another worker's."""
    from .logescape import install
    from .ops.daemon import JournalFormatter, on_journal

    name = "%(name)s[%(process)d]" if with_pid else "%(name)s"
    handler = install(logging.StreamHandler(sys.stderr))  # no client forges a line
    if on_journal():  # under systemd: the journal stamps the time and keeps the level
        handler.setFormatter(JournalFormatter(name))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # aiosmtpd logs every connection on "mail.log" and PROXY errors on "mail.debug";
    # our own lines say it better, with the session id.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("mail.debug").setLevel(logging.ERROR)


def problems_of(path: str | None, checks=None) -> tuple[Config | None, list[str]]:
    """The configuration at `path` and every problem in it, its rule tables and its
    certificate, all at once (a bad setting does not hide a missing table)."""
    from . import app

    checks = checks or app.DEFAULT_CHECKS
    problems: list[str] = []
    try:
        config: Config | None = app.load(path, checks)
    except ConfigError as exc:
        problems += exc.problems
        config = exc.partial if isinstance(exc, InvalidConfig) else None
    if config is not None:
        try:
            app.build(config, checks=checks)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    return config, problems


def cmd_run(args: argparse.Namespace) -> int:
    from . import app
    from .ops.daemon import raise_fd_limit
    from .ops.server import Server, StartupError

    try:
        config = app.load(args.config, args.checks)
    except ConfigError:
        _setup_logging(args.log_level)
        for problem in problems_of(args.config, args.checks)[1]:
            print(f"spamgate: {problem}", file=sys.stderr)
        return 1
    workers = config.server.workers
    _setup_logging(args.log_level, with_pid=workers > 1)
    hostname = hostname_problem(config)
    if hostname:
        logging.getLogger("spamgate").warning("%s", hostname)
    factory = loop_factory(config.server.uvloop)
    if workers > 1:
        from .ops import workers as supervisor

        return supervisor.run(config, args.config, factory, args.checks)
    raise_fd_limit(config.limits.max_sessions)

    async def main() -> int:
        try:
            server = Server(app.build(config, checks=args.checks))
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"spamgate: {problem}", file=sys.stderr)
            return 1
        try:
            await server.serve_forever(args.config)
        except StartupError as exc:
            print(f"spamgate: {exc}", file=sys.stderr)
            return 1
        return 0

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())
    except KeyboardInterrupt:
        return 0


def loop_factory(want_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when asked for and installed; None: asyncio's default."""
    if not want_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("spamgate").info("uvloop is not installed; using asyncio's loop")
        return None
    return uvloop.new_event_loop


def cmd_check(args: argparse.Namespace) -> int:
    config, problems = problems_of(args.config, args.checks)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    assert config is not None
    hostname = hostname_problem(config)
    if hostname:
        print(config.where().at("server", "hostname", f"warning: {hostname}"))
    from .state import state_warnings

    for warning in state_warnings(config):
        print(warning)
    print(f"{args.config}: ok")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Look KEY up in TABLE like `postmap -q`: 0 found, 1 not found, 2 bad table."""
    import socket

    from . import app
    from .explain import make_query, query_table
    from .tables import load_table

    try:
        hostname = app.load(args.config, args.checks).hostname if args.config else socket.getfqdn()
        table = load_table(args.table, hostname=hostname)
    except (ConfigError, ValueError) as exc:
        for problem in getattr(exc, "problems", [str(exc)]):
            print(f"spamgate: {problem}", file=sys.stderr)
        return 2
    found = query_table(table, make_query(args.key, args.stage), sys.stdout)
    if found:
        print(f"{args.key}: not found in {args.table}", file=sys.stderr)
    return found


def cmd_explain(args: argparse.Namespace) -> int:
    """One synthetic session through every check; 0 if the mail would be accepted."""
    from . import app
    from .explain import explain

    _setup_logging("warning")
    message = None
    if args.eml:
        try:
            with open(args.eml, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            print(f"spamgate: {args.eml}: {exc.strerror}", file=sys.stderr)
            return 2
        # .eml files usually have LF line ends; SMTP carries CRLF.
        message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    try:
        config = app.load(args.config, args.checks)
        return asyncio.run(
            explain(
                config,
                checks=args.checks,
                client_ip=args.client,
                client_name=args.name,
                helo=args.helo,
                sender=args.sender,
                recipients=args.rcpt,
                message=message,
                out=sys.stdout,
                verbose=args.verbose,
            )
        )
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 2


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay captures through a candidate configuration: 0 nothing changed, 1 something
    changed (or could not be decided, or was skipped), 2 a bad capture or configuration."""
    from . import app
    from .replay.command import replay
    from .replay.output import FORMATS

    _setup_logging("error")  # the replayed sessions' own lines would drown the report
    try:
        config = app.load(args.config, args.checks)
        with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
            diff, error = runner.run(
                replay(
                    config,
                    args.capture,
                    checks=args.checks,
                    live=args.live_dns,
                    skip_bad=args.skip_bad,
                    show=args.show,
                    candidate=args.config,
                )
            )
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if error is not None:
        print(f"spamgate: {error}", file=sys.stderr)
        print("spamgate: replay stopped (--skip-bad replays the other records)", file=sys.stderr)
        return 2
    return _write(args.output, lambda out: FORMATS[args.format](diff, out)) or diff.status


def cmd_report(args: argparse.Namespace) -> int:
    """Sum up captures: top rules and lists, WARN rules, refused authenticated mail."""
    from .replay import report

    found, error = report.build_report(args.capture, skip_bad=args.skip_bad)
    if error is not None:
        print(f"spamgate: {error}", file=sys.stderr)
        return 2
    show = report.as_json if args.format == "json" else report.text
    return _write(args.output, lambda out: show(found, out, args.top))


def _write(path: str | None, write: Callable) -> int:
    """Write to `path` (or standard output); 2 with one line if it cannot be written."""
    if path is None:
        try:
            write(sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        with open(path, "w", encoding="utf-8") as out:
            write(out)
    except OSError as exc:
        print(f"spamgate: {path}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def reference_markdown(checks=None) -> str:
    """The configuration reference as Markdown tables, one per section."""
    from . import app
    from .config import ARRAY_SECTIONS
    from .config.settings import describe

    out: list[str] = []
    for name, cls in app.sections(checks or app.DEFAULT_CHECKS).items():
        title = f"[[{name}]]" if name in ARRAY_SECTIONS else f"[{name}]"
        out += [f"### {title}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for key, default, doc in describe(cls, name):
            short = key.split("] ", 1)[1]
            meaning = doc.replace("|", "\\|")
            out.append(f"| `{short}` | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def cmd_reference(args: argparse.Namespace) -> int:
    text = reference_markdown(args.checks)
    if not args.update:
        print(text)
        return 0
    problem = update_reference(args.update, text)
    if problem:
        print(f"spamgate: {args.update}: {problem}", file=sys.stderr)
        return 1
    return 0


def update_reference(path: str, text: str) -> str | None:
    """Replace the block between START and END in `path` with `text`; the problem,
    if any, with the file left as it was (a file without the markers is not ours
    to append to)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = fh.read()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return str(exc.strerror)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    head, start, rest = doc.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        return f"no {START} ... {END} block to rewrite (add the two lines where it belongs)"
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"{head}{START}\n{text}\n{END}{tail}")
    except OSError as exc:
        return str(exc.strerror)
    return None


def _ip(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f'"{text}" is not one of {", ".join(LOG_LEVELS)}')
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spamgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spamgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="configuration file (default: embedded defaults)")
    run.add_argument("--log-level", default="info", type=_log_level, help=", ".join(LOG_LEVELS))
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a configuration and its rule tables")
    check.add_argument("-c", "--config", required=True, help="configuration file")
    check.set_defaults(func=cmd_check)

    query = sub.add_parser("query", help="look a key up in a rule table (like postmap -q)")
    query.add_argument("table", metavar="TABLE", help='a table as "type:path"')
    query.add_argument("key", metavar="KEY", help="an IP, host name, HELO name, address or line")
    query.add_argument(
        "--as",
        dest="stage",
        choices=["client", "helo", "sender", "recipient", "header", "body"],
        help="look KEY up as this stage does (default: guessed from KEY)",
    )
    query.add_argument("-c", "--config", help="configuration file (for ${myhostname})")
    query.set_defaults(func=cmd_query)

    exp = sub.add_parser(
        "explain", help="run one synthetic session through every check and explain the outcome"
    )
    exp.add_argument("-c", "--config", required=True, help="configuration file")
    exp.add_argument("--client", default="192.0.2.1", type=_ip, help="client IP address")
    exp.add_argument("--name", help="client's verified host name (default: looked up)")
    exp.add_argument("--helo", default="client.example.net", help="HELO/EHLO name")
    exp.add_argument("--sender", default="sender@example.net", help="MAIL FROM address")
    exp.add_argument(
        "--rcpt", action="append", required=True, help="RCPT TO address (repeat for more)"
    )
    exp.add_argument("--eml", help="message file to send as DATA (default: a tiny one)")
    exp.add_argument("-v", "--verbose", action="store_true", help="also print the session log")
    exp.set_defaults(func=cmd_explain)

    rep = sub.add_parser(
        "replay",
        help="replay captured transactions through a candidate configuration, show what changes",
    )
    rep.add_argument("-c", "--config", required=True, help="the candidate configuration file")
    rep.add_argument("capture", nargs="+", metavar="CAPTURE", help="capture files or directories")
    rep.add_argument(
        "--live-dns",
        action="store_true",
        help="ask DNS (the candidate's [dns]) for what the capture does not hold",
    )
    rep.add_argument("--format", choices=("text", "json", "html"), default="text")
    rep.add_argument("-o", "--output", help="write the report to this file")
    rep.add_argument(
        "--show", type=int, default=1000, help="list at most this many transactions (1000)"
    )
    rep.add_argument(
        "--skip-bad", action="store_true", help="go on past bad records (listed as skipped)"
    )
    rep.set_defaults(func=cmd_replay)

    rpt = sub.add_parser(
        "report", help="top rules and lists, WARN rules, refused authenticated mail, per day"
    )
    rpt.add_argument("capture", nargs="+", metavar="CAPTURE", help="capture files or directories")
    rpt.add_argument("--format", choices=("text", "json"), default="text")
    rpt.add_argument("--top", type=int, default=20, help="rules and lists to list (20)")
    rpt.add_argument("-o", "--output", help="write the report to this file")
    rpt.add_argument(
        "--skip-bad", action="store_true", help="go on past bad records (listed as skipped)"
    )
    rpt.set_defaults(func=cmd_report)

    ref = sub.add_parser("config-reference", help="print every setting with its default")
    ref.add_argument("--update", metavar="FILE", help="rewrite the reference block in FILE")
    ref.set_defaults(func=cmd_reference)
    return parser


def main(argv: list[str] | None = None, checks=None) -> int:
    """The command; `checks`: the check types to run (default: the registry's)."""
    args = build_parser().parse_args(argv)
    if checks is None:
        from . import app

        checks = app.DEFAULT_CHECKS
    args.checks = checks
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
