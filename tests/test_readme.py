"""The README's two commands are the ones that work: CI runs the README's test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_installs_cpu_torch_first():
    main_job, _ = readme_commands()
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
