"""The inspection service's FastAPI app: inspection API, ledger reads, admin, metrics, review page.

Build it with :func:`create_app` (the ``urd serve`` command runs it on uvicorn; tests drive it
in-process). Every route but ``/healthz`` and ``/readyz`` needs a token (urd.service.security).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import cv2
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from ..config import ServeParams
from ..evaluate import overlay
from .batcher import Job, MicroBatcher, Overloaded
from .ledger import Inspection, Ledger, LedgerUnavailable, NewInspection, start_of_day
from .metrics import ServiceMetrics
from .models import ModelBook, ServedModel, Thresholds
from .security import COOKIE, Caller, csrf_ok, csrf_token, find_caller, load_tokens
from .store import ImageStore, image_type, sha256
from .uploads import UploadError, decode_upload

log = logging.getLogger("urd.serve")
HERE = Path(__file__).parent
RETRY_AFTER = {"Retry-After": "1"}


@dataclass
class ServiceConfig:
    categories: list[str]
    source: Any  # BundleSource | RegistrySource
    serve: ServeParams = field(default_factory=ServeParams)
    precision: str = "fp32"
    poll: bool = True  # poll the source for new versions every serve.poll_seconds


@dataclass
class Pending:
    """What a request carries to the recording stage."""

    data: bytes
    digest: str
    width: int
    height: int
    line: str | None
    camera: str | None
    part_id: str | None
    client_key: str | None
    thresholds: Thresholds
    started: float


def _record_json(row: Inspection, verdicts: list | None = None) -> dict[str, Any]:
    out = {
        "id": row.id, "created_at": row.created_at.isoformat(), "category": row.category, "line": row.line, "camera": row.camera,
        "part_id": row.part_id, "decision": row.decision, "score": row.score, "normalized_score": row.normalized_score,
        "threshold_version": row.threshold_version, "latency_ms": round(row.latency_ms, 3),
        "model": {"name": row.model_name, "version": row.model_version, "alias": row.model_alias, "bundle_digest": row.bundle_digest},
        "image": {"sha256": row.image_sha256, "width": row.image_width, "height": row.image_height},
        "links": {"self": f"/v1/inspections/{row.id}", "image": f"/v1/inspections/{row.id}/image", "overlay": f"/v1/inspections/{row.id}/overlay"},
    }
    if verdicts is not None:
        out["verdicts"] = [{"verdict": v.verdict, "note": v.note, "reviewer": v.reviewer, "created_at": v.created_at.isoformat()} for v in verdicts]
    return out


class Service:
    """The state behind the routes: models, batcher, ledger, store, tokens, metrics."""

    def __init__(self, config: ServiceConfig) -> None:
        s = config.serve
        self.config = config
        self.ledger = Ledger(s.ledger)
        self.store = ImageStore(s.image_store, s.retention_days)
        self.callers, created = load_tokens(s.tokens)
        if created:
            log.warning("wrote fresh tokens for the roles line, reviewer and admin to %s (readable by its owner only); hand them out from there",
                        created)
        self.metrics = ServiceMetrics()
        self.book = ModelBook(config.categories, config.source, self.ledger, config.precision, s.max_pixels)
        self.batcher = MicroBatcher(self._score, self._record, s.max_batch, s.max_wait_ms / 1000, s.queue_size, observe=self._observe)
        self.tasks: list[asyncio.Task] = []

    # --- the two stages of a batch (worker threads) ---
    @staticmethod
    def _score(model: ServedModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return model.score(batch)

    def _observe(self, category: str, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(category).observe(size)
        self.metrics.inference.labels(category).observe(seconds)

    def _record(self, jobs: list[Job], maps: np.ndarray, scores: np.ndarray) -> list[Inspection]:
        started = time.perf_counter()
        items = []
        for job, score in zip(jobs, scores):
            p: Pending = job.payload
            model: ServedModel = job.model
            self.store.put(p.data, p.digest)
            normalized, decision = p.thresholds.decide(float(score))
            items.append(NewInspection(
                category=model.category, line=p.line, camera=p.camera, part_id=p.part_id, client_key=p.client_key, image_sha256=p.digest,
                image_width=p.width, image_height=p.height, model_name=model.name, model_version=model.version, model_alias=model.alias,
                bundle_digest=model.digest, threshold_version=p.thresholds.version, score=float(score), normalized_score=normalized,
                decision=decision, latency_ms=(time.perf_counter() - p.started) * 1000))
        rows = self.ledger.add_inspections(items)  # committed before any of these responses is sent
        self.metrics.record.labels(jobs[0].model.category).observe(time.perf_counter() - started)
        for row in rows:
            self.metrics.decisions.labels(row.category, row.model_version, row.decision).inc()
        return rows

    # --- lifecycle ---
    async def start(self) -> None:
        await run_in_threadpool(self.ledger.upgrade)
        for category in self.config.categories:
            await run_in_threadpool(self.refresh, category)
        self.batcher.start(self.config.categories)
        if self.config.poll:
            self.tasks.append(asyncio.create_task(self._poll(), name="poll-registry"))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.batcher.stop()
        self.ledger.engine.dispose()

    def refresh(self, category: str, force: bool = False) -> str:
        try:
            outcome = self.book.refresh(category, force)
        except LedgerUnavailable as exc:
            self.book.problems[category] = str(exc)
            return "unavailable"
        model = self.book.models.get(category)
        if model is not None:
            self.metrics.model_version.clear()
            for c, m in self.book.models.items():
                self.metrics.model_version.labels(c, m.version, m.digest[:12]).set(1)
        return outcome

    def run_challenges(self) -> dict[str, Any]:
        """Run every served model's challenge set again (``serve.challenge_hours`` and the admin
        route): a model that no longer reproduces it (a changed runtime or host) keeps serving, but
        readiness and the ledger say so."""
        out = {}
        for category, model in list(self.book.models.items()):
            result = model.check_challenge(self.config.serve.max_pixels)
            out[category] = {"passed": result.passed, "images": result.images, "max_deviation": result.max_deviation, "problems": result.problems}
            stale = f"{model.name} version {model.version} no longer reproduces its challenge set"
            if result.passed:
                if self.book.problems.get(category, "").startswith(stale):
                    self.book.problems.pop(category)
                continue
            self.book.problems[category] = f"{stale} ({result.reason})"
            log.error("%s: %s", category, self.book.problems[category])
            self.ledger.add_model_event(category, "challenge_failed", model.name, model.version, model.digest, out[category])
        return out

    async def _poll(self) -> None:
        s = self.config.serve
        last_challenge = time.monotonic()
        while True:
            await asyncio.sleep(s.poll_seconds)
            for category in self.config.categories:
                try:
                    await run_in_threadpool(self.refresh, category)
                except Exception:  # noqa: BLE001 - the poll must survive anything one refresh does
                    log.exception("%s: refreshing the model failed", category)
            await run_in_threadpool(self.store.prune)
            if s.challenge_hours and time.monotonic() - last_challenge >= s.challenge_hours * 3600:
                last_challenge = time.monotonic()
                try:
                    await run_in_threadpool(self.run_challenges)
                except Exception:  # noqa: BLE001
                    log.exception("the scheduled challenge-set check failed")

    def snapshot(self, category: str) -> tuple[ServedModel, Thresholds]:
        if category not in self.config.categories:
            raise HTTPException(404, f"unknown category {category!r}; this service serves {self.config.categories}")
        with self.book._lock:
            model, thresholds = self.book.models.get(category), self.book.thresholds.get(category)
        if model is None or thresholds is None:
            raise HTTPException(503, f"{category} is not being served: {self.book.problems.get(category, 'no model loaded yet')}",
                                headers=RETRY_AFTER)
        return model, thresholds

    # --- one inspection ---
    async def inspect(self, category: str, data: bytes, line: str | None, camera: str | None, part_id: str | None,
                      client_key: str | None) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        model, thresholds = self.snapshot(category)
        if client_key:
            previous = await run_in_threadpool(self.ledger.by_client_key, category, client_key)
            if previous is not None:  # a retry of a request already recorded: the same answer, no second record
                return 200, _record_json(previous) | {"replayed": True}
        s = self.config.serve

        def prepare() -> tuple[np.ndarray, np.ndarray, str]:  # one hop to a worker thread: decode, check, resize, hash
            decoding = time.perf_counter()
            image = decode_upload(data, s.max_upload_bytes, s.max_pixels)
            tensor, digest = model.prepare(image), sha256(data)
            self.metrics.prepare.labels(category).observe(time.perf_counter() - decoding)
            return image, tensor, digest

        try:
            with self.batcher.expect(category):
                image, tensor, digest = await run_in_threadpool(prepare)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        pending = Pending(data, digest, image.shape[1], image.shape[0], line, camera, part_id, client_key, thresholds, started)
        try:
            row = await self.batcher.submit(category, model, tensor, pending)
        except Overloaded as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise HTTPException(503, f"over capacity: {exc}; retry shortly", headers=RETRY_AFTER) from None
        except LedgerUnavailable as exc:
            self.metrics.rejected.labels("ledger").inc()
            raise HTTPException(503, f"{exc}; nothing was recorded, retry when the ledger is back", headers={"Retry-After": "5"}) from None
        return 200, _record_json(row) | {"thresholds": {"version": thresholds.version, "review": thresholds.review, "reject": thresholds.reject}}

    def overlay_png(self, row: Inspection) -> tuple[bytes, str]:
        model, _ = self.snapshot(row.category)
        data = self.store.get(row.image_sha256)
        if data is None:
            raise HTTPException(410, f"the image of inspection {row.id} is no longer stored (serve.retention_days)")
        image = decode_upload(data, len(data) + 1, self.config.serve.max_pixels)
        maps, _ = model.score(model.prepare(image)[None])
        small = cv2.resize(image, (model.image_size, model.image_size), interpolation=cv2.INTER_AREA)
        picture = overlay(small, maps[0], float(model.calibration["pixel_max"]))
        ok, png = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        return png.tobytes(), f"{model.name} version {model.version}"


class CountRequests:
    """Requests and their latency per route and status, as a plain ASGI middleware (Starlette's
    BaseHTTPMiddleware costs a task and a stream per request, measurable at line rates)."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def create_app(config: ServiceConfig) -> FastAPI:
    service = Service(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="urd inspection service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    app.add_middleware(CountRequests, metrics=service.metrics)

    # --- who is calling ---
    def caller_of(request: Request) -> Caller | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return find_caller(service.callers, token)

    def role(*roles: str):
        def check(request: Request) -> Caller:
            caller = caller_of(request)
            if caller is None:
                raise HTTPException(401, "a token is required: send 'Authorization: Bearer <token>' (serve.tokens holds them)",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not caller.may(*roles):
                raise HTTPException(403, f"the {caller.role} token {caller.name!r} may not do this (needs {' or '.join(roles)})")
            return caller
        return check

    def page_caller(request: Request) -> Caller | None:
        caller = caller_of(request)
        return caller if caller is not None and caller.may("reviewer") else None

    # --- health ---
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems = dict(service.book.problems)
        try:
            service.ledger.ping()
        except LedgerUnavailable as exc:
            problems["ledger"] = str(exc)
        models = {c: m.describe() for c, m in service.book.models.items()}
        ready = service.book.ready() and "ledger" not in problems
        return JSONResponse({"ready": ready, "models": models, "problems": problems}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics(_: Caller = Depends(role("line", "reviewer"))) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for category in config.categories:
            if category in service.batcher.queues:
                service.metrics.queue_depth.labels(category).set(service.batcher.depth(category))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- inspection ---
    async def upload_of(request: Request) -> tuple[bytes, dict[str, str]]:
        limit = config.serve.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 65536:
            raise HTTPException(413, f"the upload is {declared} bytes, over the limit of {limit} (serve.max_upload_bytes)")
        fields = {k: v for k, v in request.query_params.items() if k in ("line", "camera", "part_id")}
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8, max_part_size=limit + 1)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "the multipart body has no file field 'image'")
            data = await upload.read(limit + 1)
            fields |= {k: str(form[k]) for k in ("line", "camera", "part_id") if k in form}
        else:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"the upload is over the limit of {limit} bytes (serve.max_upload_bytes)")
                chunks.append(chunk)
            data = b"".join(chunks)
        if len(data) > limit:
            raise HTTPException(413, f"the upload is over the limit of {limit} bytes (serve.max_upload_bytes)")
        return data, fields

    @app.post("/v1/inspect/{category}")
    async def inspect(category: str, request: Request, _: Caller = Depends(role("line"))) -> JSONResponse:
        data, fields = await upload_of(request)
        key = request.headers.get("idempotency-key")
        status, body = await service.inspect(category, data, fields.get("line"), fields.get("camera"), fields.get("part_id"), key)
        return JSONResponse(body, status_code=status)

    @app.post("/v1/inspect/{category}/batch")
    async def inspect_batch(category: str, request: Request, _: Caller = Depends(role("line"))) -> JSONResponse:
        limit = config.serve.max_upload_bytes
        form = await request.form(max_files=64, max_fields=8, max_part_size=limit + 1)
        files = [f for k, f in form.multi_items() if k == "images" and not isinstance(f, str)]
        if not files:
            raise HTTPException(422, "the multipart body has no file fields 'images'")
        fields = {k: str(form[k]) for k in ("line", "camera") if k in form} | dict(request.query_params)

        async def one(upload) -> dict[str, Any]:
            try:
                _, body = await service.inspect(category, await upload.read(limit + 1), fields.get("line"), fields.get("camera"),
                                                upload.filename, None)
                return body | {"file": upload.filename}
            except HTTPException as exc:
                return {"file": upload.filename, "error": exc.detail, "status": exc.status_code}

        return JSONResponse({"results": await asyncio.gather(*(one(f) for f in files))})

    def record_or_404(inspection_id: str) -> Inspection:
        row = service.ledger.inspection(inspection_id)
        if row is None:
            raise HTTPException(404, f"no inspection {inspection_id!r} in the ledger")
        return row

    @app.get("/v1/inspections/{inspection_id}")
    def get_inspection(inspection_id: str, _: Caller = Depends(role("line", "reviewer"))) -> dict[str, Any]:
        row = record_or_404(inspection_id)
        return _record_json(row, service.ledger.verdicts(row.id))

    @app.get("/v1/inspections/{inspection_id}/image")
    def get_image(inspection_id: str, _: Caller = Depends(role("line", "reviewer"))) -> Response:
        row = record_or_404(inspection_id)
        data = service.store.get(row.image_sha256)
        if data is None:
            raise HTTPException(410, f"the image of inspection {row.id} is no longer stored (serve.retention_days)")
        return Response(data, media_type=image_type(data)[0])

    @app.get("/v1/inspections/{inspection_id}/overlay")
    async def get_overlay(inspection_id: str, _: Caller = Depends(role("line", "reviewer"))) -> Response:
        row = record_or_404(inspection_id)
        png, made_by = await run_in_threadpool(service.overlay_png, row)
        return Response(png, media_type="image/png", headers={"X-Urd-Overlay-Model": made_by})

    @app.post("/v1/inspections/{inspection_id}/verdict")
    async def post_verdict(inspection_id: str, request: Request, caller: Caller = Depends(role("reviewer"))) -> dict[str, Any]:
        body = await request.json()
        try:
            verdict = service.ledger.add_verdict(record_or_404(inspection_id).id, body.get("verdict"), caller.name, body.get("note"))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except LedgerUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        return {"inspection_id": inspection_id, "verdict": verdict.verdict, "reviewer": verdict.reviewer, "id": verdict.id}

    # --- admin ---
    @app.get("/v1/models")
    def models(_: Caller = Depends(role("line", "reviewer"))) -> dict[str, Any]:
        out = {}
        for category in config.categories:
            model, thresholds = service.book.models.get(category), service.book.thresholds.get(category)
            out[category] = {"model": model.describe() if model else None, "problem": service.book.problems.get(category),
                             "thresholds": vars(thresholds) if thresholds else None}
        return out

    @app.post("/v1/admin/reload")
    async def reload(_: Caller = Depends(role("admin"))) -> dict[str, str]:
        return {c: await run_in_threadpool(service.refresh, c, True) for c in config.categories}

    @app.put("/v1/admin/thresholds/{category}")
    async def set_thresholds(category: str, request: Request, caller: Caller = Depends(role("admin"))) -> dict[str, Any]:
        body = await request.json()
        service.snapshot(category)
        try:
            review, reject = float(body["review_threshold"]), float(body["image_threshold"])
            thresholds = service.book.set_thresholds(category, review, reject, caller.name, body.get("note"))
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPException(422, f"send {{'review_threshold': float, 'image_threshold': float, 'note': str}} with review <= image: {exc}")
        return vars(thresholds)

    @app.post("/v1/admin/challenge")
    async def challenge(_: Caller = Depends(role("admin"))) -> dict[str, Any]:
        return await run_in_threadpool(service.run_challenges)

    # --- the review page ---
    def page_filters(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.query_params.items() if k in ("category", "line", "decision", "show") and v}

    @app.get("/review/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str = "") -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"error": error})

    @app.post("/review/login")
    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=2)
        token = str(form.get("token", ""))
        caller = find_caller(service.callers, token)
        if caller is None or not caller.may("reviewer"):
            return templates.TemplateResponse(request, "login.html", {"error": "not a reviewer or admin token"}, status_code=401)
        response = RedirectResponse("/review", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/review/logout")
    async def logout(request: Request) -> Response:
        caller = page_caller(request)
        form = await request.form(max_files=0, max_fields=2)
        if caller is not None and not csrf_ok(caller.token, form.get("csrf")):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
        response = RedirectResponse("/review/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/review", response_class=HTMLResponse)
    def review(request: Request) -> Response:
        caller = page_caller(request)
        if caller is None:
            return RedirectResponse("/review/login", status_code=303)
        f = page_filters(request)
        rows = service.ledger.review_queue(f.get("category"), f.get("line"), f.get("decision"), pending_only=f.get("show", "pending") == "pending")
        return templates.TemplateResponse(request, "review.html", {
            "rows": rows, "filters": f, "query": urlencode(f), "categories": config.categories, "caller": caller,
            "csrf": csrf_token(caller.token)})

    @app.post("/review/{inspection_id}/verdict")
    async def review_verdict(inspection_id: str, request: Request) -> Response:
        caller = page_caller(request)
        if caller is None:
            raise HTTPException(401, "sign in at /review/login with a reviewer token")
        form = await request.form(max_files=0, max_fields=8)
        if not csrf_ok(caller.token, form.get("csrf")):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
        try:
            service.ledger.add_verdict(record_or_404(inspection_id).id, str(form.get("verdict")), caller.name, str(form.get("note") or "") or None)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except LedgerUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        return RedirectResponse(f"/review?{form.get('back') or ''}", status_code=303)

    @app.get("/review/dashboard/{category}", response_class=HTMLResponse)
    def dashboard(category: str, request: Request) -> Response:
        caller = page_caller(request)
        if caller is None:
            return RedirectResponse("/review/login", status_code=303)
        model, _ = service.snapshot(category)
        return templates.TemplateResponse(request, "dashboard.html", dashboard_data(service, category, model) | {
            "caller": caller, "categories": config.categories, "csrf": csrf_token(caller.token)})

    @app.get("/static/review.js")
    def review_js(request: Request) -> Response:
        if page_caller(request) is None:
            raise HTTPException(401, "sign in at /review/login")
        return Response((HERE / "static" / "review.js").read_bytes(), media_type="text/javascript")

    return app


def dashboard_data(service: Service, category: str, model: ServedModel, bins: int = 24) -> dict[str, Any]:
    """Today's rates against the calibrated expectation, and today's scores against the val scores."""
    today = service.ledger.since(category, start_of_day())
    calibration = model.calibration
    scores = np.array([r.score for r in today], np.float64)
    reference = np.asarray(calibration.get("val_scores", []), np.float64)
    both = np.r_[scores, reference]
    histogram = []
    if both.size:
        edges = np.linspace(both.min(), both.max() + 1e-9, bins + 1)
        today_counts = np.histogram(scores, edges)[0] / max(len(scores), 1)
        val_counts = np.histogram(reference, edges)[0] / max(len(reference), 1)
        peak = max(today_counts.max(initial=0), val_counts.max(initial=0), 1e-9)
        thresholds = service.book.thresholds[category]
        histogram = [{"left": float(edges[i]), "today": float(today_counts[i] / peak), "val": float(val_counts[i] / peak),
                      "band": "reject" if edges[i] >= thresholds.reject else "review" if edges[i + 1] > thresholds.review else "accept"}
                     for i in range(bins)]
    decisions = {d: sum(1 for r in today if r.decision == d) for d in ("accept", "review", "reject")}
    n = max(len(today), 1)
    return {
        "category": category, "model": model.describe(), "thresholds": service.book.thresholds[category], "parts_today": len(today),
        "decisions": decisions, "reject_rate": decisions["reject"] / n, "review_rate": decisions["review"] / n,
        "expected_reject_rate": calibration.get("val_false_positive_rate"), "expected_review_rate": calibration.get("val_review_rate"),
        "histogram": histogram, "verdicts": service.ledger.verdict_counts(category, start_of_day()),
        "day": datetime.now().date().isoformat(),
    }
