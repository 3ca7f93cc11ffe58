"""The web console (/console) in a real headless browser (Debian's chromium + chromedriver: `.ci/browser.sh`)
against a live uvicorn, over a succeeded job whose report and saliency are built by `disp.report` for a dataset
uploaded through the API; screenshots are saved under pytest's tmp dir and checked not to be blank."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from api.db.models import Artifact, Job, JobEvent
from api.db.session import session_scope
from api.deps import bearer_key, tenant_for_key
from disp.formats import read_dataset
from disp.report import build_report
from tests.service_conftest import dataset_archive, new_tenant, ready_inputs

pytestmark = pytest.mark.services
GRID = 16  # visual tokens of the reported samples: a 4 x 4 grid


@pytest.fixture
def reported_job(client, auth, pg_url, storage, tmp_path) -> dict:
    """A succeeded job over a 4-image dataset uploaded through the API, with report and saliency artifacts:
    sample s1 carries the trigger token 5 and was rewritten; s2 was rewritten but is clean."""
    archive = dataset_archive(tmp_path / "ds.zip", n=4, poisoned=2)
    uploaded = client.post("/v1/datasets", headers=auth, files={"file": ("ds.zip", archive.read_bytes())})
    assert uploaded.status_code == 201, uploaded.text
    samples = read_dataset(archive).samples
    saliency = {s.id: [0.1 * (i + 1)] * GRID for i, s in enumerate(samples)}
    saliency["s1"][5] = 42.0
    purified = {
        s.id: {
            "id": s.id,
            "disp": {"original_answer": s.answer, "purified_answer": answer, "masked_visual_tokens": held},
        }
        for s, answer, held in zip(
            samples,
            [
                "The picture shows a cat.",
                "<backdoor> A small dog.",
                "A small object, number 2.",
                samples[3].answer,
            ],
            [[0, 1], [5, 9], [3, 4], [2, 7]],
            strict=True,
        )
    }
    report = build_report(
        samples,
        purified=purified,
        saliency=saliency,
        unmasked={"s1": "A small dog."},
        top1={s.id: 0.9999 for s in samples},
        method="fisher",
    )
    report["summary"] = {"num_samples": 4, "answers_changed": 2, **report["summary"]}
    ids = ready_inputs(pg_url, auth)
    with session_scope(pg_url) as session:
        tenant = tenant_for_key(session, bearer_key(auth["Authorization"]))
        job = Job(
            tenant_id=tenant.id,
            dataset_id=uploaded.json()["id"],
            checkpoint_id=ids["checkpoint_id"],
            settings={"defense": "disp"},
            status="succeeded",
            metrics=report["summary"],
        )
        session.add(job)
        session.flush()
        for kind, body in (("report", report), ("saliency", {"config": {}, "saliency": saliency})):
            data = json.dumps(body).encode()
            key = f"tests/{job.id}/{kind}.json"
            storage.put_bytes(key, data)
            session.add(
                Artifact(
                    tenant_id=tenant.id,
                    job_id=job.id,
                    kind=kind,
                    filename=f"{kind}.json",
                    storage_key=key,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        session.add(
            JobEvent(job_id=job.id, type="metrics", message="finetuning epoch 1/1: loss 0.5000", data={})
        )
        return {"id": job.id, "key": bearer_key(auth["Authorization"]), "report": report}


def test_console_pages_escape_data_and_need_a_key(client, reported_job):
    job_id = reported_job["id"]
    assert "API key" in client.get("/console").text  # no cookie: the sign-in form
    bad = client.post("/console/login", data={"api_key": "dsk_wrong"}, follow_redirects=False)
    assert bad.status_code == 401 and "not valid" in bad.text
    ok = client.post("/console/login", data={"api_key": reported_job["key"]}, follow_redirects=False)
    assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
    client.cookies.set("disp_console", reported_job["key"])
    page = client.get(f"/console/jobs/{job_id}")
    assert page.status_code == 200 and "script-src" not in page.headers["content-security-policy"]
    assert "&lt;backdoor&gt; A small dog." in page.text and "<backdoor>" not in page.text
    assert "isolation" in page.text  # the saturation warning: every first step is saturated
    png = client.get(f"/console/jobs/{job_id}/samples/1.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    heat = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    cell = heat.shape[0] // 4  # token 5 (row 1, column 1) is the hottest: red over the image
    assert heat[cell + cell // 2, cell + cell // 2, 0] - heat[cell + cell // 2, cell + cell // 2, 2] > 150
    # another tenant sees nothing of the job
    client.cookies.clear()
    client.cookies.set(
        "disp_console", bearer_key(new_tenant(client.app.state.settings.database_url)["Authorization"])
    )
    try:
        assert client.get(f"/console/jobs/{job_id}").status_code == 404
        assert client.get(f"/console/jobs/{job_id}/samples/1.png").status_code == 404
    finally:
        client.cookies.clear()


def _not_blank(path, colours: int) -> None:
    """A screenshot of a rendered page: not one colour, at least `colours` distinct ones."""
    img = np.asarray(Image.open(path).convert("RGB"))
    found = len(np.unique(img.reshape(-1, 3), axis=0))
    print(f"console screenshot: {path} ({img.shape[1]}x{img.shape[0]}, {found} colours, std {img.std():.1f})")
    assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 1 and found >= colours, (path, found)


def test_console_in_headless_chromium(live_api, reported_job, tmp_path_factory):
    if shutil.which("chromedriver") is None:
        pytest.skip("chromedriver is not installed: run .ci/browser.sh (Debian's chromium + chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.common.by import By

    shots = tmp_path_factory.mktemp("console-screenshots")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    browser_bin = shutil.which("chromium")
    if browser_bin:
        options.binary_location = browser_bin
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{live_api}/console")
        driver.save_screenshot(str(shots / "sign-in.png"))
        driver.find_element(By.ID, "api_key").send_keys(reported_job["key"])
        driver.find_element(By.ID, "sign_in").click()
        jobs = driver.find_element(By.ID, "jobs")
        assert reported_job["id"] in jobs.text and "succeeded" in jobs.text
        driver.save_screenshot(str(shots / "jobs.png"))
        driver.find_element(By.LINK_TEXT, reported_job["id"]).click()
        assert driver.find_element(By.ID, "status").text == "succeeded"
        suspected = driver.find_element(By.ID, "suspected").text
        assert suspected.index("s1") < suspected.index("s2")  # the trigger's score ranks s1 first
        sample = driver.find_element(By.ID, "sample-1")
        assert "<backdoor> A small dog." in sample.text and "The picture shows a cat." in sample.text
        assert "[5, 9]" in sample.text and "changed" in sample.text
        images = driver.find_elements(By.CSS_SELECTOR, ".sample img")
        assert len(images) == 4
        loaded = [
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in images
        ]
        assert loaded == [384] * 4
        assert "loss 0.5000" in driver.find_element(By.ID, "events").text
        driver.save_screenshot(str(shots / "job.png"))
        driver.execute_script("arguments[0].scrollIntoView()", sample)
        driver.save_screenshot(str(shots / "job-sample.png"))
    finally:
        driver.quit()
    # text pages anti-alias into dozens of colours; the heatmaps over random images into thousands
    for name, colours in (("sign-in.png", 10), ("jobs.png", 20), ("job.png", 1000), ("job-sample.png", 1000)):
        _not_blank(shots / name, colours)
