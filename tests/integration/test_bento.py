"""The bento's Python packages (serving/bentofile.yaml): what the serving code imports, at the lock's versions.
The image cannot be built here (no Docker engine), so a forgotten package would only show in production."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# Imported by shared modules the service never calls: devset (distill / export checks), services (tests, benchmarks).
NOT_SERVED = {"datasets", "pandas", "httpx"}


def bento_packages() -> dict[str, Requirement]:
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    requirements = [Requirement(line) for line in bentofile["python"]["packages"]]
    return {canonicalize_name(r.name): r for r in requirements}


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def imported_modules(paths: list[Path]) -> set[str]:
    modules = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"pipelines", "serving", "__future__"}


def test_bento_packages_are_pinned_to_the_lock():
    locked = locked_versions()
    for name, requirement in bento_packages().items():
        assert name in locked, f"bentofile package {name} is not in requirements/lock.txt"
        if requirement.specifier:
            assert requirement.specifier.contains(locked[name]), f"{name}: bentofile {requirement.specifier}, lock {locked[name]}"


def test_every_module_the_service_imports_is_in_the_bento():
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    served = [path for pattern in bentofile["include"] if pattern.endswith(".py") for path in REPO.glob(pattern)]
    packages = set(bento_packages())
    owners = packages_distributions()
    missing = {}
    for module in sorted(imported_modules(served)):
        distributions = {canonicalize_name(d) for d in owners.get(module, [module])}
        if not distributions & (packages | NOT_SERVED) and module not in NOT_SERVED:
            missing[module] = sorted(distributions)
    # numpy and packaging arrive with torch / onnxruntime / transformers, which pin them.
    missing = {m: d for m, d in missing.items() if m not in {"numpy", "packaging"}}
    assert not missing, f"imported by the served code but not in serving/bentofile.yaml: {missing}"
