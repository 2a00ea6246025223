"""The operator console through Streamlit's AppTest against a real service: the session's
tritonserver (demo encoders and demo `mllm`), Milvus Lite and `icl serve` with a token and
metrics, holding a small demo gallery. Each page's work and each failure an operator can meet
(service down, token refused, nothing found, bad filters, a rejected crop) is checked on what
the page shows."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from icl.orchestrator.tritonserver import free_port
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb_grpc
from icl_api.client import open_channel
from tests.helpers import enroll_all, gallery_images, start_orchestrator, wait_until

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"
N_IMAGES = 30
TOKEN = "console-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("console")
    tokens = work / "tokens.json"
    tokens.write_text(
        json.dumps({"tokens": {"ops": {"token": TOKEN, "permissions": ["admin"]}}}),
        encoding="utf-8",
    )
    metrics_port = free_port()
    running = start_orchestrator(
        triton.grpc_url,
        work / "gallery.db",
        work / "serve.log",
        args=["--tokens-file", str(tokens)],
        ICL_MLLM_MODEL="mllm",
        ICL_METRICS_PORT=str(metrics_port),
    )
    try:
        with open_channel(running.address, token=TOKEN) as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(N_IMAGES)), batch_size=10)
        yield {"address": running.address, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        running.stop()


def _app(
    monkeypatch: pytest.MonkeyPatch, address: str, token: str | None = TOKEN, **env: str
) -> AppTest:
    monkeypatch.setenv("ICL_ADDRESS", address)
    if token is None:
        monkeypatch.delenv("ICL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ICL_TOKEN", token)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _search(
    at: AppTest, text: str, thi: bool = False, crop: bytes | None = None, **numbers: float
) -> AppTest:
    at.text_area[0].input(text)
    if crop is not None:
        at.file_uploader[0].set_value(("query.png", crop, "image/png"))
    if thi:
        at.toggle[0].set_value(True)
    for label, value in numbers.items():
        next(n for n in at.number_input if n.label.startswith(label)).set_value(value)
    _click(at, "Search")
    return at


def _click(at: AppTest, label: str | None = None, key: str | None = None) -> AppTest:
    button = at.button(key=key) if key else next(b for b in at.button if b.label == label)
    button.click()
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def _ranked(at: AppTest) -> list[str]:
    """The image ids of the result grid, in rank order."""
    return [str(c.value).split(" · ")[0] for c in at.caption if str(c.value).startswith("p0")]


def test_search_shows_ranked_results_with_crops(stack, monkeypatch) -> None:
    at = _search(_app(monkeypatch, stack["address"]), demo_queries()[0])
    assert any(str(h.value).startswith("10 results for: ") for h in at.subheader)
    ranks = [m.value for m in at.markdown if str(m.value).startswith("**#")]
    assert len(ranks) == 10 and ranks[0].startswith("**#1**")
    assert len(at.get("image")) >= 10  # each result shows its crop (GetImage)
    assert "p00000-" in _texts(at.caption)  # the first identity's crops rank high


def test_thi_search_streams_its_steps(stack, monkeypatch) -> None:
    at = _search(_app(monkeypatch, stack["address"]), demo_queries()[0], thi=True, xi=1.0)
    assert "THI" in _texts(at.subheader)
    assert at.get("progress"), "no candidate's P(Yes) shown"
    assert "MLLM calls" in _texts(at.caption)
    outcome = _texts(at.success) + _texts(at.info)
    assert "found by the MLLM" in outcome or "kept the base ranking" in outcome
    # A rerun (any click elsewhere) redraws the same trace from the session.
    at.run()
    assert at.get("progress") and "MLLM calls" in _texts(at.caption)


def test_confirming_a_result_runs_thi_from_it(stack, monkeypatch) -> None:
    at = _search(_app(monkeypatch, stack["address"]), demo_queries()[0])
    before = _ranked(at)
    chosen = before[2]
    _click(at, key=f"confirm-{chosen}")
    assert f"Anchor: {chosen} (confirmed by the operator)" in _texts(at.success)
    assert "Refined query:" in _texts(at.markdown)
    old = at.dataframe[0].value  # the ranking before, beside the new one
    assert list(old["image"]) == before
    assert any(":green[▲" in str(m.value) or ":red[▼" in str(m.value) for m in at.markdown) or (
        _ranked(at) == before
    )


def test_query_by_example_and_search_with_this_crop(stack, monkeypatch) -> None:
    crop = next(iter(demo_gallery(1))).png  # p00000-0, enrolled
    at = _search(_app(monkeypatch, stack["address"]), "", crop=crop)
    assert _ranked(at)[0] == "p00000-0"  # the same crop is its own best match
    assert any("an example crop" in str(h.value) for h in at.subheader)
    second = _ranked(at)[1]
    _click(at, key=f"example-{second}")
    assert _ranked(at)[0] == second
    # THI needs a description to check candidates against: a crop alone is refused.
    at = _search(_app(monkeypatch, stack["address"]), "", crop=crop, thi=True)
    assert "Not possible for this request (FAILED_PRECONDITION" in _texts(at.error)


def test_one_result_per_track(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"])
    at.checkbox[0].check()  # One result per track
    at = _search(at, demo_queries()[0])
    captions = [str(c.value) for c in at.caption if " · track " in str(c.value)]
    tracks = [c.split(" · track ")[1].split(" ")[0] for c in captions]
    assert tracks and len(tracks) == len(set(tracks))


def test_nothing_found_and_bad_filters(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"])
    next(c for c in at.checkbox if c.label == "Only a time window").check()
    at = _search(at, demo_queries()[0])
    assert "Pick a day" in _texts(at.error)
    at = _app(monkeypatch, stack["address"])
    next(c for c in at.checkbox if c.label == "Only a time window").check()
    at.date_input[0].set_value(datetime(2020, 1, 1).date())  # a day before any capture
    at = _search(at, demo_queries()[0])
    assert "No results" in _texts(at.warning)
    at = _app(monkeypatch, stack["address"])
    next(c for c in at.checkbox if c.label == "Only a time window").check()
    at.date_input[0].set_value(datetime(2026, 1, 5).date())
    next(t for t in at.time_input if t.label == "From").set_value(dtime(18, 0))
    next(t for t in at.time_input if t.label == "To").set_value(dtime(9, 0))
    at = _search(at, demo_queries()[0])
    assert "ends before it starts" in _texts(at.error)


def test_empty_description_is_a_clear_error(stack, monkeypatch) -> None:
    at = _search(_app(monkeypatch, stack["address"]), "")
    assert "The service rejected the request (INVALID_ARGUMENT" in _texts(at.error)


def test_service_down_and_token_refused(stack, monkeypatch) -> None:
    down = _search(_app(monkeypatch, f"127.0.0.1:{free_port()}"), "a man")
    assert "not reachable or not ready" in _texts(down.error)
    refused = _search(_app(monkeypatch, stack["address"], token="wrong-token-0123456789"), "a man")
    message = _texts(refused.error)
    assert "refused the console's token (UNAUTHENTICATED" in message
    assert "wrong-token" not in message


def test_gallery_browsing_pages_and_opens_an_image(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"])
    at.switch_page("views/gallery.py").run()
    assert not at.exception, at.exception
    cameras = {d.camera_id for d in demo_gallery(N_IMAGES)}
    assert f"{N_IMAGES} images from {len(cameras)} cameras" in _texts(at.caption)
    first = list(at.dataframe[0].value["image id"])
    assert len(first) == 20
    _click(at, "Next page")
    second = list(at.dataframe[0].value["image id"])
    assert second and not set(first) & set(second)
    assert len(first) + len(second) >= N_IMAGES - 1  # every image on one of the two pages
    next(s for s in at.selectbox if s.label == "Open an image").set_value(second[0]).run()
    assert any(second[0] in str(m.value) for m in at.markdown)
    assert at.get("image")


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 192), colour).save(out, format="PNG")
    return out.getvalue()


def test_upload_and_delete(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"])
    at.switch_page("views/gallery.py").run()
    at.file_uploader[0].set_value(
        [("red.png", _png((200, 0, 0)), "image/png"), ("broken.png", b"not an image", "image/png")]
    )
    next(t for t in at.text_input if t.label == "Camera id").input("cam-up")
    next(b for b in at.button if b.label == "Enrol").click()
    at.run()
    assert not at.exception, at.exception
    assert "1 of 2 crops enrolled." in _texts(at.warning)
    rows = next(d.value for d in at.dataframe if "result" in d.value.columns)
    assert set(rows["result"]) == {"accepted", "rejected"}
    assert "cam-up-red" in set(rows["image id"])

    at.text_area(key="delete_ids").input("cam-up-red")
    at.run()
    next(b for b in at.button if b.label == "Delete…").click()
    at.run()
    assert "for good?" in _texts(at.warning)  # nothing deleted before the confirmation
    next(b for b in at.button if b.label == "Yes, delete").click()
    at.run()
    assert "Deleted 1 of 1 image(s)." in _texts(at.success)


def test_sightings_follow_the_last_search(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"])
    at.switch_page("views/sightings.py").run()
    assert "Run a search first" in _texts(at.info)
    at.switch_page("views/search.py").run()
    _search(at, demo_queries()[0])
    at.switch_page("views/sightings.py").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert at.get("image")  # the crops of the sightings, in time order
    assert len(table) >= 1 and set(table["camera"]) <= {f"cam-{i:02d}" for i in range(1, 7)}
    assert list(table["time"]) == sorted(table["time"])


def test_status_shows_health_and_metrics(stack, monkeypatch) -> None:
    at = _app(monkeypatch, stack["address"], ICL_METRICS_URL=stack["metrics"])
    at.switch_page("views/status.py").run()
    assert not at.exception, at.exception
    values = {m.label: m.value for m in at.metric}
    assert values[f"PersonSearch at {stack['address']}"] == "SERVING"
    assert values["Triton: text and image encoders"] == "SERVING"
    assert values["Triton: the MLLM (THI)"] == "SERVING"
    assert values["Milvus: the gallery"] == "SERVING"
    assert f"Gallery: {N_IMAGES} images" in _texts(at.subheader)  # the upload test deleted its own
    assert int(values["Gallery images"]) >= N_IMAGES - 1


# --- A real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def console_url(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`icl console` against the module's service, on a free loopback port."""
    from icl.cli.console import console_command, console_env

    port = free_port()
    log = tmp_path_factory.mktemp("console-web") / "console.log"
    env = console_env(stack["address"], TOKEN, metrics_url=stack["metrics"])
    with open(log, "wb") as out:
        proc = subprocess.Popen(console_command(port), env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return proc.poll() is not None  # stop waiting: it died

    try:
        assert wait_until(healthy, 60) and proc.poll() is None, log.read_text()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_browser_runs_a_thi_search_confirms_an_anchor_and_shows_the_sightings(
    console_url, tmp_path
) -> None:
    """Headless Chromium (Debian's, driven by selenium through Debian's chromedriver) loads the
    console, runs a THI search, confirms a result as the person and opens the sightings
    timeline. Screenshots go to tmp_path, or
    to $ICL_SCREENSHOTS when set (the README's pictures are made that way)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("ICL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1300"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(console_url)
        box = wait.until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[aria-label^='Description']"))
        )
        box.send_keys(demo_queries()[0])
        driver.find_element(By.XPATH, "//label[.//p[contains(., 'Re-rank with THI')]]").click()
        xi = driver.find_element(By.CSS_SELECTOR, "input[aria-label^='xi']")
        xi.clear()
        xi.send_keys("1.0", Keys.TAB)  # a number input commits on leaving it
        driver.find_element(By.XPATH, "//button[.//p[text()='Search']]").click()
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(., 'MLLM calls')]")))
        wait.until(ec.presence_of_element_located((By.XPATH, "//p[starts-with(., '#1')]")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "10 results" in page and "THI" in page
        assert "Candidates checked" in page
        driver.save_screenshot(str(shots / "console-search-thi.png"))

        # The operator confirms the third result as the person: THI runs from it.
        def confirm_buttons(driver: Any) -> list[Any]:
            # Streamlit swaps the streamed base grid for the final one: wait for the 10 buttons.
            found = driver.find_elements(By.CSS_SELECTOR, "[class*='st-key-confirm-'] button")
            shown = [b for b in found if b.is_displayed()]
            return shown if len(shown) == 10 else []

        confirm = wait.until(confirm_buttons)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", confirm[2])
        confirm[2].click()
        wait.until(
            ec.presence_of_element_located(
                (By.XPATH, "//*[contains(text(), 'confirmed by the operator')]")
            )
        )
        wait.until(
            ec.presence_of_element_located(
                (By.XPATH, "//*[contains(text(), 'The ranking before the confirmation')]")
            )
        )
        driver.save_screenshot(str(shots / "console-confirmed.png"))

        driver.find_element(By.XPATH, "//a[contains(., 'Sightings')]").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".vega-embed")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "The person confirmed as" in page
        driver.save_screenshot(str(shots / "console-sightings.png"))
    finally:
        driver.quit()
    assert (shots / "console-search-thi.png").stat().st_size > 10_000


def test_bad_settings_are_a_message(monkeypatch, tmp_path) -> None:
    at = _app(monkeypatch, "127.0.0.1:1", ICL_CA_FILE=str(tmp_path / "missing-ca.pem"))
    message = _texts(at.error)
    assert "The console's settings are not valid" in message and "ca_file" in message
