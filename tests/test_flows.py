"""Prefect flows (pipeline/flows.py): the process runner, and - slow - the factory loop on a real
`prefect server`: work-pool fan-out over two workers with a DVC remote and an MLflow server, the
served nightly deployment, bad data in one category. Every server and worker is bound to
127.0.0.1 on a free port and stopped at the end."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import psutil
import pytest
import yaml

from pipeline.flows import require_server, stages_ran
from pipeline.process import StageFailed, failure_summary, run_logged
from pipeline.layout import STAGE_PARAMS, stage_params
from urd.config import Params, RetrainParams, parse_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def test_run_logged_streams_lines_and_kills_the_whole_process_group_at_the_timeout(tmp_path):
    seen = []
    assert run_logged(["sh", "-c", "echo one; echo two"], tmp_path, 30, log=seen.append) == "one\ntwo\n" and seen == ["one", "two"]
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timeout of 2 s") as failed:
        run_logged(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], tmp_path, 2, log=lambda line: None)
    assert time.monotonic() - started < 30 and not failed.value.transient
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's own child survived the timeout"


def test_failures_say_whether_a_retry_can_help_and_keep_the_stage_error():
    output = ("Running stage 'validate@tiles':\n> python -m pipeline validate --category tiles\n"
              "error in validate for tiles: Data validation failed for category 'tiles':\n"
              "  - 1 file(s) break 'check_readable' (the file exists and decodes): data/raw/demo/tiles/train/good/003.png. Fix: replace it.\n"
              "Nothing downstream was run.\nERROR: failed to reproduce 'validate@tiles': exited with 1\n")
    summary = failure_summary(output)
    assert summary.startswith("error in validate for tiles") and "003.png" in summary and "ERROR: failed to reproduce" in summary
    with pytest.raises(StageFailed) as bad_data:
        run_logged(["sh", "-c", f"printf %s {json.dumps(output)}; exit 1"], ".", 30, log=lambda line: None)
    assert not bad_data.value.transient and "003.png" in str(bad_data.value)
    with pytest.raises(StageFailed) as locked:
        run_logged(["sh", "-c", "echo 'ERROR: Unable to acquire lock. Most likely another DVC process is running'; exit 1"], ".", 30, log=lambda line: None)
    assert locked.value.transient
    assert stages_ran(output + "Running stage 'train@widget':\n") == ["validate@tiles", "train@widget"]


def test_an_override_changes_only_that_categorys_stage_params():
    base = parse_params({"dataset": {"categories": ["tiles", "widget"]}})
    tweaked = parse_params({"dataset": {"categories": ["tiles", "widget"]}, "overrides": {"widget": {"train": {"iterations": 7}}}})
    for stage in STAGE_PARAMS:
        assert stage_params(base, "tiles", stage) == stage_params(tweaked, "tiles", stage)
        assert (stage_params(base, "widget", stage) == stage_params(tweaked, "widget", stage)) == (stage != "train")
    assert stage_params(tweaked, "widget", "train")["train"]["iterations"] == 7
    fg = parse_params({"synthesis": {"foreground": {"widget": "otsu"}}})
    assert stage_params(fg, "widget", "prepare")["synthesis.foreground.widget"] == "otsu"
    assert stage_params(fg, "tiles", "prepare")["synthesis.foreground.tiles"] is None


def test_prefect_yaml_schedules_what_params_yaml_schedules():
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert set(deployments) == {"retrain", "train-category", "monitor", "respond"}
    schedule = deployments["retrain"]["schedules"][0]
    params = Params.model_validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert (schedule["cron"], schedule["timezone"]) == (params.retrain.cron, params.retrain.timezone) == (RetrainParams().cron, "UTC")
    assert deployments["retrain"]["entrypoint"] == "pipeline/flows.py:retrain" and deployments["train-category"]["entrypoint"] == "pipeline/fanout.py:build_category"
    # the drift loop: the monitor's interval is the one its false-alarm budget is split over, and the
    # respond trigger is the one `python -m pipeline serve` declares
    from pipeline.loop import respond_trigger
    from urd.config import MonitorParams

    assert deployments["monitor"]["schedules"][0]["interval"] == params.monitor.every_minutes * 60 == MonitorParams().every_minutes * 60
    assert deployments["monitor"]["entrypoint"] == "pipeline/loop.py:monitor" and deployments["respond"]["entrypoint"] == "pipeline/loop.py:respond"
    [declared] = deployments["respond"]["triggers"]
    served = respond_trigger()
    assert declared["match"] == served.match.model_dump() and set(declared["expect"]) == served.expect
    assert declared["parameters"] == served.parameters


def test_serve_refuses_to_start_without_a_server(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(RuntimeError, match="prefect server start"):
        require_server()
    with pytest.raises(Exception, match="5 fields"):
        parse_params({"retrain": {"cron": "nightly"}})


# ---------------------------------------------------------------------------------------- slow

TINY = {
    "seed": 0,
    # a random resnet18 trains in a fraction of the pretrained default's time; these tests check orchestration, not quality
    "model": {"backbone": "resnet18", "weights": "none"},
    "dataset": {"categories": ["tiles", "widget"], "image_size": 64, "min_train_images": 4},
    "train": {"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "num_workers": 0},
    "synthesis": {"foreground": {"widget": "otsu"}},
    "evaluate": {"gallery_size": 1},
    "package": {"formats": ["onnx"]},
    # every candidate clears the floors, except where an override raises one
    "promote": {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_aupro": 0.0, "max_regression": 1.0},
    "retrain": {"retries": 0},
    "overrides": {"widget": {"promote": {"min_image_auroc": 1.5}}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if opener.open(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {seconds} s:\n{log.read_text()[-3000:]}")


class Processes:
    """Background processes in their own groups, each logging to a file; all stopped at close."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.procs = folder, env, []

    def start(self, name: str, cmd: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env | env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=ci@urd", "-c", "user.name=ci", *args], cwd=cwd, check=True, capture_output=True)


def _checkout(dest: Path, remote: Path) -> Path:
    """A git repository with this project's files, tiny params and a DVC remote folder."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes((REPO / f).read_bytes())
    (dest / ".dvc" / "config").write_text(f"[core]\n    analytics = false\n    remote = storage\n['remote \"storage\"']\n    url = {remote}\n")
    (dest / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump(mode="json")))
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "tiny factory")
    return dest


def readme_mlflow_line(folder: Path, port: int) -> str:
    """The README's `mlflow server` command with its folder, port and interface (loopback) swapped."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if "mlflow server --host" in line)
    assert "--workers 1" in line and "--allowed-hosts" in line and "sqlite:////srv/mlflow/" in line, line
    return line.replace("/srv/mlflow", str(folder)).replace("5000", str(port)).replace("0.0.0.0", "127.0.0.1")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A Prefect server, an MLflow server, a DVC remote and a checkout of this project."""
    tmp = tmp_path_factory.mktemp("factory")
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    procs = Processes(tmp, env)
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    try:
        server, log = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)], tmp)
        # MLflow as the README starts it, word for word but for its folder, port and interface
        mlflow_server, mlflow_log = procs.start("mlflow-server", ["bash", "-c", readme_mlflow_line(tmp / "srv-mlflow", mlflow_port)], tmp)
        started = time.monotonic()
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 120, server, log)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, mlflow_server, mlflow_log)
        startup = time.monotonic() - started
        os.environ.update({k: env[k] for k in saved})
        checkout = _checkout(tmp / "checkout", tmp / "dvc-remote")
        # Prefect reads its settings once, at import: point this process's clients at the server
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]}):
            yield {"tmp": tmp, "env": env, "procs": procs, "checkout": checkout, "startup_s": startup}
    finally:
        procs.close()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _report(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-report"]),
                                                                     flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert found, "no retrain-report artifact for the run"
    return found[0].data


def _production(model: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(model, "production").version)
    except MlflowException:
        return None


def _latest(model: str) -> str:
    from mlflow import MlflowClient

    return str(max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{model}'")))


def _dvc_status(checkout: Path, env: dict[str, str]) -> dict:
    return json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], checkout, env).strip().splitlines()[-1])


class Receiver:
    """A webhook receiver on 127.0.0.1: collects the bodies POSTed to it."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *words: str, seconds: float = 90) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for body in self.bodies:
                if all(w in body for w in words):
                    return body
            time.sleep(1)
        raise AssertionError(f"no notification with {words} in {seconds} s; got {self.bodies}")


def _lock_md5(lock_file: Path, stage: str, path: str) -> str:
    outs = yaml.safe_load(lock_file.read_text())["stages"][stage]["outs"]
    return next(o["md5"] for o in outs if o["path"] == path)


@pytest.mark.slow
def test_fan_out_over_two_workers_gates_each_category_and_leaves_the_parent_up_to_date(factory):
    from prefect.deployments import run_deployment

    checkout, env, procs = factory["checkout"], factory["env"], factory["procs"]
    _run([str(BIN / "prefect"), "work-pool", "create", "urd", "--type", "process"], checkout, env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], checkout, env | {"URD_CHECKOUT": str(checkout)})
    # as in the README: one worker for the parent's queue, one for the children's (a CPU host: no
    # --limit). A fixed thread count (URD_THREADS), so the children's models can be compared bit for
    # bit with a single-host run below: float sums come out differently at another thread count.
    for name, queue in (("w1", "control"), ("w2", "train")):
        procs.start(f"worker-{name}", [str(BIN / "prefect"), "worker", "start", "--pool", "urd", "--work-queue", queue, "--name", name], checkout,
                    URD_THREADS="2")

    run = run_deployment("retrain/retrain", timeout=1200, poll_interval=3)
    logs = "".join(p.read_text() for p in factory["tmp"].glob("worker-*.log"))
    assert run.state.is_completed(), f"{run.state}\n{logs[-6000:]}"
    # two children ran, one per category, each in a checkout of its own
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train-category"])))
    assert sorted(c.parameters["category"] for c in children) == ["tiles", "widget"] and all(c.state.is_completed() for c in children)
    assert all(c.parameters["repo"] == str(checkout) for c in children)

    report = _report(run.id)
    assert "| tiles |" in report and "**promote**" in report and "**reject**" in report and "min_image_auroc" in report
    assert _production("urd-demo-tiles") == "1" and _production("urd-demo-widget") is None
    # orchestrated gates serialise on a Prefect global concurrency limit (any number of hosts)
    from mlflow import MlflowClient

    assert MlflowClient().get_model_version("urd-demo-tiles", "1").tags["promotion.lock"] == "prefect global concurrency limit promote-urd-demo-tiles"

    # the parent's checkout holds every output and reads as up to date: nothing to rerun
    status = _run([sys.executable, "-m", "dvc", "status", "--json"], checkout, env)
    assert json.loads(status.strip().splitlines()[-1]) == {}, status
    assert (checkout / "bundles/widget/model.onnx").is_file() and (checkout / "metrics/tiles.json").is_file()
    # ... with the model a single-host run trains from the same commit
    single = factory["tmp"] / "single-host"
    _run(["git", "clone", "-q", str(checkout), str(single)], factory["tmp"], env)
    _run([sys.executable, "-m", "dvc", "repro", "train@tiles"], single, env | {"MLFLOW_TRACKING_URI": f"sqlite:///{single / 'mlflow.db'}",
                                                                               "URD_THREADS": "2"})
    path = "models/tiles/model.safetensors"
    assert _lock_md5(checkout / "dvc.lock", "train@tiles", path) == _lock_md5(single / "dvc.lock", "train@tiles", path)


@pytest.mark.slow
def test_fan_out_retrains_an_edited_category_on_a_worker_and_fails_bad_data_by_name(factory):
    """What an operator does between two nightly runs: an image added to widget, a tiles image
    truncated. The parent versions the edit, the widget child retrains, tiles fails by name, a
    person is notified, and `dvc status` says exactly what is left."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    checkout, env = factory["checkout"], factory["env"]
    if not (checkout / "bundles/tiles").is_dir():
        pytest.skip("needs the fan-out test's trained factory")
    receiver = Receiver()
    _run([sys.executable, "-m", "pipeline", "notify", "--url", receiver.url], checkout, env)
    good = checkout / "data/raw/demo/widget/train/good"
    cv2.imwrite(str(good / "added.png"), cv2.flip(cv2.imread(str(sorted(good.glob("*.png"))[0])), 1))
    truncated = checkout / "data/raw/demo/tiles/train/good/003.png"
    original = truncated.read_bytes()
    truncated.write_bytes(original[: len(original) // 2])
    # ... and a `dvc repro` here was interrupted in widget's train stage: its persisted run file and
    # its MLflow run, still RUNNING, are left behind (the merge must replace them, not fail on them)
    from mlflow import MlflowClient

    stale = MlflowClient().create_run(MlflowClient().get_experiment_by_name("urd-demo").experiment_id)
    run_file = checkout / "models/widget/mlflow_run.json"
    run_file.write_text(json.dumps({"run_id": stale.info.run_id, "experiment_id": stale.info.experiment_id, "tracking_uri": env["MLFLOW_TRACKING_URI"]}))
    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train-category"])))}

    run = run_deployment("retrain/retrain", timeout=1200, poll_interval=3)
    assert run.state.is_failed(), run.state
    report = _report(run.id)
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| tiles |") or line.startswith("| widget |")}
    assert "FAILED" in rows["tiles"] and "validate for tiles" in rows["tiles"] and "003.png" in rows["tiles"], report
    assert "FAILED" not in rows["widget"] and "train" in rows["widget"] and "**reject**" in rows["widget"], report
    assert "still reports tiles changed" in report  # the checkout says what is left, and why
    with get_client(sync_client=True) as client:
        children = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train-category"])))
                    if r.id not in before]
    assert sorted(c.parameters["category"] for c in children) == ["tiles", "widget"]
    assert _production("urd-demo-tiles") == "1" and _production("urd-demo-widget") is None
    # the widget child trained on the added image: the parent's checkout has its outputs and reads as up to date
    status = _dvc_status(checkout, env)
    assert not any("widget" in stage for stage in status) and any(stage.endswith("@tiles") for stage in status), status
    assert "added.png" in (checkout / "data/validated/widget.csv").read_text()
    assert MlflowClient().get_run(stale.info.run_id).info.status == "KILLED"
    assert json.loads(run_file.read_text())["run_id"] != stale.info.run_id
    # a person hears of both
    receiver.wait_for("urd.promotion.rejected", "widget")
    receiver.wait_for("urd.category.failed", "tiles", "003.png")
    receiver.wait_for("urd.retrain.failed")

    # the operator restores the image: the checkout is up to date again
    truncated.write_bytes(original)
    _run([sys.executable, "-m", "dvc", "repro", "demo_data"], checkout, env)
    assert _dvc_status(checkout, env) == {}


@pytest.mark.slow
def test_served_schedule_nothing_changed_then_bad_data_fails_one_category_only(factory):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    checkout, env = factory["checkout"], factory["env"]
    if not (checkout / "bundles/tiles").is_dir():
        pytest.skip("needs the fan-out test's trained factory")
    # the work-pool deployment already retrains this checkout nightly: a second schedule is refused
    refused = subprocess.run([sys.executable, "-m", "pipeline", "serve"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "retrain/retrain already retrains this checkout" in refused.stderr, refused.stderr[-2000:]
    _run([str(BIN / "prefect"), "deployment", "delete", "retrain/retrain"], checkout, env)
    served, log = factory["procs"].start("serve", [sys.executable, "-m", "pipeline", "serve"], checkout)
    deadline = time.monotonic() + 120
    deployment = None
    with get_client(sync_client=True) as client:
        while deployment is None:
            assert served.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                deployment = client.read_deployment_by_name("retrain/served")
            except Exception:
                time.sleep(1)
        assert [s.schedule.cron for s in deployment.schedules] == [RetrainParams().cron]
        for _ in range(60):  # the server's scheduler fills in the nightly runs
            scheduled = [r for r in client.read_flow_runs() if r.deployment_id == deployment.id and r.state and r.state.is_scheduled()]
            if scheduled:
                break
            time.sleep(1)
        assert scheduled and all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in scheduled)

    # nothing changed since the fan-out run: a short run that says so
    started = time.monotonic()
    run = run_deployment("retrain/served", timeout=300, poll_interval=2)
    assert run.state.is_completed(), log.read_text()[-4000:]
    assert "nothing changed" in _report(run.id) and time.monotonic() - started < 120

    # a corrupt image in tiles; widget's calibration target and floor changed by an override
    (checkout / "data/raw/demo/tiles/train/good/003.png").write_bytes(b"not a png")
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["overrides"] = {"widget": {"calibrate": {"target_fpr": 0.05}, "promote": {"min_image_auroc": 0.0}}}
    (checkout / "params.yaml").write_text(yaml.safe_dump(params))
    run = run_deployment("retrain/served", parameters={"promote": True}, timeout=900, poll_interval=2)
    assert run.state.is_failed(), log.read_text()[-4000:]
    report = _report(run.id)
    tiles_row = next(line for line in report.splitlines() if line.startswith("| tiles |"))
    widget_row = next(line for line in report.splitlines() if line.startswith("| widget |"))
    assert "FAILED" in tiles_row and "validate for tiles" in tiles_row and "003.png" in tiles_row
    assert "**promote**" in widget_row and _production("urd-demo-widget") == _latest("urd-demo-widget") and _production("urd-demo-tiles") == "1"
    # the override reran only widget's calibrate, evaluate and package (and its params files); the
    # new version replaced the one rejected by the fan-out run
    assert "(stage_params, calibrate, evaluate, package)" in widget_row, widget_row


@pytest.mark.slow
def test_a_flow_killed_mid_training_is_finished_by_the_next_run_with_nothing_lost(factory, tmp_path):
    """kill -9 of a retrain flow-run process and everything it started, in the middle of training
    (progress lines reached its log first); the next run finishes the job: `dvc status` clean,
    each category's candidate registered and gated, no MLflow run left RUNNING."""
    from mlflow import MlflowClient

    env = factory["env"] | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'crash-mlflow.db'}", "URD_PROGRESS_SECONDS": "1"}
    checkout = _checkout(tmp_path / "checkout", tmp_path / "remote")
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["train"] |= {"iterations": 120, "checkpoint_every": 20}
    params["overrides"] = {}
    (checkout / "params.yaml").write_text(yaml.safe_dump(params))
    _git(checkout, "commit", "-qam", "longer training")
    flow = [sys.executable, "-c", "from pipeline.flows import retrain; retrain(root='.')"]
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(flow, cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not re.search(r"train tiles: \d+/120 it", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        # the host lost the flow-run process and everything it started (DVC runs in a process group
        # of its own, so the whole tree, not one group)
        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in [psutil.Process(proc.pid), *tree]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        psutil.wait_procs(tree, timeout=30)
    assert "ETA" in log.read_text()  # progress reached the run's log while training, not only at the end
    interrupted = json.loads((checkout / "models/tiles/mlflow_run.json").read_text())["run_id"]

    rerun = subprocess.run(flow, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert _dvc_status(checkout, env) == {}
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert client.get_run(interrupted).info.status in ("FINISHED", "KILLED")  # resumed to the end, or ended when started over
    for category in ("tiles", "widget"):
        version = client.get_model_version_by_alias(f"urd-demo-{category}", "candidate")
        assert version.tags.get("promotion.decision") == "promote", version.tags
        # a local store under a Prefect server: the file lock a manual `promote` takes too, and the Prefect limit
        lock = version.tags["promotion.lock"]
        assert lock.startswith("file lock ") and "prefect global concurrency limit promote-urd-demo-" in lock, lock


def test_only_transient_failures_are_retried():
    from pipeline.flows import _retry_transient

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert _retry_transient(None, None, State(StageFailed("lock held", transient=True)))
    assert not _retry_transient(None, None, State(StageFailed("bad data")))
    assert not _retry_transient(None, None, State(ValueError("a bug")))
