"""The README and docs/ say what the code does: the README's two commands are the ones CI runs, every
link, repository path, `elastic` command, option and Python name the docs show exists, and
docs/cli.md is what docs/gen_cli.py writes from the CLI itself."""

import importlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import pytest
import typer

from elastic.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
# Paths under a top-level folder of this repository; a token such as OUT/export or /tmp/x is not one.
REPO_PATH = re.compile(r"(?<![\w./-])((?:slicer|trainer|export|profiles|elastic_cli|examples|bench|tests|docs|\.ci)"
                       r"/[\w.*/<>-]*)")
# Paths in another project's tree that docs/runtime-facts.md cites (Megatron-Bridge's test file).
FOREIGN = {"tests/unit_tests/models/nemotronh_puzzle/test_nemotron_h_puzzle_bridge.py"}
# History belongs in commit messages: the docs say what is.
HISTORY = re.compile(r"\b(as before|used to be|no longer|anymore|formerly|previously|what it always did|"
                     r"nothing here yet|synthetic until)\b", re.I)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def fenced_and_prose(text: str) -> tuple[list[str], str]:
    """The fenced code blocks of a markdown page (continuation lines joined) and the rest of it."""
    blocks, prose, inside = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside = []
            else:
                blocks.append("\n".join(inside).replace("\\\n", " "))
                inside = None
        elif inside is not None:
            inside.append(line)
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def code_lines(page: Path) -> list[str]:
    """Every piece of code a page shows: each line of its fenced blocks, each inline code span."""
    blocks, prose = fenced_and_prose(page.read_text())
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return [line for b in blocks for line in b.splitlines()] + spans


@lru_cache(maxsize=None)
def cli():
    return typer.main.get_command(app)


def load_gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slugs(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    _, prose = fenced_and_prose(page.read_text())
    heads = re.findall(r"^#+ (.+)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_installs_cpu_torch_first():
    main_job, _ = readme_commands()
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert main_job.endswith(".venv/bin/elastic fit-my-gpu")


def test_readme_starts_with_the_two_commands():
    """The two commands come before any section, so a newcomer reads them first."""
    text = (ROOT / "README.md").read_text()
    top = text.split("\n## ", 1)[0]
    assert all(f"```bash\n{c}\n```" in top for c in readme_commands())


def test_readme_links_every_doc():
    """The README's table of contents reaches every page in docs/."""
    text = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    assert {f"docs/{p.name}" for p in DOCS} <= linked, "docs/ pages the README does not link"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    """Every relative link names a file that exists, and an anchor a heading of it."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    assert not problems, f"{page.name}: {problems}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_repository_paths_exist(page):
    """Every repository path shown in code (`slicer/storage/outputs.py`, `profiles/data/*.toml`) exists."""
    missing = set()
    for code in code_lines(page):
        for path in REPO_PATH.findall(code):
            path = path.rstrip(".")
            if "<" in path or path in FOREIGN:  # a placeholder, or another project's file
                continue
            if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                missing.add(path)
    assert not missing, f"{page.name} names paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_and_options_exist(page):
    """Every `elastic COMMAND --option` shown is a command of `elastic --help` with that option."""
    group = cli()
    problems = []
    for code in code_lines(page):
        code = re.sub(r"'[^']*'|\"[^\"]*\"", "''", code)  # prompts and JSON bodies are not options
        for m in re.finditer(r"(?:^|[\s(/])(?:elastic|elastic\.cli\.main) ([a-z][a-z0-9-]*)(.*)", code):
            name, rest = m.group(1), re.split(r"[|#;)]|&&", m.group(2))[0]
            cmd = group.commands.get(name)
            if cmd is None:
                problems.append(f"`elastic {name}`: no such command")
                continue
            known = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))} | {"--help"}
            for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
                if opt not in known:
                    problems.append(f"`elastic {name} {opt}`: no such option")
    assert not problems, f"{page.name}: {sorted(set(problems))}"


def test_docs_name_every_command():
    """docs/cli.md has a row in its table and a generated section for every command."""
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in cli().commands:
        assert f"| `elastic {name}` |" in text, f"docs/cli.md's table lacks `elastic {name}`"
        assert f"### elastic {name}\n" in text, f"docs/cli.md lacks the section of `elastic {name}`"


def test_cli_reference_is_generated_from_the_cli():
    """docs/cli.md's option tables are the CLI's own: a changed option means rerunning docs/gen_cli.py."""
    gen = load_gen_cli()
    assert gen.current() == gen.render(), "docs/cli.md is stale: run `.venv/bin/python docs/gen_cli.py`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_names_exist(page):
    """Every `elastic.module.name` the docs give imports."""
    missing = []
    for code in code_lines(page):
        for dotted in re.findall(r"(?<![\w.])elastic(?:\.[A-Za-z_]\w*)+", code):
            parts = dotted.split(".")
            for i in range(len(parts), 1, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                try:
                    for attr in parts[i:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(dotted)
                break
            else:
                missing.append(dotted)
    assert not missing, f"{page.name} names what does not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_tell_no_history(page):
    hits = [m.group(0) for m in HISTORY.finditer(page.read_text())]
    assert not hits, f"{page.name} tells history: {hits}"
