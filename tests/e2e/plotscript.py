"""grafana/plot_dashboard.py, imported by path: it is a script, not part of a package."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[2] / "grafana" / "plot_dashboard.py"
_spec = importlib.util.spec_from_file_location("plot_dashboard", _PATH)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules["plot_dashboard"] = _module
_spec.loader.exec_module(_module)

DASHBOARD = _module.DASHBOARD
panels = _module.panels
substitute = _module.substitute
plot = _module.plot
