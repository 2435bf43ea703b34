"""The project's own files agree with each other and with the code: dependency lists, MLproject,
the README's quickstart and the CI script."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
import string
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline.config import TrainConfig
from pipeline.run import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def conda_pip_list() -> list[str]:
    deps = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    (pip,) = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    return pip


def normalised(requirements) -> list[tuple[str, str, str]]:
    reqs = [Requirement(r) for r in requirements]
    return sorted((canonicalize_name(r.name), str(r.specifier), str(r.marker or "")) for r in reqs)


def test_conda_pip_list_equals_pyproject_dependencies():
    ours = pyproject()["project"]["dependencies"]
    assert len(ours) == len({Requirement(r).name for r in ours})  # no package listed twice
    assert normalised(conda_pip_list()) == normalised(ours)


def test_conda_python_satisfies_requires_python():
    deps = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    (python,) = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    version = python.split("=", 1)[1]
    assert version in SpecifierSet(pyproject()["project"]["requires-python"])


def imported_top_level_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"pipeline", "__future__"}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    """A package imported directly must be declared, not arrive by luck through another's
    requirements (those can drop it, or allow an incompatible major version)."""
    declared = {canonicalize_name(Requirement(r).name)
                for r in pyproject()["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_level_modules(REPO / "pipeline")):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert undeclared == {}


# -- MLproject -------------------------------------------------------------------------------------


def mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_environment_file_exists():
    assert (REPO / mlproject()["conda_env"]).is_file()


def test_mlproject_entry_points_run_existing_modules_with_declared_params():
    entry_points = mlproject()["entry_points"]
    assert "train" in entry_points
    for name, entry in entry_points.items():
        command = " ".join(entry["command"].split())
        match = re.match(r"python -m ([\w.]+)", command)
        assert match, f"{name}: {command}"
        assert importlib.util.find_spec(match.group(1)) is not None, match.group(1)
        used = {field for _, field, _, _ in string.Formatter().parse(command) if field}
        declared = set(entry.get("parameters", {}))
        assert used <= declared, f"{name}: undeclared {sorted(used - declared)}"
        assert declared <= used, f"{name}: declared but never passed {sorted(declared - used)}"


def test_mlproject_train_defaults_make_a_valid_configuration():
    """The command `mlflow run . -e train` builds from the defaults parses, and each parameter
    lands on the TrainConfig field of the same name with the declared default."""
    entry = mlproject()["entry_points"]["train"]
    params = entry["parameters"]
    assert set(params) <= set(TrainConfig.model_fields)
    values = {k: str(spec["default"]) for k, spec in params.items()}
    argv = shlex.split(entry["command"].format(**values))
    args = build_parser().parse_args(argv[3:])
    cfg = config_from_args(args)
    for key, spec in params.items():
        assert getattr(cfg, key) == spec["default"], key


# -- README and CI ---------------------------------------------------------------------------------


def commands(block: str) -> list[str]:
    """Non-empty, non-comment lines of a shell block, with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", markdown, re.M | re.S)


def quickstart_section(readme: str) -> str:
    match = re.search(r"^## Quickstart[ \t]*\n(.*?)(?=^#{1,2} |\Z)", readme, re.M | re.S)
    assert match, "README.md has no '## Quickstart' section"
    return match.group(1)


def test_readme_quickstart_is_two_commands():
    """The quickstart's first shell block is the whole setup: install + run, install + test.
    (A later block in the section, such as opening the MLflow UI, is optional viewing.)"""
    blocks = bash_blocks(quickstart_section((REPO / "README.md").read_text()))
    assert blocks, "the Quickstart section has no ```bash block"
    assert len(commands(blocks[0])) == 2, commands(blocks[0])


def test_ci_runs_the_readme_test_command():
    readme_commands = [c for block in bash_blocks((REPO / "README.md").read_text())
                       for c in commands(block)]
    tests = [c for c in readme_commands if "pytest" in c]
    assert tests, "README.md shows no test command"
    ci = REPO / ".ci" / "run"
    ci_commands = commands(ci.read_text())
    for command in tests:
        assert command in ci_commands
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
