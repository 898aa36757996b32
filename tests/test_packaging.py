"""pyproject.toml, environment.yml, README.md and .ci/run agree with each other."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("notebooks", "dev")
IGNORED = {"python", "pip"}


def normalize(requirement: str) -> str:
    """PEP 503 name of a requirement string: no extras, version, marker or channel."""
    requirement = requirement.split("::")[-1]  # conda "channel::name"
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def pyproject_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return {normalize(r) for r in reqs} - IGNORED


def environment_names() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for pip_req in dep.get("pip", []):
                if not pip_req.startswith("-"):  # "-e ." installs this package
                    names.add(normalize(pip_req))
        else:
            names.add(normalize(dep))
    return names - IGNORED


def test_environment_yml_matches_pyproject():
    pyproject, environment = pyproject_names(), environment_names()
    assert pyproject - environment == set(), "in pyproject.toml but not in environment.yml"
    assert environment - pyproject == set(), "in environment.yml but not in pyproject.toml"


def test_environment_yml_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_reqs = [r for d in env["dependencies"] if isinstance(d, dict) for r in d.get("pip", [])]
    assert "-e ." in pip_reqs
    assert "conda-forge" in env["channels"]


def readme_test_commands() -> list[str]:
    """The README's test command, read as .ci/run reads it: the non-blank lines
    between the <!-- test-command --> markers, less the ``` fences."""
    lines, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if re.fullmatch(r"<!-- test-command -->\s*", line):
            inside = True
        elif re.fullmatch(r"<!-- /test-command -->\s*", line):
            inside = False
        elif inside and line.strip() and not line.lstrip().startswith("```"):
            lines.append(line)
    return lines


def test_readme_has_exactly_one_test_command():
    commands = readme_test_commands()
    assert len(commands) == 1, commands
    command = commands[0]
    assert 'pip install -e ".[dev]"' in command
    assert "pytest" in command


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    assert 'bash -c "$TEST_COMMAND"' in script
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-command"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert printed.splitlines() == readme_test_commands()


def test_quick_start_has_the_course_command():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[notebooks]" && jupyter lab notebooks/' in readme


def test_every_package_is_in_the_wheel():
    """pyproject.toml's package discovery finds every package of sparseflash (e.g. sparseflash.exercises)."""
    # setuptools' rule, without importing setuptools (whose distutils shim can clash with a
    # distutils already imported in the test process): a package is found when its dotted
    # name matches an ``include`` pattern and no ``exclude`` pattern.
    from fnmatch import fnmatchcase

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sparseflash").rglob("__init__.py")}
    assert "sparseflash.exercises" in on_disk
    found = {p for p in on_disk if any(fnmatchcase(p, pat) for pat in find["include"])
             and not any(fnmatchcase(p, pat) for pat in find.get("exclude", []))}
    assert on_disk - found == set()


def test_git_commit_marks_an_edited_tree(monkeypatch):
    """Result files name the commit that made them, with ``-dirty`` when tracked files were edited,
    and None (not an error) where git is missing."""
    import re
    import subprocess

    from sparseflash import _provenance

    got = _provenance.git_commit()
    if got is not None:  # a git checkout (a copy without .git gives None)
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", got), got
    answers = iter(["a" * 40 + "\n", " M sparseflash/flash.py\n"])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, next(answers), ""))
    assert _provenance.git_commit() == "a" * 40 + "-dirty"
    answers = iter(["b" * 40 + "\n", ""])
    assert _provenance.git_commit() == "b" * 40

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert _provenance.git_commit() is None
