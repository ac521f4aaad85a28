import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_environment_yml_mirrors_requirements():
    req = pins((ROOT / "requirements.txt").read_text().splitlines())
    env = (ROOT / "environment.yml").read_text()
    pip_section = re.findall(r"^      - (\S+)$", env, flags=re.M)
    assert pip_section == req


def test_torch_is_pinned_first():
    assert pins((ROOT / "requirements.txt").read_text().splitlines())[0] == "torch==2.13.0"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
