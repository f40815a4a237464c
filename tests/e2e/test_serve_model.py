"""`smolcluster serve-model` in a real browser: headless chromium, driven through chromedriver
(selenium), uploads an MNIST test digit saved as PNG and draws another one with the mouse, stroke
by stroke, on the page's canvas; the page must show the right class for each. A screenshot of the
drawn digit and its answer is kept in tests/artifacts/serve-model.png.

CI installs chromium and chromium-driver (.ci/run); elsewhere the test skips when either is missing.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import ARTIFACTS, CHROMEDRIVER, CHROMIUM, REPO, env, mnist_test_digit, smolcluster, train_mnist, wait_for

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
                                 reason="no chromium or chromedriver here")]

UPLOADED = 0
"""MNIST test sample 0: a 7."""
DRAWN = (1, 2, 3)
"""Test samples 1, 2, 3 (a 2, a 1 and a 0), drawn with the mouse."""


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "CI must have chromium and chromedriver (.ci/run installs them)"
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=480,900"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # paths given: nothing downloaded


def _answer(driver) -> int:
    """The page's top class, once its last request came back."""
    from selenium.webdriver.support.ui import WebDriverWait

    guess = driver.find_element("id", "guess")
    WebDriverWait(driver, 30).until(lambda _: guess.get_attribute("data-state") == "done" and guess.text)
    assert not driver.find_element("id", "status").text, driver.find_element("id", "status").text
    assert guess.text == driver.find_element("css selector", "#top li").get_attribute("data-class")
    return int(guess.text)


def _draw(driver, digit) -> None:
    """Drag the mouse along every row's runs of bright pixels of a 28 x 28 digit, scaled to the canvas."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "pad")
    size = canvas.size["width"]
    scale = size / 28
    at = lambda px: round((px + 0.5) * scale - size / 2)  # noqa: E731 (offsets are from the canvas's centre)
    chain = ActionChains(driver, duration=0)
    pixels = digit.load()
    for row in range(28):
        col = 0
        while col < 28:
            if pixels[col, row] < 128:
                col += 1
                continue
            start = col
            while col < 28 and pixels[col, row] >= 128:
                col += 1
            chain.move_to_element_with_offset(canvas, at(start), at(row)).click_and_hold()
            chain.move_to_element_with_offset(canvas, at(col - 1), at(row)).release()
    chain.perform()


def test_the_predict_page_classifies_an_uploaded_and_a_drawn_mnist_digit(tmp_path):
    model = train_mnist(tmp_path / "run")
    server = subprocess.Popen(smolcluster("serve-model", str(model), "--port", "0"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    driver = None
    try:
        line = server.stdout.readline()
        assert "http://127.0.0.1:" in line, line + server.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        driver = _browser()
        driver.get(url)

        digit, label = mnist_test_digit(UPLOADED)
        digit.save(tmp_path / "upload.png")
        driver.find_element("id", "file").send_keys(str(tmp_path / "upload.png"))
        assert _answer(driver) == label

        drawn = {}
        for n in DRAWN:
            driver.find_element("id", "clear").click()
            wait_for(lambda: not driver.find_element("id", "guess").text, 10, "the page to clear")
            digit, label = mnist_test_digit(n)
            _draw(driver, digit)
            drawn[n] = (_answer(driver), label)
            if n == DRAWN[0]:
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "serve-model.png"
                driver.save_screenshot(str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert all(got == want for got, want in drawn.values()), drawn
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert "Traceback" not in err, err[-2000:]
