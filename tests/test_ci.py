"""CI runs the test command README's quickstart gives, verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    command = next(line for line in readme if "python -m pytest" in line and line.startswith("pip install"))
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
    assert "ruff check ." in command.split("python -m pytest")[0]  # lint before the tests


def test_ci_installs_chromium_for_the_report_browser_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "command -v chromium" in ci and "apt-get install -y chromium" in ci
    assert ci.index("apt-get install -y chromium") < ci.index("python -m pytest")
