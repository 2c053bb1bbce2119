"""What a server serves ([ModelCard][randfeat.serve.config.ModelCard]) and how
([ServeOptions][randfeat.serve.config.ServeOptions], with
[DetectOptions][randfeat.serve.config.DetectOptions] for query detection): the typed form of
`randfeat serve`'s options.

Both are validated when they are made, so a bad option fails before a model is loaded or a port is
opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from randfeat.checks import (
    check_choice,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_float,
    check_positive_int,
    expected,
)
from randfeat.keyed import NoiseKind
from randfeat.serve.protocol import Output, ServerInfo

__all__ = ["ON_DETECT", "DetectOptions", "ModelCard", "OnDetect", "ServeOptions"]

OnDetect = Literal["reject", "ban", "log"]
"""What a flagged query gets: refused, refused and counted toward a ban, or answered and logged."""
ON_DETECT: tuple[OnDetect, ...] = ("reject", "ban", "log")


@dataclass(frozen=True)
class ModelCard:
    """What the served model is: the facts `GET /v1/info` is built from.

    Attributes:
        name: the model's name, e.g. `"digits-cnn"`.
        input_shape: `(C, H, W)` of one image in $[0, 1]$.
        classes: number of classes $K$.
        defended: whether the model adds randomized noise.
        defense: `"base"`, `"input"` (RND) or `"feature"`, or another name.
        layers: the perturbed layers.
        nu: the variance ν (a scalar; `None` for a diagonal Σ or no defense).
        noise: `"fresh"` (a new draw at every query) or `"keyed"` (a function of a secret key
            and the image: `randfeat.wrap(..., noise="keyed")`).
    """

    name: str
    input_shape: tuple[int, int, int]
    classes: int
    defended: bool
    defense: str = "base"
    layers: tuple[str, ...] = ()
    nu: float | None = None
    noise: NoiseKind = "fresh"

    def __post_init__(self) -> None:
        check_choice(self.noise, "noise", ("fresh", "keyed"))
        if len(self.input_shape) != 3:
            raise ValueError(expected("input_shape", "(C, H, W)", self.input_shape))
        for i, side in enumerate(self.input_shape):
            check_positive_int(side, f"input_shape[{i}]")
        check_int(self.classes, "classes", low=2)


@dataclass(frozen=True)
class DetectOptions:
    """What the server does with the verdicts of its query detector (`randfeat serve --detect`).

    Every row of every request is observed (fingerprinted, compared with every earlier query of
    every key, and stored) before the model answers; what a flagged row changes:

    Attributes:
        on_detect: `"reject"`: the request is refused whole with 403 `query_flagged` and the
            flagged rows' indices (its rows stay recorded and charged). `"ban"`: the same, and
            once a key has had `ban_after` queries flagged, every later request of that key gets
            403 `key_banned` (the count lives in the detector's store: every worker and, with a
            persistent store, a restart see it). `"log"`: answered as usual, counted and logged,
            so the attacker gets no signal.
        ban_after: flagged queries (images) after which `"ban"` refuses a key, `>= 1`.
        fail_open: when the detector's store fails, answer without checking (and log it)
            instead of the default 503 `detector_unavailable`.
        retry_after_s: the `Retry-After` of that 503, and the seconds the server waits before
            it tries a failed store again (it recovers by itself when the store is back).
    """

    on_detect: OnDetect = "reject"
    ban_after: int = 10
    fail_open: bool = False
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        check_choice(self.on_detect, "on_detect", ON_DETECT)
        check_positive_int(self.ban_after, "ban_after")
        check_positive_int(self.retry_after_s, "retry_after_s")
        if not isinstance(self.fail_open, bool):
            raise TypeError(expected("fail_open", "a bool", self.fail_open))


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers (every `randfeat serve` option but the model, host and port).

    Attributes:
        output: `"scores"` (the logits) or `"labels"` (the argmax only: decision-based attacks).
        max_batch: the most images merged into one forward (1 turns micro-batching off).
        max_wait_ms: how long a request waits for others to share its forward.
        max_images: the most images in one request (more: 413).
        max_body_mb: the largest request body in MiB (more: 413).
        max_queries_per_key: images one key may have answered, `None` for no limit (more: 429).
        api_keys: the keys allowed to query (others: 401); `None` accepts any key, or none, and
            counts each key separately (a client can then change keys to escape its limit).
        admin_key: the key that may read `GET /v1/usage` (`None`: the endpoint is off).
        usage_db: an SQLite file for the per-key counts (shared by workers, kept across
            restarts); `None` keeps them in memory.
        reveal_config: tell the defense's layers and ν in `GET /v1/info` (off: an attacker
            should not learn the noise scale from the API).
        device: where the model runs, e.g. `"cpu"` or `"cuda:0"`.
        detect: what to do with the query detector's verdicts; `None` for the defaults of
            [DetectOptions][randfeat.serve.config.DetectOptions] when a detector is given.
    """

    output: Output = "scores"
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_images: int = 256
    max_body_mb: float = 100.0
    max_queries_per_key: int | None = None
    api_keys: frozenset[str] | None = None
    admin_key: str | None = field(default=None, repr=False)
    usage_db: str | None = None
    reveal_config: bool = False
    device: str = "cpu"
    detect: DetectOptions | None = None

    def __post_init__(self) -> None:
        check_choice(self.output, "output", ("scores", "labels"))
        if self.detect is not None and not isinstance(self.detect, DetectOptions):
            raise TypeError(expected("detect", "DetectOptions or None", self.detect))
        check_positive_int(self.max_batch, "max_batch")
        check_positive_int(self.max_images, "max_images")
        check_optional(check_positive_int, self.max_queries_per_key, "max_queries_per_key")
        check_nonnegative_float(self.max_wait_ms, "max_wait_ms")
        check_positive_float(self.max_body_mb, "max_body_mb")
        if self.api_keys is not None and not self.api_keys:
            raise ValueError(
                expected(
                    "api_keys", "a set of at least one key, or None for any key", self.api_keys
                )
            )
        if self.admin_key is not None and not self.admin_key:
            raise ValueError(expected("admin_key", "a non-empty string or None", "''"))

    @property
    def max_body_bytes(self) -> int:
        """The body limit in bytes."""
        return int(self.max_body_mb * 2**20)

    def info(self, card: ModelCard, version: str, detector: str | None = None) -> ServerInfo:
        """The `GET /v1/info` record: the card, revealed only if `reveal_config`.

        Args:
            card: the served model.
            version: the server's randfeat version.
            detector: the name of the query detector, `None` without detection.
        """
        on_detect = (self.detect or DetectOptions()).on_detect if detector is not None else None
        full = ServerInfo(
            model=card.name,
            input_shape=card.input_shape,
            classes=card.classes,
            output=self.output,
            defended=card.defended,
            max_images=self.max_images,
            max_body_bytes=self.max_body_bytes,
            defense=card.defense,
            layers=card.layers,
            nu=card.nu,
            version=version,
            detection=detector is not None,
            keyed_noise=card.noise == "keyed",
            detector=detector,
            on_detect=on_detect,
        )
        return full if self.reveal_config else full.public()
