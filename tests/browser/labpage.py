"""Driving JupyterLab in the browser as a reader does: open a notebook, wait for its kernel, Run > Run All Cells."""

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 120  # seconds per step, as in conftest.py: the CPU may be shared with training runs
CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"  # the code cells of the notebook in view


def wait(driver, condition, message, timeout: float = WAIT):
    """WebDriverWait for `condition`, tolerant of elements re-rendered in the meantime. driver: the WebDriver (an
    element's .parent)."""
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(condition,
                                                                                                      message)


def open_and_run_all(browser, lab, name: str, n_cells: int, artifacts) -> list:
    """Open lab.root/name, wait for its `n_cells` code cells and an idle kernel, run all cells from the Run menu;
    the code cells' elements, in order (their outputs still arriving)."""
    browser.get(lab.open(name))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, CELLS)) == n_cells,
         f"JupyterLab did not show the {n_cells} code cells of {name}")
    # the status bar's kernel status: "Idle" once connected (the toolbar's indicator says idle before it starts)
    wait(browser, lambda d: d.find_elements(By.XPATH, f"//span[@title='Change kernel for {name}']"
                                                      "[contains(., '| Idle')]"),
         f"the kernel of {name} did not start and become idle")
    browser.save_screenshot(str(artifacts / f"{name}-opened.png"))
    browser.find_element(By.XPATH, "//li[contains(@class, 'lm-MenuBar-item')][normalize-space()='Run']").click()
    wait(browser, lambda d: d.find_element(By.XPATH, "//li[contains(@class, 'lm-Menu-item')][not(contains(@class, "
                                                     "'lm-mod-disabled'))][normalize-space()='Run All Cells']"),
         "no enabled Run > Run All Cells").click()
    return browser.find_elements(By.CSS_SELECTOR, CELLS)


def output_text(cell) -> str:
    """What a code cell's output area shows, as text."""
    return cell.find_element(By.CSS_SELECTOR, ".jp-Cell-outputArea").get_attribute("textContent")
