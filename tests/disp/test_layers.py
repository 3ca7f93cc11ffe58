"""Layers point down: nothing under disp/ imports api, worker or experiments, statically or at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPPER = ("api", "worker", "experiments")
SERVICE_STACK = ("fastapi", "celery", "sqlalchemy", "boto3")


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import statement in a file, at any depth (lazy imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_under_disp_imports_an_upper_layer():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & set(UPPER)) for p in (ROOT / "disp").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from api.cli import add_commands\n    import worker.tasks\n")
    assert imported_roots(f) >= {"api", "worker"}


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return out.stdout.split()


def test_every_disp_module_and_the_bare_parser_load_no_upper_layer():
    """With the extension entry points switched off, importing all of disp and building the whole parser
    (every subcommand's flags) loads nothing of api, worker or experiments, nor the service's stack."""
    mods = _run(
        "import importlib, importlib.metadata, pkgutil, sys\n"
        "importlib.metadata.entry_points = lambda **kw: []\n"
        "import disp, disp.cli\n"
        "for m in pkgutil.walk_packages(disp.__path__, 'disp.'): importlib.import_module(m.name)\n"
        "disp.cli.build_parser().format_help()\n"
        "print('\\n'.join(sys.modules))")
    assert not [m for m in mods if m.split(".")[0] in UPPER + SERVICE_STACK]


def test_the_full_parser_registers_the_service_commands_without_loading_torch():
    """The installed service extends the command line through its entry point; `disp --help` stays light."""
    out = _run(
        "import sys\nimport disp.cli\n"
        "p = disp.cli.build_parser()\n"
        "sub = next(a for a in p._actions if a.dest == 'command')\n"
        "print(' '.join(sorted(sub.choices)))\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'experiments')))")
    assert {"serve", "jobs", "keys", "models", "demo", "defend"} <= set(out)
    assert not [m for m in out if m.split(".")[0] in ("torch", "worker", "experiments")]
