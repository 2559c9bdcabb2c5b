"""The inspection service as it runs on the line (slow): `urd serve` on real uvicorn with the ledger
on SQLite and on a real PostgreSQL server started here, `urd inspect` against it, kill -9 during a
load run, the database stopped under it, the review page in headless Chromium, and a registry
promotion whose challenge set fails.

The PostgreSQL and browser tests need Debian's `postgresql`, `chromium` and `chromium-driver`
(`.ci/run` installs them). Without them these tests are skipped, unless URD_REQUIRE_LIVE=1 (set by
CI), where a missing part is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from urd.inference import Predictor
from urd.service.ledger import Inspection, ModelEvent, Verdict

from .test_service import TOKENS, auth, test_files, tokens  # noqa: F401 - tokens is a fixture

pytestmark = pytest.mark.slow
# Debian's server binaries (the newest installed major version); URD_PG_BIN overrides
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
             default=Path("/usr/lib/postgresql/15/bin"))
REQUIRE = os.environ.get("URD_REQUIRE_LIVE") == "1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def missing(what: str) -> None:
    if REQUIRE:
        pytest.fail(f"{what} (URD_REQUIRE_LIVE=1: CI installs it in .ci/run)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the postgres user when we are root)."""

    def __init__(self) -> None:
        pg_bin = Path(os.environ.get("URD_PG_BIN", PG_BIN))
        if not (pg_bin / "initdb").is_file():
            missing(f"PostgreSQL server binaries not found in {pg_bin} (apt-get install postgresql)")
        self.bin = pg_bin
        # pytest's tmp folders are private to root; the server's own user must own its folder
        self.dir = Path(tempfile.mkdtemp(prefix="urd-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "urd", "--auth=trust", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}\n{done.stderr}"

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def database(self, name: str) -> str:
        with create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT").connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://urd@127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres").database(f"ledger_{tmp_path.name.lower().replace('-', '_')}")


def token_env() -> dict[str, str]:
    return {f"URD_TOKENS_{role.upper()}": f"{role}-1:{token}" for role, token in TOKENS.items()}


class Server:
    """`urd serve` in its own process on a free port, with the tiny widget bundle."""

    def __init__(self, project: Path, bundle: Path, ledger: str) -> None:
        self.project, self.bundle, self.ledger = project, bundle, ledger
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = project / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        env = os.environ | token_env() | {"URD_THREADS": "1"}
        command = [sys.executable, "-m", "urd", "serve", "--params", str(self.project / "params.yaml"), "--bundle", f"widget={self.bundle}",
                   "--ledger", self.ledger, "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=self.project, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"urd serve exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"urd serve did not get ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture()
def project(packaged, tmp_path):
    """A copy of the tiny project (params + bundle) the service runs in."""
    shutil.copy2(packaged / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(packaged / "bundle", tmp_path / "bundle")
    return tmp_path


@pytest.fixture()
def server(project, ledger_url):
    s = Server(project, project / "bundle", ledger_url).start()
    yield s
    s.stop()


def rows(url: str, table=Inspection) -> list:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(table)))
    finally:
        engine.dispose()


def test_inspect_cli_against_the_live_service_equals_predict(server, packaged, project):
    files = test_files(packaged)
    out = project / "inspections.csv"
    env = os.environ | {"URD_TOKEN": TOKENS["line"]}
    done = subprocess.run([sys.executable, "-m", "urd", "inspect", *map(str, files), "--server", server.url, "--category", "widget",
                           "--line", "L1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(out)
    expected = {p.path: p for p in Predictor(project / "bundle").predict(files)}
    assert len(table) == len(files)
    for row in table.itertuples():
        assert row.score == pytest.approx(expected[row.path].score, abs=1e-5)
        assert row.decision == expected[row.path].decision
    recorded = {r.id: r for r in rows(server.ledger)}
    assert set(table["id"]) == set(recorded) and all(r.line == "L1" and r.model_version == "local" for r in recorded.values())


def test_kill_9_during_a_load_run_loses_no_answered_record(server, packaged):
    data = [f.read_bytes() for f in test_files(packaged)]
    answered: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, headers=auth("line"), timeout=10) as http:
            i = k
            while not stop.is_set():
                try:
                    r = http.post("/v1/inspect/widget", content=data[i % len(data)], params={"part_id": f"c{k}-{i}"})
                except httpx.TransportError:
                    return  # the service is gone
                if r.status_code == 200:
                    answered.append(r.json()["id"])
                else:
                    refused.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # mid-run: requests in flight, batches being scored and recorded
    stop.set()
    for t in threads:
        t.join(30)
    assert len(answered) >= 40, f"only {len(answered)} answers before the deadline ({refused[:5]})"
    assert set(refused) <= {503}, refused[:10]
    recorded = {r.id for r in rows(server.ledger)}
    lost = set(answered) - recorded
    assert not lost, f"{len(lost)} of {len(answered)} answered inspections are not in the ledger"

    server.start()  # the same ledger and store, after a crash
    r = httpx.post(f"{server.url}/v1/inspect/widget", content=data[0], headers=auth("line"), timeout=30)
    assert r.status_code == 200 and len(rows(server.ledger)) == len(recorded) + 1


def test_a_stopped_postgresql_answers_503_and_the_service_recovers(postgres, project, packaged):
    url = postgres.database("ledger_outage")
    server = Server(project, project / "bundle", url).start()
    image = test_files(packaged)[0].read_bytes()
    try:
        with httpx.Client(base_url=server.url, headers=auth("line"), timeout=30) as http:
            assert http.post("/v1/inspect/widget", content=image).status_code == 200
            postgres.stop()
            try:
                down = http.post("/v1/inspect/widget", content=image)
                assert down.status_code == 503 and "Retry-After" in down.headers and "nothing was recorded" in down.text, down.text
                ready = http.get("/readyz")
                assert ready.status_code == 503 and "ledger" in ready.json()["problems"]
                assert http.get("/healthz").status_code == 200  # the process itself is fine
            finally:
                postgres.start()
            deadline = time.monotonic() + 30
            while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            again = http.post("/v1/inspect/widget", content=image)
            assert again.status_code == 200, again.text
        assert len(rows(url)) == 2  # the refused request left nothing behind
    finally:
        server.stop()


@pytest.fixture()
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing("Chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    web = webdriver.Chrome(service=DriverService(driver), options=options)
    yield web
    web.quit()


def test_review_page_in_a_real_browser_by_click_and_by_key(project, packaged, browser, tmp_path):
    from selenium.common.exceptions import JavascriptException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    server = Server(project, project / "bundle", url).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            # thresholds low enough that every part is flagged: the queue then has parts to review
            assert http.put("/v1/admin/thresholds/widget", json={"review_threshold": -1e9, "image_threshold": 1e9, "note": "browser test"},
                            headers=auth("admin")).status_code == 200
            ids = [http.post("/v1/inspect/widget", content=f.read_bytes(), params={"part_id": f.stem}, headers=auth("line")).json()["id"]
                   for f in test_files(packaged)[:3]]
        # each verdict is a form post, so the page is replaced under the test: card ids are read in one
        # script call (no element handle that a reload can make stale), and the wait rides over a reload
        wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException, JavascriptException))

        def card_ids(b):  # None until the page (and its keyboard script) has loaded
            return b.execute_script("return document.readyState === 'complete' ? "
                                    "Array.from(document.querySelectorAll('.card[data-id]'), c => c.dataset.id) : null")

        browser.get(f"{server.url}/review")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(TOKENS["reviewer"])
        browser.find_element(By.ID, "sign-in").click()
        assert wait.until(card_ids) == ids[::-1]  # newest first
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "review_page.png"))

        first = ids[-1]
        browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{first}"] form button.good').click()
        wait.until(lambda b: card_ids(b) == ids[1::-1])

        second = ids[1]
        browser.find_element(By.TAG_NAME, "body").send_keys("d")  # the keyboard shortcut on the focused card
        wait.until(lambda b: card_ids(b) == [ids[0]])

        verdicts = {v.inspection_id: (v.verdict, v.reviewer) for v in rows(url, Verdict)}
        assert verdicts == {first: ("good", "reviewer-1"), second: ("defect", "reviewer-1")}
        browser.get(f"{server.url}/review/dashboard/widget")
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "widget on" in body and "good 1, defect 1" in body
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    finally:
        server.stop()


def test_a_promotion_failing_its_challenge_set_leaves_the_old_version_serving(packaged, tmp_path, mlflow_store, tokens):
    """The registry path in-process: `production` moves to a version whose challenge set was tampered
    with; the service refuses it, keeps serving the old version and records why."""
    from fastapi.testclient import TestClient
    from mlflow import MlflowClient

    import mlflow
    from pipeline.registry import register_bundle
    from urd.config import ServeParams
    from urd.service.app import ServiceConfig, create_app
    from urd.service.models import RegistrySource

    good = packaged / "bundle"
    bad = tmp_path / "tampered"
    shutil.copytree(good, bad)
    challenge = json.loads((bad / "challenge.json").read_text())
    for entry in challenge["images"]:
        entry["scores"]["onnx"] += 0.5
    (bad / "challenge.json").write_text(json.dumps(challenge))

    mlflow.set_experiment("urd-demo")
    with mlflow.start_run():
        v1 = register_bundle(good, "demo", "widget", {})
    with mlflow.start_run():
        v2 = register_bundle(bad, "demo", "widget", {})
    registry = MlflowClient()
    v1, v2 = str(v1.version), str(v2.version)
    registry.set_registered_model_alias("urd-demo-widget", "production", v1)

    s = ServeParams(ledger=f"sqlite:///{tmp_path / 'ledger.db'}", image_store=str(tmp_path / "images"), tokens=str(tmp_path / "t.json"))
    app = create_app(ServiceConfig(["widget"], RegistrySource("demo", "production", tmp_path / "cache"), s, poll=False))
    image = test_files(packaged)[0].read_bytes()
    with TestClient(app) as client:
        assert client.get("/readyz").json()["models"]["widget"]["model_version"] == v1
        registry.set_registered_model_alias("urd-demo-widget", "production", v2)  # the promotion
        assert client.post("/v1/admin/reload", headers=auth("admin")).json() == {"widget": "refused"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["widget"]["model_version"] == v1
        assert f"version {v2} failed its challenge set" in ready.json()["problems"]["widget"]
        answer = client.post("/v1/inspect/widget", content=image, headers=auth("line")).json()
        assert answer["model"]["version"] == v1 and answer["model"]["alias"] == "production"

        registry.set_registered_model_alias("urd-demo-widget", "production", v1)  # the rollback clears the problem
        assert client.post("/v1/admin/reload", headers=auth("admin")).json() == {"widget": "unchanged"}
    events = [(e.event, e.model_version) for e in rows(s.ledger, ModelEvent)]
    assert events == [("serving", v1), ("refused", v2)]
