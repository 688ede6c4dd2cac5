"""Draw the main panels of grafana/dashboards/spamgate.json to a PNG, without Grafana.

The script reads the dashboard's own queries, runs them against a Prometheus
(range queries for graphs, instant queries for bar panels) and plots them with
matplotlib, so the picture shows exactly what the shipped panels show.

Against any Prometheus that scrapes spamgate:

    python grafana/plot_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --start 2026-01-01T10:00:00Z --end 2026-01-01T11:00:00Z --out dashboard.png

The picture in docs/monitoring.md comes from the real Prometheus of
tests/e2e/test_prometheus.py; to draw it again (needs matplotlib, `pip install -e .[docs]`):

    SPAMGATE_DASHBOARD_PNG=docs/img/dashboard.png SPAMGATE_DASHBOARD_ROUNDS=12 \\
        python -m pytest -q tests/e2e/test_prometheus.py -k traffic
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import pathlib
import urllib.parse
import urllib.request
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "spamgate.json"

# The panels an admin looks at first, in reading order (a 3-column grid).
MAIN_PANELS = (
    "Messages per second, in and out",
    "Transactions by outcome",
    "Sessions",
    "Refusals per session, by stage",
    "Refusals per session, by reason",
    "Would have refused (monitor mode and WARN)",
    "Refusals in the time range, by stage",
    "Top rules",
    "Top DNS lists",
    "SPF results",
    "DMARC results",
    "DNS latency",
    "DNS lookups by result",
    "Check latency (p90)",
    "Upstream latency by command (p90)",
    "Upstream errors by kind",
    "Message sizes",
    "Reloads in the time range",
)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}), longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws data (rows' own panels included), in order."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self._get("/api/v1/query_range", params)["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return (
            ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
        )
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def plot(
    prometheus: str,
    start: float,
    end: float,
    out: str | pathlib.Path,
    *,
    job: str = "spamgate",
    rate_interval: str = "1m",
    titles: tuple[str, ...] = MAIN_PANELS,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    prom = Prometheus(prometheus)
    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: p for p in panels(dashboard)}
    variables = {
        "job": job,
        "instance": ".+",
        "frontend": ".+",
        "__rate_interval": rate_interval,
        "__range": f"{max(1, math.ceil(end - start))}s",
    }
    step = max(1.0, (end - start) / 300)
    cols = 3
    rows = math.ceil(len(titles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, title in zip(axes.flat, titles, strict=False):
        panel = by_title[title]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(title, fontsize=10, loc="left")
        if panel["type"] in ("bargauge", "stat") and all(
            t.get("instant") for t in panel["targets"]
        ):
            names, values = [], []
            for t in panel["targets"]:
                for series in prom.instant(substitute(t["expr"], variables), end):
                    names.append(legend(t.get("legendFormat", ""), series["metric"]))
                    values.append(float(series["value"][1]))
            pairs = sorted(zip(values, names, strict=True))
            ax.barh([n for _, n in pairs], [v for v, _ in pairs], color="#e8743b")
            for i, (v, _) in enumerate(pairs):
                ax.text(v, i, f" {v:g}", va="center", fontsize=8)
            ax.tick_params(labelsize=8)
            continue
        drawn = 0
        for t in panel["targets"]:
            for series in prom.range(substitute(t["expr"], variables), start, end, step):
                xs = [dt.datetime.fromtimestamp(float(ts), dt.UTC) for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if all(math.isnan(y) or y == 0 for y in ys):
                    continue  # series that stayed at zero only crowd the legend
                ax.plot(
                    xs, ys, linewidth=1.2, label=legend(t.get("legendFormat", ""), series["metric"])
                )
                drawn += 1
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:.0%}"))
        elif unit in ("reqps", "s", "bytes"):
            ax.set_ylabel({"reqps": "per second", "s": "seconds"}.get(unit, unit), fontsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=7, loc="upper left", ncol=2 if drawn > 4 else 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(titles) :]:
        ax.axis("off")
    when = dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(
        f"spamgate dashboard, main panels ({when}, rate interval {rate_interval}; "
        "series that stayed at zero are not drawn)"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--start", required=True, help="Unix time or ISO 8601")
    parser.add_argument("--end", required=True, help="Unix time or ISO 8601")
    parser.add_argument("--out", default="dashboard.png")
    parser.add_argument("--job", default="spamgate")
    parser.add_argument("--rate-interval", default="5m", help="what $__rate_interval becomes")
    args = parser.parse_args()
    plot(
        args.prometheus,
        _time(args.start),
        _time(args.end),
        args.out,
        job=args.job,
        rate_interval=args.rate_interval,
    )


if __name__ == "__main__":
    main()
