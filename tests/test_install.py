"""The environment the tests run in is the one constraints.txt pins (the README's setup
installs through it), so what passes here is what a new machine gets."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_direct_dependency_exactly():
    import tomllib

    project = tomllib.loads((CONSTRAINTS.parent / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group()).lower() for r in requirements}
    missing = sorted(names - set(pinned()) - {"torch"})  # torch: the setup installs the build that fits the machine
    assert not missing, f"constraints.txt does not pin {missing}: run `bash .ci/refresh-constraints`"


def test_installed_versions_are_the_pinned_ones():
    wrong = {}
    for name, version in pinned().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional extra this environment did not install
        if installed != version:
            wrong[name] = f"installed {installed}, pinned {version}"
    assert not wrong, f"this environment was not installed through constraints.txt: {wrong}"
