"""`rep-medsam app`: the server's guards over HTTP, and the page in a real headless browser
(Debian's chromium driven by Selenium) whose saved masks must equal `rep-medsam predict`'s on
the same boxes."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from input_pipeline.phantoms import make_case_2d, make_case_3d  # noqa: E402
from rep_medsam_jax.cli import main  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The NIfTI's affine is LPS-aligned, so stored voxel indices (i, j, k) are the (x, y, z) of
# the (D, H, W) array the page shows: the page's boxes are predict's --box values as they are.
LPS_AFFINE = np.diag([-0.8, -0.8, 2.0, 1.0])


# predict and the segmenter both encode one slice per call (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("predict_encodes_one_slice_per_call")


@pytest.fixture(scope="module")
def app_data(tmp_path_factory):
    import cv2
    import nibabel as nib

    folder = tmp_path_factory.mktemp("app_data")
    rng = np.random.default_rng(31)
    volume = make_case_3d(rng, "CT", (12, 96, 112)).imgs                 # (D, H, W) uint8
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.int16), LPS_AFFINE),
             folder / "volume.nii.gz")
    image = make_case_2d(rng, "Endoscopy", (90, 120)).imgs
    cv2.imwrite(str(folder / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes((folder / "photo.png").read_bytes())
    (folder / "link.png").symlink_to(outside / "secret.png")
    return folder, outside


@pytest.fixture(scope="module")
def running_app(tiny_export_dir, app_data):
    from rep_medsam_jax.app.launch import start_in_thread
    from rep_medsam_jax.predictor.segmenter import Segmenter

    segmenter = Segmenter(tiny_export_dir, idle_s=0.1)
    app = start_in_thread(segmenter, [app_data[0]], max_upload=1 << 20)
    yield app
    app.stop()
    segmenter.close()


def _call(app, path: str, body=None, raw: bytes | None = None, token: str | None = "good"):
    headers = {} if token is None else {"X-Token": app.token if token == "good" else token}
    data = raw
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(app.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_every_request_needs_the_token(running_app):
    status, body = _call(running_app, "/api/files")
    assert status == 200
    names = {f["name"] for f in json.loads(body)["files"]}
    assert {"corrupt.png", "photo.png", "volume.nii.gz"} <= names
    assert "link.png" not in names                                # a link leading out
    for token in (None, "wrong", running_app.token[:-1]):
        status, body = _call(running_app, "/api/files", token=token)
        assert status == 403 and b"token" in body
    assert _call(running_app, "/", token=None)[0] == 403
    assert _call(running_app, "/static/app.js", token=None)[0] == 403
    status, page = _call(running_app, f"/?token={running_app.token}", token=None)
    assert status == 200 and b"app.js" in page
    assert b"http://" not in page and b"https://" not in page      # nothing from elsewhere


def test_only_launch_folders_are_readable(running_app, app_data):
    folder, outside = app_data
    for path in ("/etc/passwd", str(outside / "secret.png"), "../outside/secret.png",
                 str(folder / ".." / outside.name / "secret.png"), "link.png"):
        status, body = _call(running_app, "/api/open", {"path": path})
        assert status == 403, (path, body)
        assert b"outside the folders" in body
    assert _call(running_app, "/static/..%2Fserver.py")[0] == 404
    status, body = _call(running_app, "/api/open", {"path": str(folder / "photo.png")})
    assert status == 200 and json.loads(body)["width"] == 120


def test_bad_uploads_give_a_message_and_the_server_goes_on(running_app, app_data):
    import cv2

    folder, _ = app_data
    status, body = _call(running_app, "/api/upload?name=corrupt.png",
                         raw=(folder / "corrupt.png").read_bytes())
    assert status == 400
    message = json.loads(body)["error"]
    assert message.startswith("corrupt.png: cannot decode") and "rep_medsam_app" not in message
    # Over the limit (1 MiB here): refused from its declared length, before it is read.
    connection = http.client.HTTPConnection(running_app.url.split("//")[1], timeout=60)
    connection.putrequest("POST", "/api/upload?name=big.png")
    connection.putheader("X-Token", running_app.token)
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders(b"0" * 1024)
    response = connection.getresponse()
    assert response.status == 413 and b"upload limit" in response.read()
    connection.close()
    assert _call(running_app, "/api/upload?name=notes.txt", raw=b"x")[0] == 400
    status, body = _call(running_app, "/api/upload?name=photo.png",
                         raw=(folder / "photo.png").read_bytes())
    assert status == 200
    doc = json.loads(body)
    assert doc["uploaded"] and doc["formats"] == ["png", "npz"]
    # A failed inference request (a box off the image) is an error message, nothing more.
    status, body = _call(running_app, f"/api/doc/{doc['id']}/box",
                         {"z": 0, "label": 1, "box": [0, 0, 500, 20]})
    assert status == 400 and b"outside" in body
    status, _ = _call(running_app, f"/api/doc/{doc['id']}/box",
                      {"z": 0, "label": 1, "box": [10, 10, 60, 50]})
    assert status == 200
    status, body = _call(running_app, f"/api/doc/{doc['id']}/save", {"format": "png"})
    assert status == 400 and b"download" in body            # no folder beside an upload
    status, body = _call(running_app, f"/api/doc/{doc['id']}/save",
                         {"format": "png", "download": True})
    assert status == 200
    shown = _call(running_app, f"/api/doc/{doc['id']}/labels/0.png")[1]
    np.testing.assert_array_equal(*(cv2.imdecode(np.frombuffer(png, np.uint8),
                                                 cv2.IMREAD_UNCHANGED) for png in (body, shown)))


def test_undo_and_delete(running_app, app_data):
    import cv2

    folder, _ = app_data
    doc = json.loads(_call(running_app, "/api/open", {"path": str(folder / "photo.png")})[1])

    def labels() -> np.ndarray:
        status, png = _call(running_app, f"/api/doc/{doc['id']}/labels/0.png")
        assert status == 200
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)

    for label, box in ((1, [5, 5, 100, 80]), (2, [30, 20, 90, 70])):
        assert _call(running_app, f"/api/doc/{doc['id']}/box",
                     {"z": 0, "label": label, "box": box})[0] == 200
    both = labels()
    assert _call(running_app, f"/api/doc/{doc['id']}/delete", {"label": 2, "z": 0})[0] == 200
    assert not (labels() == 2).any()
    assert _call(running_app, f"/api/doc/{doc['id']}/undo", {})[0] == 200
    np.testing.assert_array_equal(labels(), both)
    _call(running_app, f"/api/doc/{doc['id']}/undo", {})
    _call(running_app, f"/api/doc/{doc['id']}/undo", {})
    assert not labels().any()


def test_challenge_npz_volume_through_the_api_equals_predict(running_app, app_data,
                                                            tiny_export_dir, tmp_path):
    """A 3D challenge npz: a box, a propagation followed to its end, saved as npz beside the
    input: predict's segs for the same 3D box."""
    import time

    folder, _ = app_data
    volume = make_case_3d(np.random.default_rng(32), "MR", (9, 64, 80)).imgs
    case = folder / "3DBox_MR_app.npz"
    np.savez(case, imgs=volume, boxes=np.array([[0, 0, 0, 1, 1, 1]]))
    doc = json.loads(_call(running_app, "/api/open", {"path": str(case)})[1])
    assert doc["is_3d"] and doc["depth"] == 9 and doc["formats"] == ["npz"]
    body = {"label": 1, "box": [12, 10, 60, 50], "z0": 1, "z1": 7}
    status, answer = _call(running_app, f"/api/doc/{doc['id']}/propagate", body)
    assert status == 200
    job = json.loads(answer)["job"]
    for _ in range(600):
        state = json.loads(_call(running_app, f"/api/jobs/{job}")[1])
        if state["state"] != "running":
            break
        time.sleep(0.05)
    assert state["state"] == "done" and state["done"] == state["total"] == 14
    status, answer = _call(running_app, f"/api/doc/{doc['id']}/save", {"format": "npz"})
    saved = Path(json.loads(answer)["path"])
    assert saved == folder / "3DBox_MR_app_seg.npz"
    expected = _predict(tmp_path, case, tiny_export_dir, [[12, 10, 1, 60, 50, 7]])
    got = np.load(saved)["segs"]
    np.testing.assert_array_equal(got, np.load(expected)["segs"])
    assert got[1:8].any() and not got[[0, 8]].any()


class GatedBackend:
    """A real backend whose encoder waits for a gate: a propagation stays in flight until the
    test opens it."""

    def __init__(self, backend):
        import threading

        self._backend, self.image_size, self.gate = backend, backend.image_size, \
            threading.Event()

    def encode(self, images):
        assert self.gate.wait(60)
        return self._backend.encode(images)

    def decode(self, embedding, boxes):
        return self._backend.decode(embedding, boxes)


def test_a_cancelled_propagation_changes_nothing(tiny_export_dir, app_data):
    import time

    from rep_medsam_jax.app.launch import start_in_thread
    from rep_medsam_jax.predictor.backend import open_backend
    from rep_medsam_jax.predictor.segmenter import Segmenter

    folder, _ = app_data
    backend = GatedBackend(open_backend(tiny_export_dir, "onnx"))
    app = start_in_thread(Segmenter(backend, prefetch=0), [folder])
    try:
        doc = json.loads(_call(app, "/api/open", {"path": str(folder / "volume.nii.gz")})[1])
        answer = _call(app, f"/api/doc/{doc['id']}/propagate",
                       {"label": 1, "box": [10, 10, 60, 60], "z0": 2, "z1": 8})[1]
        job = json.loads(answer)["job"]
        assert json.loads(_call(app, f"/api/jobs/{job}")[1])["state"] == "running"
        assert _call(app, f"/api/jobs/{job}/cancel", {})[0] == 200
        backend.gate.set()
        for _ in range(600):
            state = json.loads(_call(app, f"/api/jobs/{job}")[1])
            if state["state"] != "running":
                break
            time.sleep(0.05)
        assert state["state"] == "cancelled"
        info = json.loads(_call(app, f"/api/doc/{doc['id']}")[1])
        assert info["labels"] == [] and not info["can_undo"]
        status, _ = _call(app, f"/api/doc/{doc['id']}/box",
                          {"z": 4, "label": 1, "box": [10, 10, 60, 60]})
        assert status == 200                                  # and the app goes on
    finally:
        backend.gate.set()
        app.stop()


# --------------------------------------------------------------------------------------------
# The page in a browser
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium / chromedriver on this machine: install the Debian packages "
                    "chromium and chromium-driver (.ci/run does) to run the browser test")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,860", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The app's page in the browser, driven as a person would: clicks, drags, keys."""

    def __init__(self, driver, app):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.app = driver, app
        self.wait = WebDriverWait(driver, 30, poll_frequency=0.05)
        driver.get(f"{app.url}/?token={app.token}")
        self.wait.until(lambda d: d.find_elements("css selector", "#files li"))

    def state(self, expression: str):
        return self.driver.execute_script(f"return window.appState.{expression};")

    def settled(self) -> None:
        self.wait.until(lambda d: self.state("busy") == 0)

    def message(self) -> str:
        return self.state("message")

    def until_message(self, text: str) -> str:
        self.wait.until(lambda d: text in self.message())
        return self.message()

    def open(self, name: str) -> None:
        self.driver.find_element("css selector", f"#files li[title$='{name}']").click()
        self.until_message("Drag a box")
        self.settled()

    def keys(self, *keys) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(*keys).perform()
        self.settled()

    def go_to_slice(self, z: int) -> None:
        from selenium.webdriver.common.keys import Keys

        while self.state("z") != z:
            self.keys(Keys.ARROW_UP if self.state("z") < z else Keys.ARROW_DOWN)
        self.settled()

    def draw_box(self, box) -> list[int]:
        """Drag the mouse over the canvas from (x0, y0) to (x1, y1) in image pixels; returns
        the box the page sent."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.driver.find_element("id", "view")
        scale = self.state("scale")
        width, height = canvas.size["width"], canvas.size["height"]

        def offset(x, y):      # Selenium offsets count from the element's centre
            return round(x * scale - width / 2), round(y * scale - height / 2)

        start, end = offset(*box[:2]), offset(*box[2:])
        # The page answers a box asynchronously; clear the message first so that waiting for
        # "score" waits for this box's answer, not the previous one's.
        self.driver.execute_script("window.appState.message = '';")
        (ActionChains(self.driver).move_to_element_with_offset(canvas, *start).click_and_hold()
         .move_to_element_with_offset(canvas, *end).release().perform())
        self.until_message("score")
        self.settled()
        sent = self.state("lastBox.box")
        assert np.abs(np.array(sent) - np.array(box)).max() <= 1.5, (sent, box)
        return [int(v) for v in sent]


def _screenshot(driver, name: str, tmp_path: Path) -> None:
    """Into $APP_SCREENSHOT_DIR (docs/ when the docs' pictures are remade), else tmp_path."""
    folder = Path(os.environ.get("APP_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))


def _predict(tmp_path: Path, case: Path, export_dir: Path, boxes) -> Path:
    """`rep-medsam predict` on one case file with these boxes -> the written label map."""
    out = tmp_path / f"predict_{case.name}"
    args = ["predict", "-i", str(case), "-o", str(out), "--model", str(export_dir), "-q"]
    for box in boxes:
        args += ["--box", " ".join(str(v) for v in box)]
    assert main(args) == 0
    return next(out.iterdir())


def test_page_draw_propagate_save_equals_predict(browser, running_app, app_data,
                                                 tiny_export_dir, tmp_path):
    import cv2
    import nibabel as nib

    folder, _ = app_data
    page = Page(browser, running_app)

    # A volume: a box on slice 5 propagated 3 slices each way (label 1), a second object
    # (label 2) boxed on slice 7 and propagated, then saved beside the input as NIfTI.
    page.open("volume.nii.gz")
    extent = browser.find_element("id", "extent")
    extent.clear()
    extent.send_keys("3")
    browser.find_element("id", "view").click()               # focus back on the page
    boxes_3d = []
    for label, z, box in ((1, 5, (20, 18, 70, 60)), (2, 7, (50, 40, 100, 85))):
        page.keys(str(label))
        page.go_to_slice(z)
        sent = page.draw_box(box)
        page.keys("p")
        page.until_message("propagation done")
        boxes_3d.append([sent[0], sent[1], z - 3, sent[2], sent[3], z + 3])
    page.go_to_slice(6)
    _screenshot(browser, "app_3d.png", tmp_path)
    browser.find_element("id", "save").click()
    saved = Path(page.until_message("saved ").split("saved ", 1)[1])
    assert saved == folder / "volume_seg.nii.gz"

    expected = _predict(tmp_path, folder / "volume.nii.gz", tiny_export_dir, boxes_3d)
    got, want = nib.load(saved), nib.load(expected)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    np.testing.assert_array_equal(got.affine, want.affine)
    values = np.asarray(got.dataobj)
    assert set(np.unique(values)) == {0, 1, 2}                # both objects, not vacuous
    assert not values[..., :2].any() and not values[..., 11].any()   # only their slices

    # A corrupt upload: a message in the page, and the page goes on working.
    browser.find_element("id", "upload").send_keys(str(folder / "corrupt.png"))
    assert page.until_message("cannot decode").startswith("corrupt.png: ")
    assert browser.find_element("id", "message").get_attribute("class") == "error"

    # A PNG: two boxes, labels 1 and 2 (the second drawn after pressing N), saved as PNG.
    page.open("photo.png")
    first = page.draw_box((8, 10, 80, 70))
    page.keys("n")
    assert page.state("label") == 2
    second = page.draw_box((40, 30, 115, 85))
    _screenshot(browser, "app_2d.png", tmp_path)
    page.keys("s")
    saved = Path(page.until_message("saved ").split("saved ", 1)[1])
    assert saved == folder / "photo_seg.png"
    expected = _predict(tmp_path, folder / "photo.png", tiny_export_dir, [first, second])
    got = cv2.imread(str(saved), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(got, cv2.imread(str(expected), cv2.IMREAD_UNCHANGED))
    assert set(np.unique(got)) == {0, 1, 2}
