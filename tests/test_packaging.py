"""One install namespace (issue 12): the five folders install as elastic.*, and every Python file
in them is in a listed package (a subpackage missing from pyproject.toml would be missing from the
wheel while the editable install still finds it)."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_installs_under_elastic_and_none_is_left_out():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = cfg["packages"], cfg["package-dir"]
    assert all(p.startswith("elastic.") for p in packages), packages
    assert set(dirs) == {"elastic.cli", "elastic.slicer", "elastic.trainer", "elastic.export", "elastic.profiles"}

    def folder(pkg: str) -> Path:
        top = ".".join(pkg.split(".")[:2])
        return ROOT / dirs[top] / Path(*pkg.split(".")[2:])

    listed = {folder(p) for p in packages}
    for top in dirs.values():
        for py in (ROOT / top).rglob("*.py"):
            assert py.parent in listed, f"{py.relative_to(ROOT)} is in no package listed in pyproject.toml"
    assert cfg["package-data"].keys() <= set(packages)


def test_the_console_script_is_in_the_namespace():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"elastic": "elastic.cli.main:main"}
