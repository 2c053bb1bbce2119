"""What a server serves ([ModelCard][randfeat.serve.config.ModelCard]) and how
([ServeOptions][randfeat.serve.config.ServeOptions]): the typed form of `randfeat serve`'s options.

Both are validated when they are made, so a bad option fails before a model is loaded or a port is
opened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from randfeat.serve.protocol import Output, ServerInfo

__all__ = ["ModelCard", "ServeOptions"]


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected `{name}` to be an int >= 1{extra}, but got {value!r}.")


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
    """

    name: str
    input_shape: tuple[int, int, int]
    classes: int
    defended: bool
    defense: str = "base"
    layers: tuple[str, ...] = ()
    nu: float | None = None

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.input_shape
        ):
            raise ValueError(
                f"Expected `input_shape` to be (C, H, W) of ints >= 1, got {self.input_shape!r}."
            )
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"Expected `classes` to be an int >= 2, got {self.classes!r}.")


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

    def __post_init__(self) -> None:
        if self.output not in ("scores", "labels"):
            raise ValueError(f"Expected `output` to be 'scores' or 'labels', got {self.output!r}.")
        _positive_int("max_batch", self.max_batch)
        _positive_int("max_images", self.max_images)
        _positive_int("max_queries_per_key", self.max_queries_per_key, allow_none=True)
        for name in ("max_wait_ms", "max_body_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Expected `{name}` to be a finite number, got {v!r}.")
        if self.max_wait_ms < 0:
            raise ValueError(f"Expected `max_wait_ms` to be >= 0, got {self.max_wait_ms!r}.")
        if self.max_body_mb <= 0:
            raise ValueError(f"Expected `max_body_mb` to be > 0, got {self.max_body_mb!r}.")
        if self.api_keys is not None and not self.api_keys:
            raise ValueError("Expected `api_keys` to hold at least one key, or None for any key.")
        if self.admin_key is not None and not self.admin_key:
            raise ValueError("Expected `admin_key` to be a non-empty string or None.")

    @property
    def max_body_bytes(self) -> int:
        """The body limit in bytes."""
        return int(self.max_body_mb * 2**20)

    def info(self, card: ModelCard, version: str) -> ServerInfo:
        """The `GET /v1/info` record: the card, revealed only if `reveal_config`."""
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
        )
        return full if self.reveal_config else full.public()
