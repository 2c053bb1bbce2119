"""The records of a result file: typed, frozen, each with `to_json` and `from_json`.

A result file of `randfeat eval` (JSON Lines, see [randfeat.eval.results.file][]) holds one
[Header][randfeat.eval.results.records.Header], then one [CleanRow][randfeat.eval.results.records.CleanRow] per
(attacked image, defense) and one [AttackRow][randfeat.eval.results.records.AttackRow] per (attacked
image, defense, attack, budget). Every module that writes or reads the file goes through these
classes, so a field is named in one place. The documentation of each field (the `Attributes`
sections below) is also the file's schema in `docs/evaluation.md`; a test regenerates that schema
from the docstrings and fails when they disagree.

Each record is a [Record][randfeat.eval.results.codec.Record]: `to_json` gives a JSON-ready `dict`
and `from_json` checks every field's presence and type, raising
[ReportError][randfeat.eval.errors.ReportError] naming the field otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from randfeat.eval.errors import ReportError
from randfeat.eval.oracle import fooled
from randfeat.eval.results.codec import Record, brief

__all__ = [
    "AttackInfo",
    "AttackRow",
    "CalibratedDefense",
    "CleanRow",
    "DataInfo",
    "DetectionInfo",
    "DetectionRow",
    "Header",
    "ModelInfo",
    "Radii",
    "Row",
    "Unit",
    "WorkloadRate",
    "row_from_json",
]


# ---------------------------------------------------------------------------- the header
@dataclass(frozen=True)
class Radii(Record):
    """The radii ε of the run.

    Attributes:
        linf: ℓ∞ radius used by the ℓ∞ attacks.
        l2: ℓ2 radius used by the ℓ2 attacks.
        source: where they came from: `"user"`, `"paper default"`, `"digits default"` (the data
            set's name), or `"... (partly user)"`.
    """

    linf: float
    l2: float
    source: str


@dataclass(frozen=True)
class DataInfo(Record):
    """The pool of images the run drew from.

    Attributes:
        name: the data set (`digits`, `cifar10`, `imagenet`).
        path: its local path (`null` for embedded data).
        pool_size: images in the pool.
        classes: distinct labels in the pool.
        image_shape: `[C, H, W]` of one image as the model sees it.
    """

    name: str
    path: str | None
    pool_size: int
    classes: int
    image_shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo(Record):
    """The attacked model.

    Attributes:
        name: the `--model` name (with `--target`, the served model's name).
        parameters: number of parameters (0 for a served model: not known to the client).
        outputs: number of classes `K` it scores.
        image_size: the image side the data was resized to (`null`: the data's own).
        served: with `--target`, the server's `GET /v1/info` at the start of the run (absent
            otherwise).
    """

    name: str
    parameters: int
    outputs: int
    image_size: int | None
    served: Mapping[str, object] | None = None


@dataclass(frozen=True)
class AttackInfo(Record):
    """One attack of the grid as it was built.

    Attributes:
        norm: `"linf"` or `"l2"`.
        eps: its radius.
        repr: the attack object with every hyperparameter (`repr`).
    """

    norm: Literal["linf", "l2"]
    eps: float
    repr: str


@dataclass(frozen=True)
class CalibratedDefense(Record):
    """ν of one randomized defense, calibrated on the held-out images.

    Attributes:
        kind: `"input"` (RND) or `"feature"`.
        layers: the layer specs the noise is added at (`["input"]` for RND).
        target_drop: the clean-accuracy drop ν was calibrated to.
        nu: the noise variance ν.
        base_accuracy: the undefended model's accuracy on the calibration images.
        accuracy: the defended model's accuracy there (mean over noise draws).
        drop: `base_accuracy - accuracy`.
        n_images: calibration images.
        draws: noise draws per calibration image.
        stopped: why the search stopped (see `randfeat.calibrate_nu`).
        path: how calibration evaluated the candidates (`Calibration.path`): `"projected"`
            (noise projected to the logits once, a linear head), `"head"` (the head re-run on
            cached noisy features) or `"full"` (noisy forwards of the whole model).
        seed: the calibration's seed.
        wall_time_s: seconds the calibration took (a timing field).
    """

    kind: str
    layers: tuple[str, ...]
    target_drop: float
    nu: float
    base_accuracy: float
    accuracy: float
    drop: float
    n_images: int
    draws: int
    stopped: str
    path: Literal["projected", "head", "full"]
    seed: int
    wall_time_s: float


@dataclass(frozen=True)
class WorkloadRate(Record):
    """One benign workload ([randfeat.eval.workloads][]) streamed through the run's detector,
    after the benign history, under an account of its own.

    Attributes:
        queries: queries the workload sent.
        flagged: how many the detector flagged (the false positives).
        first_flag: the query index (1-based) of the first flag, `-1` if none.
    """

    queries: int
    flagged: int
    first_flag: int

    @property
    def rate(self) -> float:
        """The false-positive rate `flagged / queries`."""
        return self.flagged / self.queries if self.queries else 0.0


@dataclass(frozen=True)
class DetectionInfo(Record):
    """The stateful detector in front of every defense (`--detect`), as the run built it.

    Attributes:
        name: the detector (a key of `randfeat.detect.DETECTORS`).
        repr: the detector with every setting (`repr`; its key is never shown).
        threshold: the threshold calibrated on the benign history.
        target_fpr: the benign false-positive rate it was calibrated to (`--detect-fpr`).
        on_detect: `"reject"`, `"ban"` or `"log"` (the server's semantics).
        ban_after: flagged queries after which `ban` refuses the key.
        accounts: API keys the attacker spreads its queries over (`--accounts`; > 1: sybil).
        seed: the detector's key seed (reproducible runs; a server draws its key from OS entropy).
        history_indices: dataset indices of the benign images the detector saw before every
            attacked image (its calibration images, also stored as earlier traffic).
        workload_indices: dataset indices the benign workloads were built from (disjoint from
            the history and the attacked images).
        workloads: workload name → its false positives.
    """

    name: str
    repr: str
    threshold: float
    target_fpr: float
    on_detect: Literal["reject", "ban", "log"]
    ban_after: int
    accounts: int
    seed: int
    history_indices: tuple[int, ...]
    workload_indices: tuple[int, ...]
    workloads: Mapping[str, WorkloadRate]


@dataclass(frozen=True)
class Header(Record):
    """The first line of a result file: everything needed to read, resume and reproduce it.

    Attributes:
        format: `"randfeat-eval"`.
        format_version: the version of this layout (see `randfeat.eval.results.file.FORMAT_VERSION`).
        config: every setting of [EvalConfig][randfeat.eval.grid.config.EvalConfig], resolved
            (lists for tuples).
        settings_not_compared: settings ignored when resuming (they do not change results).
        versions: randfeat, torch, timm and python versions.
        device: the device of rank 0 (e.g. `"cpu"`, `"cuda:0 (NVIDIA H100)"`).
        world_size: ranks that wrote the file first.
        created: UTC time the header was written, ISO 8601.
        eps: the radii used, and where they came from.
        data: the pool of images.
        model: the attacked model.
        defenses: defense names: `base`, `aaa`, `input@<drop>`, `feature@<drop>`; `served` with `--target`.
        attacks: attack name → how it was built.
        calibration: defense name → its calibrated ν (randomized defenses only).
        attacked_indices: dataset indices attacked, in chunk order.
        calibration_indices: dataset indices used for calibration (disjoint from the attacked).
        n_attacked: attacked images.
        n_calibration: calibration images.
        n_chunks: chunks of `batch_size` attacked images.
        rows_expected: clean + attack rows in a complete file.
        detection: the detector in front of the model (`--detect`; absent without).
    """

    TYPE: ClassVar[str | None] = "header"

    format: str
    format_version: int
    config: Mapping[str, object]
    settings_not_compared: tuple[str, ...]
    versions: Mapping[str, str]
    device: str
    world_size: int
    created: str
    eps: Radii
    data: DataInfo
    model: ModelInfo
    defenses: tuple[str, ...]
    attacks: Mapping[str, AttackInfo]
    calibration: Mapping[str, CalibratedDefense]
    attacked_indices: tuple[int, ...]
    calibration_indices: tuple[int, ...]
    n_attacked: int
    n_calibration: int
    n_chunks: int
    rows_expected: int
    detection: DetectionInfo | None = None

    def setting(self, name: str) -> object:
        """The configuration setting `name` as written (None when absent)."""
        return self.config.get(name)


# ---------------------------------------------------------------------------- rows
@dataclass(frozen=True, order=True)
class Unit:
    """A unit of work: one chunk of attacked images under one defense (clean rows) or under one
    (defense, attack, budget) (attack rows). Rows are written one whole unit at a time.

    Attributes:
        kind: `"clean"` or `"attack"`.
        defense: the defense name.
        attack: the attack name (`None` for clean units).
        budget: the query budget (`None` for clean units).
        chunk: chunk `c` holds `attacked_indices[c * batch_size:(c + 1) * batch_size]`.
    """

    kind: Literal["clean", "attack"]
    defense: str
    attack: str | None
    budget: int | None
    chunk: int

    @property
    def group(self) -> tuple[str, str, str | None, int | None]:
        """The unit without its chunk: one (defense, attack, budget) cell of the table."""
        return (self.kind, self.defense, self.attack, self.budget)


@dataclass(frozen=True)
class CleanRow(Record):
    """One attacked image under one defense, without attack: is the clean image fooled?

    The image is correct when it does not fool the model at its own clean point: when no strict
    majority of the `votes` forwards misclassify it ([fooled][randfeat.eval.oracle.fooled], the
    rule the attacks are judged by). `correct` is that verdict, derived from the two counts.

    Attributes:
        image: dataset index.
        label: true label.
        defense: defense name.
        votes: forwards that judged the clean image (the run's `votes` for a randomized defense,
            1 for a deterministic one).
        wrong_votes: how many of them misclassified it.
        chunk: the chunk of the unit that wrote the row.
        seconds: wall time of the whole unit (a timing field).
    """

    TYPE: ClassVar[str | None] = "clean"

    image: int
    label: int
    defense: str
    votes: int
    wrong_votes: int
    chunk: int
    seconds: float

    @property
    def correct(self) -> bool:
        """The clean image is not fooled: `not fooled(wrong_votes, votes)`."""
        return not fooled(self.wrong_votes, self.votes)

    @property
    def unit(self) -> Unit:
        """The unit that wrote this row."""
        return Unit("clean", self.defense, None, None, self.chunk)


@dataclass(frozen=True)
class DetectionRow(Record):
    """What the detector saw of one attacked image (`--detect`): the attack ran on the image
    alone, under API keys of its own, its queries in front of the detector.

    Attributes:
        first_flag: the query index (1-based, rejected queries included) of the first flagged
            query, `-1` if none.
        flagged: queries flagged.
        benign_flags: flags whose closest earlier query was a stored benign image (not the
            attacker's own query).
        rejected: queries refused (`reject`, `ban`), answered neither to the attack nor judged.
        refused: the attack's search ended on a refusal (a plain attack meeting a 403; an
            adaptive attack ends only when it gives up or is banned).
        seen_by: `"detector"` (in process, `--detect`: every flag is known) or `"client"`
            (`--target` against a detecting server: only refusals are seen, so `first_flag` is
            the first refused query, `flagged` the refused rows the server named, and
            `benign_flags` 0; a server that logs refuses nothing).
    """

    first_flag: int
    flagged: int
    benign_flags: int
    rejected: int
    refused: bool
    seen_by: Literal["detector", "client"] = "detector"


@dataclass(frozen=True)
class AttackRow(Record):
    """One attacked image under one (defense, attack, budget).

    Attributes:
        image: dataset index.
        label: true label.
        defense: defense name.
        attack: attack name (a key of `randfeat.eval.ATTACKS`).
        budget: queries allowed.
        eps: the attack's radius.
        norm: `"linf"` or `"l2"`.
        success: a queried point inside the ε-ball fooled the model, verified by the judging rule
            (a strict majority of `votes` forwards misclassify it, appendix D.4).
        queries: queries spent (until success, or all).
        success_query: query count at the first verified success, `-1` if none.
        verify_forwards: the uncharged verification forwards.
        fresh: the probability that a fresh majority of `votes` forwards is fooled at the
            returned point (`randfeat.eval.oracle.rejudge`; exactly 0 or 1 for deterministic
            defenses).
        dist: distance of the returned point from the clean image, in `norm`.
        chunk: the chunk of the unit that wrote the row.
        seconds: wall time of the whole unit (a timing field).
        detection: what the detector saw (`--detect`; absent without). With `reject` or `ban`,
            `success` is the success of the attack continuing after refusals as far as it
            does, and `queries` includes the refused queries.
    """

    TYPE: ClassVar[str | None] = "attack"

    image: int
    label: int
    defense: str
    attack: str
    budget: int
    eps: float
    norm: Literal["linf", "l2"]
    success: bool
    queries: int
    success_query: int
    verify_forwards: int
    fresh: float
    dist: float
    chunk: int
    seconds: float
    detection: DetectionRow | None = None

    @property
    def undetected(self) -> bool:
        """The attack succeeded before its first flag (always, without detection)."""
        d = self.detection
        return self.success and (d is None or d.first_flag < 0 or self.success_query < d.first_flag)

    @property
    def unit(self) -> Unit:
        """The unit that wrote this row."""
        return Unit("attack", self.defense, self.attack, self.budget, self.chunk)


Row = Union[CleanRow, AttackRow]  # noqa: UP007 - a runtime alias, also for Python 3.10
"""A row of a result file."""

_ROWS: dict[object, type[CleanRow] | type[AttackRow]] = {"clean": CleanRow, "attack": AttackRow}


def row_from_json(data: object) -> Row:
    """The row `data` describes, by its `"type"`.

    Raises:
        ReportError: not an object, an unknown `"type"`, or a bad field.
    """
    kind = data.get("type") if isinstance(data, Mapping) else None
    cls = _ROWS.get(kind)
    if cls is None:
        raise ReportError(f"Expected a row of type 'clean' or 'attack', but got {brief(data)}.")
    return cls.from_json(data)
