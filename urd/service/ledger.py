"""The ledger: one append-only record per inspection, reviewer verdicts as separate records, every
threshold version, every model event (served, swapped, refused) and every harvest (reviewed
inspections that became data). Nothing is updated in place.

SQLAlchemy 2 on SQLite (WAL, full sync: a record committed before its response survives a crash
of the service) or PostgreSQL; the schema is created and upgraded by the Alembic migrations in
``urd/service/migrations`` (``Ledger.upgrade``, run at service start).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
VERDICTS = ("good", "defect")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    __tablename__ = "inspections"
    __table_args__ = (UniqueConstraint("category", "client_key", name="uq_inspections_client_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    category: Mapped[str] = mapped_column(String(128), index=True)
    line: Mapped[str | None] = mapped_column(String(128))
    camera: Mapped[str | None] = mapped_column(String(128))
    part_id: Mapped[str | None] = mapped_column(String(256))
    client_key: Mapped[str | None] = mapped_column(String(256))  # Idempotency-Key: a retried upload is recorded once
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(64))
    model_alias: Mapped[str | None] = mapped_column(String(64))
    bundle_digest: Mapped[str] = mapped_column(String(64))
    threshold_version: Mapped[int] = mapped_column(ForeignKey("threshold_versions.id"))
    score: Mapped[float] = mapped_column(Float)  # raw image score
    normalized_score: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16), index=True)  # accept | review | reject
    latency_ms: Mapped[float] = mapped_column(Float)


class Verdict(Base):
    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # good | defect
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ThresholdVersion(Base):
    __tablename__ = "threshold_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category: Mapped[str] = mapped_column(String(128), index=True)
    bundle_digest: Mapped[str] = mapped_column(String(64))
    review_threshold: Mapped[float] = mapped_column(Float)
    image_threshold: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(32))  # calibration (the bundle's) | admin | drift (widened by the respond flow)
    set_by: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelEvent(Base):
    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    category: Mapped[str] = mapped_column(String(128), index=True)
    event: Mapped[str] = mapped_column(String(32))  # serving | refused | challenge_failed
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(64))
    bundle_digest: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class Harvest(Base):
    """One harvest of a category: reviewed inspections that became data (urd.service.harvest)."""

    __tablename__ = "harvests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    category: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(128))
    good: Mapped[int] = mapped_column(Integer)  # confirmed-good images added to the training folder
    defect: Mapped[int] = mapped_column(Integer)  # confirmed defects added to the field set
    missing: Mapped[int] = mapped_column(Integer)  # reviewed, but the image was no longer stored
    first_record_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_record_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class HarvestedRecord(Base):
    """An inspection taken by a harvest: at most once (the primary key)."""

    __tablename__ = "harvested_records"

    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id"), primary_key=True)
    harvest_id: Mapped[str] = mapped_column(ForeignKey("harvests.id"), index=True)
    verdict_id: Mapped[int] = mapped_column(ForeignKey("verdicts.id"))
    verdict: Mapped[str] = mapped_column(String(16))
    path: Mapped[str | None] = mapped_column(String(1024))  # where its image went (None: no longer stored)


class LedgerUnavailable(RuntimeError):
    """The ledger database cannot be written: the service answers 503 rather than lose a record."""


@dataclass
class NewInspection:
    category: str
    line: str | None
    camera: str | None
    part_id: str | None
    client_key: str | None
    image_sha256: str
    image_width: int
    image_height: int
    model_name: str
    model_version: str
    model_alias: str | None
    bundle_digest: str
    threshold_version: int
    score: float
    normalized_score: float
    decision: str
    latency_ms: float


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, connect_args={"connect_timeout": 5} if "psycopg" in url else {})


def ledger_url(url: str, root: str | Path) -> str:
    """``url`` with a relative SQLite path taken from ``root`` (the checkout a flow works on), not
    from wherever the process happens to run."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str((Path(root) / url[len(prefix):]).resolve())
    return url


class Ledger:
    """The record of one service (or of several replicas sharing a PostgreSQL database)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> None:
        """Create or upgrade the schema to the newest migration (Alembic)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = None
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def ping(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any driver error means the same to a caller
            raise LedgerUnavailable(f"the ledger ({self.engine.url.render_as_string(hide_password=True)}) cannot be reached: {exc}") from exc

    def _write(self, rows: Iterable[Base]) -> None:
        try:
            with self.session.begin() as session:
                session.add_all(list(rows))
        except Exception as exc:  # noqa: BLE001
            raise LedgerUnavailable(f"the ledger could not record the inspection ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc

    # --- writes (append only) ---
    def add_inspections(self, items: list[NewInspection]) -> list[Inspection]:
        """One transaction for a micro-batch: every record is committed before any response is sent."""
        now = utcnow()
        rows = [Inspection(id=new_id(), created_at=now, **vars(item)) for item in items]
        self._write(rows)
        return rows

    def add_verdict(self, inspection_id: str, verdict: str, reviewer: str, note: str | None = None) -> Verdict:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        if self.inspection(inspection_id) is None:
            raise KeyError(inspection_id)
        row = Verdict(inspection_id=inspection_id, verdict=verdict, reviewer=reviewer, note=note or None, created_at=utcnow())
        self._write([row])
        return row

    def add_threshold_version(self, category: str, bundle_digest: str, review: float, reject: float, source: str, set_by: str,
                              note: str | None = None) -> ThresholdVersion:
        row = ThresholdVersion(category=category, bundle_digest=bundle_digest, review_threshold=review, image_threshold=reject, source=source,
                               set_by=set_by, note=note, created_at=utcnow())
        self._write([row])
        return row

    def add_model_event(self, category: str, event_name: str, model_name: str, model_version: str, bundle_digest: str,
                        detail: dict[str, Any]) -> None:
        self._write([ModelEvent(created_at=utcnow(), category=category, event=event_name, model_name=model_name, model_version=model_version,
                                bundle_digest=bundle_digest, detail=detail)])

    # --- reads ---
    def inspection(self, inspection_id: str) -> Inspection | None:
        with self.session() as session:
            return session.get(Inspection, inspection_id)

    def by_client_key(self, category: str, key: str) -> Inspection | None:
        with self.session() as session:
            return session.scalars(select(Inspection).where(Inspection.category == category, Inspection.client_key == key)).first()

    def latest_inspection(self, category: str) -> Inspection | None:
        with self.session() as session:
            query = select(Inspection).where(Inspection.category == category).order_by(Inspection.created_at.desc(), Inspection.id.desc())
            return session.scalars(query.limit(1)).first()

    def latest_threshold(self, category: str, bundle_digest: str) -> ThresholdVersion | None:
        with self.session() as session:
            query = (select(ThresholdVersion).where(ThresholdVersion.category == category, ThresholdVersion.bundle_digest == bundle_digest)
                     .order_by(ThresholdVersion.id.desc()))
            return session.scalars(query).first()

    def verdicts(self, inspection_id: str) -> list[Verdict]:
        with self.session() as session:
            return list(session.scalars(select(Verdict).where(Verdict.inspection_id == inspection_id).order_by(Verdict.id)))

    def review_queue(self, category: str | None = None, line: str | None = None, decision: str | None = None, pending_only: bool = True,
                     limit: int = 50) -> list[tuple[Inspection, Verdict | None]]:
        """Review and reject decisions, newest first, with their latest verdict (if any)."""
        with self.session() as session:
            latest = _latest_verdicts()
            query = (select(Inspection, Verdict).outerjoin(latest, latest.c.inspection_id == Inspection.id)
                     .outerjoin(Verdict, Verdict.id == latest.c.vid)
                     .where(Inspection.decision.in_([decision] if decision else ["review", "reject"])))
            if category:
                query = query.where(Inspection.category == category)
            if line:
                query = query.where(Inspection.line == line)
            if pending_only:
                query = query.where(Verdict.id.is_(None))
            query = query.order_by(Inspection.created_at.desc(), Inspection.id.desc()).limit(limit)
            return [(i, v) for i, v in session.execute(query).all()]

    def since(self, category: str, since: datetime) -> list[Inspection]:
        with self.session() as session:
            query = select(Inspection).where(Inspection.category == category, Inspection.created_at >= since).order_by(Inspection.created_at)
            return list(session.scalars(query))

    def verdict_counts(self, category: str, since: datetime) -> dict[str, int]:
        with self.session() as session:
            query = (select(Verdict.verdict, func.count()).join(Inspection, Inspection.id == Verdict.inspection_id)
                     .where(Inspection.category == category, Verdict.created_at >= since).group_by(Verdict.verdict))
            return {v: int(n) for v, n in session.execute(query).all()}

    def count(self, table: type[Base] = Inspection) -> int:
        with self.session() as session:
            return int(session.scalar(select(func.count()).select_from(table)))

    def unharvested(self, category: str) -> list[tuple[Inspection, Verdict]]:
        """Reviewed inspections of a category that no harvest has taken yet, with their latest
        verdict, oldest first."""
        with self.session() as session:
            latest = _latest_verdicts()
            query = (select(Inspection, Verdict).join(latest, latest.c.inspection_id == Inspection.id)
                     .join(Verdict, Verdict.id == latest.c.vid)
                     .outerjoin(HarvestedRecord, HarvestedRecord.inspection_id == Inspection.id)
                     .where(Inspection.category == category, HarvestedRecord.inspection_id.is_(None))
                     .order_by(Inspection.created_at, Inspection.id))
            return [(i, v) for i, v in session.execute(query).all()]

    def add_harvest(self, harvest: Harvest, records: list[HarvestedRecord]) -> None:
        """The harvest and every record it took, in one transaction: all of it or nothing."""
        self._write([harvest, *records])

    def harvests(self, category: str | None = None) -> list[Harvest]:
        return self._all(Harvest, Harvest.created_at, category)

    def events(self, category: str | None = None) -> list[ModelEvent]:
        return self._all(ModelEvent, ModelEvent.id, category)

    def _all(self, table: type[Harvest] | type[ModelEvent], order, category: str | None) -> list:
        with self.session() as session:
            query = select(table).order_by(order)
            if category:
                query = query.where(table.category == category)
            return list(session.scalars(query))


def _latest_verdicts():
    """Per reviewed inspection, the id of its latest verdict (the one that counts)."""
    return select(Verdict.inspection_id, func.max(Verdict.id).label("vid")).group_by(Verdict.inspection_id).subquery()


def start_of_day(now: datetime | None = None) -> datetime:
    now = now or utcnow()
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def hours_ago(hours: float) -> datetime:
    return utcnow() - timedelta(hours=hours)
