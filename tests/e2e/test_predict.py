"""`smolcluster predict` and `smolcluster serve-model` on one model trained here: image files of any
size read as the test set's samples, and the drawing page in a real browser: headless chromium,
driven through chromedriver (selenium), uploads an MNIST test digit saved as PNG and draws others
with the mouse, stroke by stroke, on the page's canvas; the page must show the right class for
each. A screenshot of a drawn digit and its answer is kept in tests/artifacts/serve-model.png.

CI installs chromium and chromium-driver (.ci/run); elsewhere the browser test skips when either is
missing."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from PIL import Image

from helpers import ARTIFACTS, CHROMEDRIVER, CHROMIUM, REPO, env, mnist_test_digit, smolcluster, train_mnist, wait_for

pytestmark = pytest.mark.timeout(180)
SAMPLES = list(range(10))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(smolcluster(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=150)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """One SimpleNN trained on MNIST for both commands (training is the slow part)."""
    return str(train_mnist(tmp_path_factory.mktemp("predict") / "run"))


def test_predict_reads_png_files_of_any_size_like_the_test_set(tmp_path, model):
    files = []
    for n in SAMPLES:
        digit, _ = mnist_test_digit(n)
        digit.save(tmp_path / f"{n}.png")  # as MNIST has it: light on dark, 28 x 28
        # as someone would draw it: dark ink on white, ten times the size, as JPEG
        Image.eval(digit, lambda v: 255 - v).resize((280, 280), Image.Resampling.NEAREST).save(tmp_path / f"{n}.jpg")
        files += [str(tmp_path / f"{n}.png"), str(tmp_path / f"{n}.jpg")]
    got = _run("predict", model, *files, *[a for n in SAMPLES for a in ("--index", str(n))])
    assert got.returncode == 0, got.stderr[-2000:]
    lines = got.stdout.splitlines()
    top = {name: int(cls) for name, cls in (re.match(r"(\S+): (\d+) \(", line).groups() for line in lines)}
    labels = {int(n): int(y) for n, y in re.findall(r"test\[(\d+)\]: .*\[label (\d+)\]", got.stdout)}
    for n in SAMPLES:
        assert top[str(tmp_path / f"{n}.png")] == top[f"test[{n}]"], got.stdout  # the same input, exactly
    drawn = sum(top[str(tmp_path / f"{n}.jpg")] == labels[n] for n in SAMPLES)
    assert drawn >= 8, got.stdout
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    refused = _run("predict", model, str(bad))
    assert refused.returncode == 2 and "not an image Pillow can read" in refused.stderr, refused.stderr[-1000:]


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


@pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
                    reason="no chromium or chromedriver here")
def test_the_predict_page_classifies_an_uploaded_and_a_drawn_mnist_digit(tmp_path, model):
    server = subprocess.Popen(smolcluster("serve-model", model, "--port", "0"), stdout=subprocess.PIPE,
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
