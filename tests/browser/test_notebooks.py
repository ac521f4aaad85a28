"""The real notebooks in JupyterLab, in a real browser: lab01 as a student meets it (the checks' messages under
their cells) and notebook 02 run whole, its plan explorer live at the end.

Run by `make test-browser` with the other browser tests (DEEPEN_PROFILE=tiny, so notebook 02 takes about a minute).
"""

import shutil
from pathlib import Path

import nbformat
from labpage import WAIT, open_and_run_all, output_text, wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from test_labs import MISTAKES, submission

from deepen.grade import fill

ROOT = Path(__file__).resolve().parents[2]
LAB01 = ROOT / "notebooks" / "labs" / "lab01_llama_block.ipynb"
TRACEBACK = "Traceback (most recent call last)"  # how IPython shows an error under a cell


def test_lab01_shows_each_check_as_one_readable_line(browser, lab, artifacts, tmp_path):
    """rms_norm answered right, apply_rope with a named mistake (interleaved pairs), the rest left as handed out."""
    answered = fill(nbformat.read(LAB01, as_version=4), ROOT / "tests" / "labs" / "solutions" / "lab01.py")
    right = next(c.source for c in answered.cells if c.metadata.get("exercise") == "rmsnorm")
    wrong = ("import torch\nfrom deepen import checks\n\n"
             "def apply_rope(x, positions, theta):\n    return checks._interleaved_rope(x, positions, theta)")
    assert MISTAKES["RoPE pairs interleaved instead of halves"][0] == "rope"
    path = submission(tmp_path, "lab01", {"rmsnorm": right, "rope": wrong})
    shutil.copy(path, lab.root / path.name)
    n_cells = sum(c.cell_type == "code" for c in nbformat.read(path, as_version=4).cells)

    cells = open_and_run_all(browser, lab, path.name, n_cells, artifacts)
    summary = cells[-1]
    wait(browser, lambda d: "exercises pass" in output_text(summary), "lab01's summary did not appear")
    browser.save_screenshot(str(artifacts / "lab01-ran.png"))
    shown = [output_text(c) for c in cells if "checks.check_" in c.find_element(By.CSS_SELECTOR, ".jp-InputArea")
             .get_attribute("textContent")]
    assert len(shown) == 5, shown
    assert shown[0].startswith("✓ rmsnorm: pass — equals deepen.llama.RMSNorm")
    assert shown[1].startswith("✗ rope: fail — ") and "pairs interleaved instead of halves" in shown[1]
    assert all(s.startswith(("… attention: not done", "… swiglu: not done", "… block: not done")) for s in shown[2:])
    assert all(s.count("\n") <= 1 for s in shown), shown  # one line each: no traceback under any check
    assert not any(TRACEBACK in output_text(c) for c in cells)
    assert "1 of 5 exercises pass" in output_text(summary)


def test_notebook_02_runs_whole_and_its_plan_explorer_is_live(browser, lab, artifacts):
    name = "02_zero_init_expansion_is_identity.ipynb"
    shutil.copy(ROOT / "notebooks" / name, lab.root / name)
    n_cells = sum(c.cell_type == "code" for c in nbformat.read(lab.root / name, as_version=4).cells)
    cells = open_and_run_all(browser, lab, name, n_cells, artifacts)
    last = cells[-1]
    explorer = wait(browser, lambda d: last.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox"),
                    f"notebook 02's plan explorer did not render as widgets within {WAIT} s of its cell",
                    timeout=10 * WAIT)
    assert not any(TRACEBACK in output_text(c) for c in cells)  # every cell before it ran without an error
    text = lambda: explorer.find_element(By.CSS_SELECTOR, ".widget-html pre").get_attribute("textContent")  # noqa: E731
    before = text()
    Select(explorer.find_element(By.XPATH, ".//div[contains(@class, 'widget-dropdown')][label[normalize-space()="
                                           "'method']]//select")).select_by_visible_text("dus")
    wait(browser, lambda d: text() != before, "notebook 02's plan explorer did not follow its method")
    explorer.screenshot(str(artifacts / "02-plan-explorer-dus.png"))
