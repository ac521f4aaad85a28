"""The notebooks' explorers (deepen.widgets) as a reader meets them: live ipywidgets in JupyterLab, in a real browser.

tests/test_widgets.py checks what the explorers compute, in Python. What it cannot see is the front end: that
JupyterLab loads the widget manager, that each explorer shows as controls (not as its text or PNG fallback, which
is what a notebook shows when the widgets do not load), and that changing a control in the page goes through the
kernel and back to the explorer's output. So this test writes a small notebook with the three explorers, created
as the real notebooks create them, opens it in JupyterLab in headless Chromium, runs all cells from the Run menu,
checks the controls and the image of each explorer, changes one control of each and waits for its text to change.

Run by `make test-browser` (it installs Chromium when missing; `make test` leaves tests/browser out); screenshots
and the JupyterLab log go to a temporary folder named at the end of the run.
"""

import nbformat
import pytest
from labpage import WAIT, open_and_run_all, wait
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from test_widgets import records, write_run  # the fake runs of tests/test_widgets.py

NOTEBOOK = "explorers.ipynb"
WIDGET = ".jp-OutputArea-output .widget-vbox"  # an explorer rendered by the widget manager (not its text or PNG)
CELLS = {  # explorer: the cell that shows it, as in notebooks/
    "plan": "from deepen.widgets import plan_explorer\n\nplan_explorer()",
    "attention": "from deepen.widgets import attention_explorer\n\nattention_explorer()",
    "results": "from deepen.widgets import results_explorer\n\nresults_explorer({runs!r})",
}


def fake_runs(folder):
    """Two small finished runs, as deepen.train writes them (tests/test_widgets.py's two_runs)."""
    grow = {"method": "llama-pro", "groups": 2, "copies": 1, "placement": "interleave", "drop": None}
    write_run(folder / "tiny" / "pro", "llama-pro", grow, records((20.0, 30.0), (1000.0, 100.0), [5.0, 4.0, 3.0]))
    write_run(folder / "tiny" / "full", "full", grow, records((20.0, 60.0), (1000.0, 20.0), [5.0, 3.0, 2.5]))
    return folder


@pytest.fixture(scope="module")
def explorers(browser, lab, artifacts, tmp_path_factory):
    """{name: the explorer's rendered widget}, after opening the notebook and running all its cells."""
    runs = str(fake_runs(tmp_path_factory.mktemp("runs")))
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source.format(runs=runs)) for source in CELLS.values()],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}})
    nbformat.write(notebook, lab.root / NOTEBOOK)

    shown = {}
    for name, cell in zip(CELLS, open_and_run_all(browser, lab, NOTEBOOK, len(CELLS), artifacts)):
        try:
            shown[name] = wait(browser, lambda d: cell.find_element(By.CSS_SELECTOR, WIDGET), f"no {name} explorer")
            continue
        except TimeoutException:
            output = cell.find_element(By.CSS_SELECTOR, ".jp-Cell-outputArea").text or "(nothing)"
        browser.save_screenshot(str(artifacts / f"2-{name}-missing.png"))
        pytest.fail(f"the {name} explorer did not render as widgets within {WAIT} s; its cell shows:\n{output}")
    browser.save_screenshot(str(artifacts / "2-ran.png"))
    return shown


def text(explorer):
    """The explorer's text result: the <pre> in its HTML output widget."""
    return explorer.find_element(By.CSS_SELECTOR, ".widget-html pre").get_attribute("textContent")


def control(explorer, kind, label):
    """The control of ipywidgets' CSS class `kind` (widget-slider, widget-dropdown, ...) labelled `label`."""
    return explorer.find_element(By.XPATH, f".//div[contains(@class, '{kind}')][label[normalize-space()='{label}']]")


def select(explorer, kind, label):
    """The <select> of that control, to pick options as a user does (Selenium clicks them)."""
    return Select(control(explorer, kind, label).find_element(By.TAG_NAME, "select"))


def image(explorer):
    """The src of the explorer's image widget, once the browser has decoded a picture from it."""
    img = explorer.find_element(By.CSS_SELECTOR, "img.widget-image")
    wait(img.parent, lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0,
         "the explorer's image did not load")
    return img.get_attribute("src")


def snapshot(explorer, artifacts, name):
    explorer.parent.execute_script("arguments[0].scrollIntoView({block: 'start'})", explorer)
    explorer.screenshot(str(artifacts / f"{name}.png"))


def test_plan_explorer_follows_its_method_dropdown(explorers, artifacts):
    explorer = explorers["plan"]
    assert len(explorer.find_elements(By.CSS_SELECTOR, ".widget-slider")) == 6  # layers, groups, ..., times
    assert explorer.find_elements(By.CSS_SELECTOR, ".widget-text input")  # the custom map
    before = text(explorer)
    assert "32 -> 40 layers" in before  # LLaMA Pro on the Llama-2-7B shape, 8 groups
    snapshot(explorer, artifacts, "3-plan")

    select(explorer, "widget-dropdown", "method").select_by_visible_text("dus")
    wait(explorer.parent, lambda d: text(explorer) != before, "the plan explorer's text did not follow its method")
    assert "32 -> 40 layers" not in text(explorer)
    snapshot(explorer, artifacts, "4-plan-dus")


def test_attention_explorer_follows_its_head_slider(explorers, artifacts):
    explorer = explorers["attention"]
    assert len(explorer.find_elements(By.CSS_SELECTOR, ".widget-slider")) == 4  # block, head, RoPE pair, distance
    before, picture = text(explorer), image(explorer)
    assert ", head 0:" in before
    snapshot(explorer, artifacts, "5-attention")

    control(explorer, "widget-slider", "head").find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(Keys.ARROW_RIGHT)
    wait(explorer.parent, lambda d: ", head 1:" in text(explorer), "the attention explorer did not move to head 1")
    wait(explorer.parent, lambda d: image(explorer) != picture, "the attention explorer did not redraw")
    snapshot(explorer, artifacts, "6-attention-head-1")


def test_results_explorer_follows_its_runs_list(explorers, artifacts):
    explorer = explorers["results"]
    assert explorer.find_elements(By.CSS_SELECTOR, ".widget-toggle-buttons")  # view, x axis
    assert explorer.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")  # metric, colour by
    before, picture = text(explorer), image(explorer)
    assert "2 of 2 runs" in before and "tiny/full" in before
    snapshot(explorer, artifacts, "7-results")

    select(explorer, "widget-select-multiple", "runs").deselect_by_visible_text("tiny/full")
    wait(explorer.parent, lambda d: "1 of 2 runs" in text(explorer), "the results explorer did not follow its runs")
    assert "tiny/full" not in text(explorer)
    wait(explorer.parent, lambda d: image(explorer) != picture, "the results explorer did not redraw")
    snapshot(explorer, artifacts, "8-results-one-run")
