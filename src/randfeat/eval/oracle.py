"""The oracle: the only door an attack has to the model.

An attack never sees a model's parameters, gradients or modules. It sees an `Oracle`, which
holds the clean batch `x0` and labels `y` and answers queries with scores (score-based attacks)
or predicted labels (decision-based attacks). The oracle

* counts queries per sample (one forward of one image is one query; an EOT query that averages
  `samples` forwards is charged `samples`), and refuses to let any sample exceed its budget or
  be queried again after it has succeeded;
* splits forwards into batches of `batch_size` and runs them under `torch.no_grad`;
* decides success as the paper does (Definition 1 and appendix D.4): when a queried point inside
  the ε-ball says "misclassified", the point is judged with `votes` extra forwards, which are not
  charged as queries but are counted in `Oracle.verify_forwards`. `votes=1` is the "lucky attack"
  setting (Table 15): the query itself decides. A query the model's owner refuses
  ([QueryRefused][randfeat.eval.errors.QueryRefused]) is charged and not answered.

**The judging rule** lives here, in one function, [fooled][randfeat.eval.oracle.fooled]: a point
fools the randomized model when a strict majority of `votes` applications misclassify it. The
oracle's verification, [rejudge][randfeat.eval.oracle.rejudge], the clean rows of `randfeat eval`
([count_wrong][randfeat.eval.oracle.count_wrong]: a clean image is correct when it does not fool
the model at its own clean point) and the report all apply it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from randfeat.batches import repeated_rows
from randfeat.checks import check_choice, check_optional, check_positive_int
from randfeat.eval.errors import QueryRefused
from randfeat.eval.outcome import AttackResult
from randfeat.outputs import logits_of

Norm = Literal["linf", "l2"]
Output = Literal["scores", "labels"]
Model = Callable[[Tensor], Tensor]

__all__ = [
    "Model",
    "Norm",
    "Oracle",
    "Output",
    "count_wrong",
    "distance",
    "fooled",
    "independent_votes",
    "rejudge",
    "uncharged",
]


def distance(x: Tensor, x0: Tensor, norm: Norm) -> Tensor:
    """Per-sample distance `||x - x0||_p` in float64: `[N]`."""
    d = (x.double() - x0.double()).flatten(1)
    if norm == "linf":
        return d.abs().amax(dim=1)
    return d.norm(dim=1)


@overload
def fooled(wrong: int, votes: int) -> bool: ...
@overload
def fooled(wrong: Tensor, votes: int) -> Tensor: ...
def fooled(wrong: int | Tensor, votes: int) -> bool | Tensor:
    """The judging rule (Definition 1, appendix D.4): is a point a fooling point?

    A point fools the randomized model when a strict majority of `votes` independent applications
    of the model misclassify it: $2 \\cdot \text{wrong} > \text{votes}$. With 9 votes and three
    classes, votes split 4 (the true class) / 3 / 2 fool the model (5 of 9 are wrong), although the
    true class has the most votes; an even split (2 of 4) does not.

    Args:
        wrong: how many of the `votes` applications misclassified the point (an int or a tensor).
        votes: the number of applications.

    Returns:
        Whether the point fools the model (a bool, or a bool tensor like `wrong`).

    Examples:
        >>> fooled(5, 9), fooled(4, 9), fooled(2, 4), fooled(3, 4)
        (True, False, False, True)
    """
    return 2 * wrong > votes


def independent_votes(model: object, votes: int) -> int:
    """How many of `votes` forwards of one point are independent answers: `votes` under fresh noise,
    1 under keyed noise (`wrap(..., noise="keyed")`: a point's noise is a function of the point, so
    its forwards are one answer given `votes` times, and a point is fooled exactly when that answer
    is wrong). Looks through the `.module` of the harness's wrappers (`Forward`)."""
    for _ in range(8):
        if getattr(model, "noise", None) == "keyed":
            return 1
        model = getattr(model, "module", None)
    return votes


def uncharged(model: Model) -> Model:
    """The model the evaluator's own forwards go to: the D.4 verification of an apparent success
    and [rejudge][randfeat.eval.oracle.rejudge] are measurements, not the attacker's queries, so a
    model behind a stateful detector ([Guarded][randfeat.eval.guarded.Guarded]) names what it
    guards as `unguarded`, and these forwards bypass the detector (which sees the attacker's
    queries only: nine repeats of a point would otherwise be refused as duplicates). Any other
    model is its own."""
    inner = getattr(model, "unguarded", None)
    return inner if callable(inner) else model


def count_wrong(
    model: Model, x: Tensor, y: Tensor, *, votes: int, batch_size: int | None = None
) -> Tensor:
    """How many of `votes` independent forwards misclassify each point: `[N]` int64.

    `fooled(count_wrong(model, x, y, votes=votes), votes)` judges the points `x: [N, C, H, W]`
    by the rule; at the clean images it says which ones the model gets wrong (a clean image is
    correct when it is not fooled at its own clean point). The forwards are the rows of
    `x.repeat_interleave(votes)` in full calls of `batch_size` rows, gathered one call at a time
    ([repeated_rows][randfeat.batches.repeated_rows]); under keyed noise one forward answers for
    all `votes` (`independent_votes`).

    Raises:
        ValueError: `votes < 1` (or TypeError on a wrong type).
    """
    check_positive_int(votes, "votes")
    model = uncharged(model)
    n = x.shape[0]
    k = independent_votes(model, votes)
    pred = _predict_repeated(model, x, k, batch_size or max(1, n * k))
    wrong = pred != y.to(pred.device).repeat_interleave(k)
    return wrong.view(n, k).sum(dim=1) * (votes // k)


def _forward(model: Model, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        if x.shape[0] <= batch_size:
            return logits_of(model(x))
        return torch.cat([logits_of(model(chunk)) for chunk in x.split(batch_size)])


def _predict_repeated(model: Model, x: Tensor, times: int, batch_size: int) -> Tensor:
    """Predicted labels `[N * times]` of `times` forwards of each point, in full batches."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    preds = []
    with torch.no_grad():
        for rows in repeated_rows(x, times, batch_size):
            out = logits_of(model(rows))
            preds.append(out if out.ndim == 1 else out.argmax(dim=1))
    return torch.cat(preds)


class Oracle:
    """Query-counting, budget-enforcing access to a model for one batch of images.

    Args:
        model: any callable from `[n, C, H, W]` in `[0, 1]` to scores `[n, K]` (or labels
            `[n]` for decision attacks). Never inspected: no parameters, no gradients.
        x: `[N, C, H, W]` clean images in `[0, 1]`.
        y: `[N]` true labels (int64).
        budget: queries allowed per sample (`>= 1`).
        eps: radius of the threat ball; a point outside it can never count as a success.
        norm: `"linf"` or `"l2"`.
        votes: verification forwards per apparent success (`>= 1`; 1 = the query decides).
        output: what the attack may see: `"scores"` or `"labels"`.
        batch_size: forwards per model call (default: everything at once).
        samples: forwards averaged per query (EOT); each query is charged `samples`.

    Attributes:
        queries: `[N]` int64, queries charged so far per sample.
        success: `[N]` bool, verified success per sample.
        n_succeeded: verified successes so far, a host-side int: an attack that keeps its active
            samples gathered can re-gather only when this changes, without a device sync.
    """

    def __init__(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        *,
        budget: int,
        eps: float,
        norm: Norm,
        votes: int = 9,
        output: Output = "scores",
        batch_size: int | None = None,
        samples: int = 1,
    ) -> None:
        if not callable(model):
            raise TypeError(f"Expected argument `model` to be callable, but got {type(model)!r}.")
        check_optional(check_positive_int, batch_size, "batch_size")
        check_positive_int(samples, "samples")
        output = check_choice(output, "output", ("scores", "labels"))
        self._model = model
        self._judge = uncharged(model)
        self.refused: QueryRefused | None = None
        self.x0 = x
        self.y = y
        self.budget = int(budget)
        self.eps = float(eps)
        self.norm: Norm = norm
        self.votes = int(votes)
        self.output: Output = output
        self.samples = samples
        self.batch_size = batch_size or max(1, x.shape[0] * max(1, votes))
        n = x.shape[0]
        dev = x.device
        self.queries = torch.zeros(n, dtype=torch.long, device=dev)
        self.verify_forwards = torch.zeros(n, dtype=torch.long, device=dev)
        self.success = torch.zeros(n, dtype=torch.bool, device=dev)
        self.success_query = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.x_success = x.clone()
        self.num_classes: int | None = None
        self.n_succeeded = 0  # verified successes so far (a cheap host-side "active set changed")

    # ------------------------------------------------------------------ budget bookkeeping
    @property
    def n_calls(self) -> int:
        """How many queries (of `samples` forwards each) one sample may make in total."""
        return self.budget // self.samples

    @property
    def remaining(self) -> Tensor:
        """`[N]` int64: queries each sample may still make (0 once it has succeeded)."""
        left = (self.budget - self.queries) // self.samples
        return torch.where(self.success, torch.zeros_like(left), left)

    def active(self, need: int = 1) -> Tensor:
        """`[N]` bool: samples not yet fooled that can still afford `need` queries."""
        return self.remaining >= need

    # ------------------------------------------------------------------ the doors
    def scores(self, x: Tensor, idx: Tensor) -> Tensor:
        """Scores `[n, K]` (float32) for points `x: [n, C, H, W]` of samples `idx: [n]`.

        Charges one query (`samples` forwards) per row; rows of one sample may repeat.
        """
        if self.output != "scores":
            raise RuntimeError("This oracle answers labels only (decision-based attack).")
        return self._query(x, idx)

    def labels(self, x: Tensor, idx: Tensor) -> Tensor:
        """Predicted labels `[n]` (int64) for points `x` of samples `idx`; one query a row."""
        out = self._query(x, idx)
        return out if out.ndim == 1 else out.argmax(dim=1)

    # ------------------------------------------------------------------ internals
    def _raw(self, x: Tensor) -> Tensor:
        """One forward of every row; validated; scores as float32 or labels as int64."""
        out = _forward(self._model, x, self.batch_size)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Expected argument `model` to return a tensor, but it returned {type(out)!r}."
            )
        n = x.shape[0]
        if out.ndim == 1 and not out.is_floating_point():
            if self.output == "scores":
                raise TypeError(
                    "Expected argument `model` to return scores [n, K] for a score-based attack, "
                    f"but it returned labels of shape {tuple(out.shape)}. Use a decision-based "
                    "attack (RayS, SignFlip) with a label-only model."
                )
            if out.shape[0] != n:
                raise ValueError(f"Model returned {out.shape[0]} labels for {n} inputs.")
            return out.long().to(x.device)
        if out.ndim != 2 or out.shape[0] != n:
            raise ValueError(
                f"Expected argument `model` to return scores of shape [{n}, K], "
                f"but got shape {tuple(out.shape)}."
            )
        if not out.is_floating_point():
            raise TypeError(f"Expected float scores from `model`, got dtype {out.dtype}.")
        if not bool(torch.isfinite(out).all()):
            raise ValueError("Expected argument `model` to return finite scores, but got NaN/inf.")
        if self.num_classes is None:
            self.num_classes = out.shape[1]
            if bool((self.y >= self.num_classes).any()):
                raise ValueError(
                    f"Expected labels `y` in [0, {self.num_classes - 1}] (the model has "
                    f"{self.num_classes} classes), but got max label {int(self.y.max())}."
                )
        return out.float().to(x.device)

    def _judged(self, x: Tensor) -> Tensor:
        """One uncharged forward of every row, on the evaluator's side (`uncharged`)."""
        if self._judge is self._model:
            return self._raw(x)
        out = _forward(self._judge, x, self.batch_size)
        return out.long().to(x.device) if out.ndim == 1 else out.float().to(x.device)

    def _predict(self, out: Tensor) -> Tensor:
        return out if out.ndim == 1 else out.argmax(dim=1)

    def _query(self, x: Tensor, idx: Tensor) -> Tensor:
        idx = idx.to(device=self.x0.device, dtype=torch.long)
        if x.shape[0] != idx.shape[0] or x.shape[1:] != self.x0.shape[1:]:
            raise ValueError(
                f"Query of shape {tuple(x.shape)} with {idx.shape[0]} indices does not match "
                f"images of shape {tuple(self.x0.shape[1:])}."
            )
        if x.shape[0] == 0:
            return torch.empty(0, device=x.device)
        counts = torch.bincount(idx, minlength=self.x0.shape[0])
        if self.samples != 1:
            counts = counts * self.samples
        new_queries = self.queries + counts
        # One host sync for the contract (per-sample limits and [0, 1]); the message says what failed.
        limit = torch.where(self.success, self.queries, self.budget)  # a success spends no more
        lo, hi = torch.aminmax(x)
        bad = (new_queries > limit).any() | (lo < 0) | (hi > 1)
        if bool(bad):
            if bool((self.success & (counts > 0)).any()):
                raise RuntimeError("attack bug: queried a sample that has already succeeded")
            if bool((new_queries > self.budget).any()):
                raise RuntimeError("attack bug: a query would exceed the per-sample budget")
            raise RuntimeError("attack bug: queried a point outside [0, 1]")
        try:
            out = self._answer(x)
        except (
            QueryRefused
        ) as err:  # sent, not answered: the attacker pays for the rows all the same
            self.queries = new_queries
            self.refused = err
            raise
        self.queries = new_queries
        self._check_success(x, idx, self._predict(out))
        return out

    def _answer(self, x: Tensor) -> Tensor:
        if self.samples == 1:
            return self._raw(x)
        # EOT: full forward batches of the repeated rows, never the whole query at once
        raw = [self._raw(rows) for rows in repeated_rows(x, self.samples, self.batch_size)]
        if raw[0].ndim == 1:  # label-only model: average one-hot votes over a common K
            k = max(self.num_classes or 0, *(int(r.max()) + 1 for r in raw))
            raw = [torch.nn.functional.one_hot(r, k).float() for r in raw]
        return torch.cat(raw).view(x.shape[0], self.samples, -1).mean(dim=1)

    def _check_success(self, x: Tensor, idx: Tensor, pred: Tensor) -> None:
        # `_query` refuses rows of succeeded samples, so every row here belongs to an open sample
        wrong = pred != self.y[idx]
        if not bool(wrong.any()):
            return
        rows = wrong.nonzero().squeeze(1)  # the ball is checked on misclassified rows only
        rows = rows[distance(x[rows], self.x0[idx[rows]], self.norm) <= self.eps]
        if rows.numel() == 0:
            return
        # keep the first candidate row of each sample
        first = torch.full((self.x0.shape[0],), x.shape[0], dtype=torch.long, device=x.device)
        first.scatter_reduce_(0, idx[rows], rows, reduce="amin")
        rows = first[first < x.shape[0]]
        samp = idx[rows]
        pts = x[rows]
        if independent_votes(self._model, self.votes) == 1:  # the query was the one answer
            won_rows = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        else:
            votes = torch.cat(
                [
                    self._predict(self._judged(rows))
                    for rows in repeated_rows(pts, self.votes, self.batch_size)
                ]
            )
            wrong = votes != self.y[samp].repeat_interleave(self.votes)
            won_rows = fooled(wrong.view(-1, self.votes).sum(dim=1), self.votes)
            self.verify_forwards.index_add_(0, samp, torch.full_like(samp, self.votes))
        won = samp[won_rows]
        self.n_succeeded += int(won.numel())
        self.success[won] = True
        self.success_query[won] = self.queries[won]
        self.x_success[won] = pts[won_rows].to(self.x_success.dtype)

    def result(self, x_last: Tensor) -> AttackResult:
        """Package the run: verified points where successful, `x_last` elsewhere."""
        mask = self.success.view(-1, *([1] * (self.x0.ndim - 1)))
        x_adv = torch.where(mask, self.x_success, x_last.to(self.x0.dtype))
        return AttackResult(
            x_adv=x_adv,
            success=self.success.clone(),
            queries=self.queries.clone(),
            success_query=self.success_query.clone(),
            verify_forwards=self.verify_forwards.clone(),
            budget=self.budget,
            votes=self.votes,
            refused=self.refused is not None,
        )


def rejudge(
    model: Model,
    x_adv: Tensor,
    y: Tensor,
    *,
    votes: int = 9,
    forwards: int = 100,
    batch_size: int | None = None,
) -> Tensor:
    """Judge points afresh: the probability that the judging rule says "fooled" with new votes.

    The first verified success of an attack is biased toward lucky draws (the attack stops at the
    first point where `votes` draws happened to say "fooled"). This estimates, from `forwards`
    independent forwards per point, $p = P[\arg\\max f_{\text{rand}}(x_{\text{adv}}) \ne y]$ and
    returns the probability that [fooled][randfeat.eval.oracle.fooled] accepts `votes` new
    forwards, $P[2 \\cdot \text{Bin}(\text{votes}, p) > \text{votes}]$, per sample (`[N]`,
    float64). Its mean over samples is the expected fooling rate under a fresh verification.
    """
    check_positive_int(forwards, "forwards")
    check_positive_int(votes, "votes")
    model = uncharged(model)
    n, forwards = x_adv.shape[0], independent_votes(model, forwards)  # keyed noise: one answer
    pred = _predict_repeated(model, x_adv, forwards, batch_size or max(1, n * 10))
    p = (pred != y.to(pred.device).repeat_interleave(forwards)).view(n, forwards).double().mean(1)
    fooling = [k for k in range(votes + 1) if fooled(k, votes)]  # P[fooled] = Σ C(v,k) p^k q^(v-k)
    terms = [math.comb(votes, k) * p.pow(k) * (1 - p).pow(votes - k) for k in fooling]
    return torch.stack(terms).sum(0)
