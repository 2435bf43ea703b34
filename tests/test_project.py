"""The project's own files agree with each other and with the code: dependency lists, MLproject,
the README's quickstart and the CI script, and the documentation (README.md and docs/*.md): its
links, and the commands it shows, which the commands' own parsers and MLproject accept."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
import string
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline.config import TrainConfig
from pipeline.train import build_parser, config_from_args

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
    for path in folder.rglob("*.py"):
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


# -- README, docs and CI ---------------------------------------------------------------------------


def doc_paths() -> list[Path]:
    """The project's documentation: README.md, then every docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def project_docs() -> str:
    """README.md and every docs/*.md, concatenated: whatever a test checks in the documentation
    holds wherever a page shows it."""
    return "\n\n".join(path.read_text() for path in doc_paths())


def section(markdown: str, title: str) -> str:
    """The section whose heading starts with ``title``, down to the next heading of the same or a
    higher level (a ``#`` line inside a fenced block is a shell comment, not a heading)."""
    lines, level, fenced = [], None, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#{1,6}) (.*)", line)
        if heading and level is not None and len(heading.group(1)) <= level:
            break
        if heading and level is None and heading.group(2).startswith(title):
            level = len(heading.group(1))
        if level is not None:
            lines.append(line)
    assert lines, f"no section '{title}' in the documentation"
    return "\n".join(lines)


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


def test_readme_is_a_first_read():
    """The README stays short enough to read first, and leads to every page of docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = sorted(p.relative_to(REPO).as_posix()
                   for p in (REPO / "docs").rglob("*") if p.is_file())
    assert pages, "docs/ is empty"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    assert [p for p in pages if p not in linked] == []


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_documentation_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading of
    it when it names one (pages moved between files keep their links working)."""
    broken = []
    for page in doc_paths():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http(s):, mailto:
            file, _, fragment = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and path.suffix == ".md":
                headings = re.findall(r"^#{1,6} (.*)$", path.read_text(), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


# -- the commands the documentation shows ---------------------------------------------------------

PIPELINE_COMMANDS = ("search", "train", "report", "final", "doctor")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def documented_command_lines() -> list[str]:
    """Every command line of the documentation's shell blocks, and every inline code span that
    runs a pipeline command or `mlflow run .` with options (as in the workflow table)."""
    docs = project_docs()
    lines = [c for block in bash_blocks(docs) for c in commands(block)]
    prose = re.sub(r"^```.*?^```", "", docs, flags=re.M | re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    lines += [span for span in spans
              if re.match(r"(python -m pipeline\.\w+|mlflow run \.) .*-", span)]
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """A shell line as its simple commands: `&&` chains and `;` lists split, trailing comments
    and leading environment assignments (`VAR=value cmd`) dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, current = [], []
    for token in [*lexer, ";"]:
        if token in SEPARATORS:
            while current and re.match(r"[A-Za-z_]\w*=", current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(line, simple command) for every `python -m pipeline.X` and `mlflow run .` shown."""
    found = []
    for line in documented_command_lines():
        for cmd in simple_commands(line):
            module = cmd[2] if cmd[:2] == ["python", "-m"] and len(cmd) > 2 else ""
            if module.removeprefix("pipeline.") in PIPELINE_COMMANDS or cmd[:3] == [
                    "mlflow", "run", "."]:
                found.append((line, cmd))
    return found


def placeholders_filled(args: list[str]) -> list[str]:
    """A placeholder value in capitals (`--study NAME`, `--n-trials N`) becomes one that every
    argument type accepts."""
    return ["1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", a) else a for a in args]


def parse_error(parser_factory, args: list[str]) -> str | None:
    """None when the command's own parser accepts ``args`` (-h included), else its message."""
    import contextlib
    import io

    parser = parser_factory()
    parser.allow_abbrev = False  # a page must spell a flag out: `--n-trial` is a typo there
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(placeholders_filled(args))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return err.getvalue().strip() or f"exit code {exit_.code}"
    return None


def help_text(module: str) -> str:
    """`python -m pipeline.X -h`, for the commands that build their parser inside main()."""
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}", "-h"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def mlflow_run_problems(cmd: list[str], entry_points: dict) -> list[str]:
    """`mlflow run . -e NAME -P key=value ...`: NAME is an entry point of MLproject and every key
    one of its declared parameters."""
    entry, keys, args = "main", [], iter(cmd[3:])
    for token in args:
        flag, _, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if flag in ("-e", "--entry-point"):
            entry = inline or next(args, "")
        elif flag in ("-P", "--param-list"):
            keys.append((inline or next(args, "")).split("=", 1)[0])
    if entry not in entry_points:
        return [f"no entry point {entry!r} in MLproject"]
    declared = set(entry_points[entry].get("parameters", {}))
    return [f"{entry}: no parameter {key!r}" for key in keys if key not in declared]


def test_every_documented_command_parses():
    """Every `python -m pipeline.X ...` the README and docs/ show is accepted by that command's
    own argument parser (report and doctor build theirs inside main(): each flag shown must
    appear in their -h), and every `mlflow run . -e NAME -P key=value` names an MLproject entry
    point and its declared parameters. Nothing runs: documentation that drifts from the code
    fails here."""
    from pipeline import final, train
    from pipeline.search import cli as search_cli

    parsers = {"search": search_cli.build_parser, "train": train.build_parser,
               "final": final.build_parser}
    entry_points = mlproject()["entry_points"]
    helps: dict[str, str] = {}
    shown = documented_commands()
    problems = []
    for line, cmd in shown:
        if cmd[0] == "mlflow":
            problems += [f"{line}: {p}" for p in mlflow_run_problems(cmd, entry_points)]
            continue
        module, args = cmd[2].removeprefix("pipeline."), cmd[3:]
        if module in parsers:
            error = parse_error(parsers[module], args)
            if error:
                problems.append(f"{line}: {error}")
            continue
        if module not in helps:
            helps[module] = help_text(module)
        for arg in args:
            flag = arg.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and not re.search(
                    rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[module]):
                problems.append(f"{line}: {flag} is not an option of pipeline.{module}")
    assert problems == []
    # the check saw what the pages show: every command, and entry points with parameters
    assert {c[2].removeprefix("pipeline.") for _, c in shown if c[0] == "python"} == set(
        PIPELINE_COMMANDS)
    assert any(c[0] == "mlflow" and "-P" in c for _, c in shown)
