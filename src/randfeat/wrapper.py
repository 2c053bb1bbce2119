"""The randomized feature defense (Algorithm 1): Gaussian noise on chosen hidden features.

.. math::

    z_i \\leftarrow h_i(z_{i-1}) + \\delta, \\qquad \\delta \\sim \\mathcal{N}(0, \\nu I)
    \\;\\text{or}\\; \\mathcal{N}(0, \\Sigma),\\ \\Sigma \\text{ diagonal}

:class:`RandomizedFeatureWrapper` attaches stateless hooks to the chosen modules of an existing model.
The hooks add noise **only while the wrapper's own forward runs**: calling the original model directly
still gives clean outputs. The wrapper copies no parameters, its ``state_dict`` has exactly the model's
keys, and :meth:`RandomizedFeatureWrapper.unwrap` removes every hook and returns the model as it was.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from randfeat.hooks import Hooks
from randfeat.layers import HookPoint, resolve_layers
from randfeat.noise import NoiseRNG, Variance, add_noise, check_feature, per_layer, sigma_for
from randfeat.outputs import logits_of

__all__ = ["RandomizedFeatureWrapper", "wrap"]

NuSpec = float | Tensor | Mapping[str, "float | Tensor"]
"""A variance for every layer, a diagonal Σ, or a mapping from layer spec to variance."""

_PREFIX = "model."


class _NoiseHook:
    """A picklable feature hook that adds noise at one point, only inside its wrapper's forward."""

    def __init__(self, wrapper: RandomizedFeatureWrapper, key: str) -> None:
        self.wrapper = wrapper
        self.key = key

    def __call__(self, feature: object) -> Tensor | None:
        w = self.wrapper
        if w._depth == 0:
            return None
        w._fired.add(self.key)
        feature = check_feature(feature, self.key)
        if not w._noise_on:
            return feature
        return w._perturb(self.key, feature)


class RandomizedFeatureWrapper(nn.Module):
    """A model with Gaussian noise added to chosen hidden features at every forward (Algorithm 1).

    Args:
        model: any ``nn.Module`` (timm CNNs and ViTs, ``nn.Sequential``, ...). Not copied.
        layers: layer specs (see :mod:`randfeat.layers`): module names (their output), ``"<name>.pre"``
            (their input), ``"penultimate"`` (the classifier's input) or ``"input"`` (the RND baseline).
            Each layer draws its own independent noise.
        nu: the variance ν of ``δ ~ N(0, ν I)``: a float, a tensor Σ of per-feature variances that
            broadcasts to the feature shape without the batch dimension, or a mapping from layer spec
            to either. ``0`` is the identity, bit for bit.
        seed: ``None`` seeds the noise from OS entropy (unpredictable: the secure default); an int or
            a ``torch.Generator`` makes the noise reproducible.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is already a wrapper.
        ValueError: unknown or duplicate layer specs (with the closest valid names), bad ``nu``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = ("penultimate",),
        nu: NuSpec = 0.01,
        seed: int | torch.Generator | None = None,
    ) -> None:
        if isinstance(model, RandomizedFeatureWrapper):
            raise TypeError(
                "Expected argument `model` to be a plain nn.Module, but it is already a "
                "RandomizedFeatureWrapper. Wrappers do not nest: call `.unwrap()` first and wrap "
                "the model once with every layer, e.g. wrap(model, layers=['a', 'b'], nu={...})."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
            )
        super().__init__()
        points = resolve_layers(model, layers)  # raises before anything is attached
        self.model = model
        self._points: list[HookPoint] = points
        self._has_input = any(p.key == "input" for p in points)
        self._rng = NoiseRNG(seed)
        self._depth = 0
        self._noise_on = True
        self._fired: set[str] = set()
        self._sigma_cache: dict[tuple[Any, ...], float | Tensor] = {}
        self._nu_given: NuSpec = 0.0
        self._nu: dict[str, Variance] = {}
        self.nu = nu
        self._hooks = Hooks()
        try:
            for p in points:
                if p.key != "input":  # the wrapper perturbs its own input in forward()
                    self._hooks.attach(p.module, _NoiseHook(self, p.key), pre=p.where == "input")
        except BaseException:
            self._hooks.remove()
            raise
        self._hooks.add(self.register_state_dict_post_hook(_strip_prefix))
        self._hooks.add(self.register_load_state_dict_pre_hook(_add_prefix))

    # ------------------------------------------------------------------ configuration
    @property
    def layers(self) -> list[str]:
        """The canonical names of the perturbed points (``"head.pre"``, ``"input"``, ...)."""
        return [p.key for p in self._points]

    @property
    def nu(self) -> NuSpec:
        """The variance(s) as last set; assign to change them (validated like the constructor)."""
        return self._nu_given

    @nu.setter
    def nu(self, value: NuSpec) -> None:
        keys = [p.key for p in self._points]
        specs = [p.spec for p in self._points]
        self._nu = per_layer(value, keys, specs)
        self._nu_given = value
        self._sigma_cache.clear()

    @property
    def seeded(self) -> bool:
        """Whether the noise stream was seeded by the caller (reproducible) or by OS entropy."""
        return self._rng.seeded

    def manual_seed(self, seed: int) -> RandomizedFeatureWrapper:
        """Restart the noise stream from ``seed`` (reproducible from here on)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected argument `seed` to be an int, but got {seed!r}.")
        self._rng.reseed(seed)
        return self

    @contextlib.contextmanager
    def noise_disabled(self) -> Iterator[RandomizedFeatureWrapper]:
        """Context manager: clean outputs through the wrapper, noise restored on exit."""
        before = self._noise_on
        self._noise_on = False
        try:
            yield self
        finally:
            self._noise_on = before

    # ------------------------------------------------------------------ forward
    def _perturb(self, key: str, feature: Tensor) -> Tensor:
        nu = self._nu[key]
        if not isinstance(nu, Tensor) and nu == 0.0:
            return feature
        ck = (key, feature.device, feature.dtype, feature.shape[1:])
        sigma = self._sigma_cache.get(ck)
        if sigma is None:  # first use on this device / dtype / shape: validate and move once
            sigma = sigma_for(nu, feature, key)
            self._sigma_cache[ck] = sigma
        return add_noise(feature, sigma, self._rng.generator(feature.device))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The noisy forward: ``model(x)`` with noise at every wrapped point."""
        if not self._hooks:
            raise RuntimeError("This wrapper was unwrapped; wrap the model again to use it.")
        self._fired = set()
        self._depth += 1
        try:
            if self._has_input:
                self._fired.add("input")
                x = check_feature(x, "input")
                if self._noise_on:
                    x = self._perturb("input", x)
            out = self.model(x, *args, **kwargs)
        finally:
            self._depth -= 1
        if self._depth == 0 and len(self._fired) != len(self._points):
            missing = [k for k in self.layers if k not in self._fired]
            raise RuntimeError(
                f"Layer(s) {missing} were never reached in the model's forward, so no noise was "
                "added there. Choose layers that the forward pass actually calls."
            )
        return out

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        votes: int = 9,
        *,
        reduce: Literal["vote", "mean"] = "vote",
        batch_size: int | None = None,
    ) -> Tensor:
        """The randomized model's prediction (Definition 1, appendix D.4): ``[N]`` int64 labels.

        ``reduce="vote"`` returns the label most of ``votes`` independent noisy forwards give, ties
        broken toward the class with the higher mean logit; ``reduce="mean"`` returns the argmax of
        the mean logits. No Python loop over samples.

        Raises:
            ValueError: ``votes < 1``, an unknown ``reduce``, or outputs that are not ``[N, K]``.
        """
        if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
            raise ValueError(f"Expected argument `votes` to be an int >= 1, but got {votes!r}.")
        if reduce not in ("vote", "mean"):
            raise ValueError(
                f"Expected argument `reduce` to be 'vote' or 'mean', but got {reduce!r}."
            )
        n = x.shape[0]
        rep = x.repeat_interleave(votes, dim=0) if votes > 1 else x
        bs = batch_size or rep.shape[0]
        logits = torch.cat([logits_of(self(chunk)) for chunk in rep.split(bs)])
        if logits.ndim != 2 or logits.shape[0] != n * votes:
            raise ValueError(
                f"Expected the model to return logits [N, K], got {tuple(logits.shape)}."
            )
        logits = logits.view(n, votes, -1).float()
        mean = logits.mean(dim=1)
        if reduce == "mean":
            return mean.argmax(dim=1)
        counts = torch.nn.functional.one_hot(logits.argmax(dim=2), logits.shape[2]).sum(dim=1)
        top = counts == counts.amax(dim=1, keepdim=True)
        return mean.masked_fill(~top, float("-inf")).argmax(dim=1)

    # ------------------------------------------------------------------ detaching
    def unwrap(self) -> nn.Module:
        """Remove every hook and return the model, which then behaves exactly as before."""
        self._hooks.remove()
        return self.model

    def extra_repr(self) -> str:
        layers = ", ".join(p.describe() for p in self._points)
        nu = self._nu_given
        nu_s = f"Σ{list(nu.shape)}" if isinstance(nu, Tensor) else repr(nu)
        src = "seeded" if self.seeded else "os-entropy"
        return f"layers=[{layers}], nu={nu_s}, noise={src}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sigma_cache"] = {}
        return state


def _strip_prefix(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    """state_dict post-hook: ``<prefix>model.<k>`` -> ``<prefix><k>`` (the model's own keys)."""
    full = prefix + _PREFIX
    keys = [k for k in state if k.startswith(full)]
    moved = OrderedDict((prefix + k[len(full) :], state.pop(k)) for k in keys)
    state.update(moved)
    md = getattr(state, "_metadata", None)
    if md is not None:
        for k in [k for k in md if k == full[:-1] or k.startswith(full)]:
            md[prefix + k[len(full) :]] = md.pop(k)


def _add_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: accept the model's own keys (and prefixed ones)."""
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state[prefix + _PREFIX + k[len(prefix) :]] = state.pop(k)


def wrap(
    model: nn.Module,
    layers: str | Sequence[str] = ("penultimate",),
    nu: NuSpec = 0.01,
    *,
    seed: int | torch.Generator | None = None,
) -> RandomizedFeatureWrapper:
    """Wrap ``model`` with the randomized feature defense; see :class:`RandomizedFeatureWrapper`.

    Example:
        >>> import timm, randfeat
        >>> model = timm.create_model("resnet18", pretrained=False).eval()
        >>> defended = randfeat.wrap(model, layers=["penultimate"], nu=0.05)
        >>> defended  # doctest: +ELLIPSIS
        RandomizedFeatureWrapper(
          layers=[penultimate -> fc.pre], nu=0.05, noise=os-entropy
          ...
    """
    return RandomizedFeatureWrapper(model, layers, nu, seed)
