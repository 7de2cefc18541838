"""The module layout as a contract: who may import whom, read from the source (ast), and the torch-free modules
checked in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fopro"
# function-level imports allowed: matplotlib (its backend is picked on the first plot, never at import), a
# private torch constant that may move between versions (guarded by ImportError), the optional pydicom, and the
# optional trackers of --tracking (fopro[tensorboard], fopro[mlflow]), and the run lock's platform modules (fcntl on
# POSIX, msvcrt on Windows: each guarded by ImportError)
ALLOWED_LOCAL_IMPORTS = {("io", "fcntl"), ("io", "msvcrt"), ("plots", "matplotlib"), ("plots", "matplotlib.pyplot"), ("plots", "matplotlib.colors"),
                         ("export_options", "torch.onnx._constants"), ("data.dicom", "pydicom"),
                         ("tracking", "torch.utils.tensorboard"), ("tracking", "mlflow"), ("tracking", "mlflow.entities")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(every module `path` imports, the ones imported inside a function), absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, local = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules, names = {node.module}, {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        else:
            continue
        found |= names
        if node.col_offset > 0:
            local |= modules
    return found, local


MODULES = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str) -> set[str]:
    return MODULES[module][0]


def test_the_library_never_imports_the_cli() -> None:
    entry_points = ("fopro.cli", "fopro.__main__")
    offenders = [m for m in MODULES if not m.startswith(entry_points) and any(n.startswith("fopro.cli") for n in imported(m))]
    assert offenders == []


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("fopro.metrics", "torch"),
        ("fopro.checkpoint", "fopro.models"),
        ("fopro.train", "fopro.probe.frequency"),
        ("fopro.train", "fopro.probe.fpg_report"),
        ("fopro.train", "fopro.probe.crossval"),
        ("fopro.run", "fopro.probe.frequency"),
        ("fopro.run_summary", "fopro.probe.frequency"),
        ("fopro.run_state", "fopro.probe.frequency"),
        ("fopro.evaluate", "fopro.export"),
        ("fopro.evaluate", "fopro.quantize"),
        ("fopro.evaluate", "fopro.export_check"),
        ("fopro.probe.file", "torch"),
        ("fopro.probe.crossval", "torch"),
        ("fopro.operating_points", "torch"),
        ("fopro.config", "fopro.train"),
    ],
)
def test_forbidden_imports(module: str, forbidden: str) -> None:
    assert not any(name == forbidden or name.startswith(forbidden + ".") for name in imported(module))


def test_no_function_level_imports_beyond_the_allowed_ones() -> None:
    local = {(m.removeprefix("fopro."), name) for m, (_, inside) in MODULES.items() for name in inside}
    assert local <= ALLOWED_LOCAL_IMPORTS, sorted(local - ALLOWED_LOCAL_IMPORTS)


def test_torch_free_modules_load_without_torch() -> None:
    """What reads results (metrics, the probe file, the cross-validation kernel) works in a numpy-only process."""
    code = ("import sys; import fopro.metrics, fopro.probe.file, fopro.probe.crossval, fopro.bands; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
