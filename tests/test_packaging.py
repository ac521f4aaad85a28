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


def test_ci_runs_what_the_readme_says_and_every_make_target_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([\w-]+)`", readme)) | set(re.findall(r"^make ([\w-]+)", readme, flags=re.M))
    assert named and named <= targets, named - targets
    assert re.search(r"^make test$", ci, flags=re.M) and "make test" in readme  # CI runs the README's test command
    assert len(readme) <= 8000  # a newcomer's page; the rest is in docs/


def test_every_document_the_readme_links_exists_and_its_tables_are_the_csvs():
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)[#)]", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.md)[#)]", doc.read_text()):
            assert (doc.parent / link).is_file(), (doc.name, link)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "results_tables.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
