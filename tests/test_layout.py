"""The package's shape: lint clean, imports one way (import-linter contracts in pyproject.toml),
no import cycle, small modules, and each shared fact spelled in one place."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from pipeline import names

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
MAX_LINES = 400


def _bin(name: str) -> str:
    """A console script installed beside this interpreter (ruff, lint-imports)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else shutil.which(name) or name


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_ruff_finds_nothing():
    result = subprocess.run([_bin("ruff"), "check", "pipeline", "tests", "benchmarks"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    result = subprocess.run([_bin("lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout, result.stdout


def test_import_contracts_catch_violations(tmp_path):
    """A copy of the package with three deliberate violations: each is reported broken."""
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    trainer = tmp_path / "pipeline" / "training" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n\ndef _log():\n    import mlflow  # noqa\n")
    plan = tmp_path / "pipeline" / "search" / "plan.py"  # search reaching up into the report
    plan.write_text(plan.read_text() + "\n\ndef _up():\n    from pipeline.report import build\n")
    data = tmp_path / "pipeline" / "training" / "data.py"  # a cycle, hidden inside a function
    data.write_text(data.read_text() + "\n\ndef _loop():\n    from pipeline.training import "
                    "trainer\n")
    result = subprocess.run([_bin("lint-imports")], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": str(Path(sys.executable).parent),
                                 "PYTHONPATH": str(tmp_path)})
    out = " ".join(result.stdout.split())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Training knows nothing of Optuna or MLflow BROKEN" in out, out
    assert "-> training -> shared BROKEN" in out, out
    assert "(imports inside functions included) BROKEN" in out, out
    assert "2 kept, 3 broken" in out, out


def test_no_module_is_long():
    long = {str(p.relative_to(REPO)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _string_constants(path: Path) -> list[tuple[str, int]]:
    """Every string literal of a module but its docstrings, with its line."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_tag_keys_and_artifact_names_are_spelled_only_in_names():
    """Every MLflow tag key, kind-free, and every artifact file name lives in pipeline.names."""
    facts = {v for k, v in vars(names).items()
             if k.isupper() and isinstance(v, str) and not k.startswith("KIND_")
             and (v.startswith("pipeline.") or "." in v or "/" in v)}
    assert {"pipeline.kind", "model/state_dict.pt", "study.yaml"} <= facts
    found = [f"{p.relative_to(REPO)}:{line}: {value!r}" for p in _modules()
             if p.name != "names.py" for value, line in _string_constants(p)
             if value in facts or value.startswith("pipeline.boundary")
             or "tags.`pipeline." in value]
    assert found == []


def test_no_module_level_fact_is_defined_twice():
    """A module-level constant (an UPPER_CASE name bound to a literal) with the same name and
    value in two modules is one fact written twice: exit codes, file names, limits."""
    seen = defaultdict(list)
    for path in _modules():
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                seen[(node.targets[0].id, repr(value))].append(str(path.relative_to(REPO)))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_the_dataset_list_and_the_epoch_formula_are_written_once():
    """All the dataset names together appear only in pipeline.config (and in the loaders, which
    say how each is read); the cyclical epoch count (2 * step_size_epochs * cycles) is computed
    only by config.planned_epochs."""
    from pipeline.config import DATASETS

    for path in _modules():
        text = path.read_text()
        if path.name != "config.py":
            if path != PACKAGE / "training" / "data.py":
                assert not all(f'"{d}"' in text for d in DATASETS), path
            assert "step_size_epochs * cycles" not in text.replace('"', ""), path
            assert 'top("step_size_epochs") * top("cycles")' not in text, path


def test_every_command_has_its_main():
    """`python -m pipeline.X` for every command (a package's __main__, or a module's guard)."""
    for command in ("search", "report"):
        assert (PACKAGE / command / "__main__.py").is_file(), command
    for command in ("train", "final", "doctor"):
        assert 'if __name__ == "__main__":' in (PACKAGE / f"{command}.py").read_text(), command
