"""The one registry of scoring methods. Every method: higher score = more in-distribution.

A method is a :class:`ScoreMethod`: its formula, what it needs (the input gradient, the
penultimate features ``h``, a fit of the reference set), its one hyperparameter (default and the
grid ``tune`` searches) and ``from_pass(p, value)``, the score from one
:class:`~odin_engine.detectors.passes.ScoringPass` — the forward (+ ODIN's backward and
perturbed forward) that already runs. The math lives in :mod:`odin_engine.detectors`
(``logit``, ``shaping``, ``distance``) and :mod:`odin_engine.odin`.

``fn(model, x, std, *, temperature, epsilon, energy_temperature, head=None, fit=None)`` scores
a normalized batch on its own (one pass) — the same numbers as the scorer's column.

:data:`TABLE_METHODS` — the methods registered here, in this order — are the score columns of
the score table (:mod:`odin_engine.io.scores`). This module imports torch only when a method is
*called*, so the decision stage (schema, calibration, flagging) reads the list without torch.

Bring your own detector: ``register(ScoreMethod(name, formula, needs_input_gradient=False,
from_pass=lambda p, v: …, needs_features=True))``; ``OdinScorer(..., methods=[name])`` and
``odin_engine.decide.comparison`` then compute and compare it like the built-ins (methods
registered after import are not score-table columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Param:
    """A method's one hyperparameter: its name, default and the grid ``tune`` compares."""

    name: str
    default: Any
    grid: tuple = ()


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    formula: str
    needs_input_gradient: bool
    fn: Callable[..., Any] | None = None
    from_pass: Callable[[Any, Any], Any] | None = None
    needs_features: bool = False
    needs_fit: bool = False
    param: Param | None = None
    citation: str = ""
    #: costs a pass of its own (AdaSCALE: a forward on its perturbed input): not in the default set,
    #: computed only when named (``methods=[…]``/``--methods``, the deciding ``--method``, ``tune``)
    on_request: bool = False

    def __post_init__(self):
        if self.fn is None:
            object.__setattr__(self, "fn", _standalone(self))

    def score(self, p, value: Any = None):
        """The score from a :class:`ScoringPass`, at ``value`` of the hyperparameter (default when None)."""
        if self.needs_features and p.h is None:
            raise ConfigError(f"method {self.name!r} needs the penultimate features: the model has no classifier "
                              "head that could be hooked (see --head)")
        if self.needs_fit and p.fit is None:
            raise ConfigError(f"method {self.name!r} needs fitted reference statistics: run `odin-audit fit` "
                              "and pass --fit FIT")
        if value is None and self.param is not None:
            value = self.param.default
        return self.from_pass(p, value)


REGISTRY: dict[str, ScoreMethod] = {}


def register(method: ScoreMethod) -> ScoreMethod:
    if method.name in REGISTRY:
        raise ValueError(f"scoring method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> ScoreMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown scoring method {name!r}; choose one of {sorted(REGISTRY)}") from None


def _standalone(method: ScoreMethod):
    def fn(model, x, std, *, temperature=1000.0, epsilon=0.0, energy_temperature=1.0, head=None, fit=None):
        from .detectors.passes import run_pass

        p = run_pass(model, x, std, temperature=temperature, epsilon=epsilon if method.name == "odin" else 0.0,
                     head=head, fit=fit, adascale=method.name == "adascale", energy_temperature=energy_temperature)
        return method.score(p)

    return fn


# --------------------------------------------------------------------------- the math, by kind
def _msp(p, _):
    import torch

    return torch.softmax(p.logits, dim=1).amax(dim=1)


def _energy(p, _):
    import torch

    t = p.energy_temperature
    return t * torch.logsumexp(p.logits / t, dim=1)


def _gen(p, gamma):
    from .detectors.logit import gen

    return gen(p.logits, gamma)


def _scale(p, pct):
    from .detectors.shaping import scale

    return scale(p.h, p.head, pct)


def _ash(p, pct):
    from .detectors.shaping import ash_s

    return ash_s(p.h, p.head, pct)


def _react(p, pct):
    from .detectors.shaping import react

    return react(p.h, p.head, p.fit.react_clip(pct))


def _knn(p, k):
    from .detectors.distance import knn

    return knn(p.h, _cached(p.fit, "bank", p.h.device), k)


def _vim(p, _):
    from .detectors.distance import vim

    return vim(p.h, p.logits, _cached(p.fit, "vim_origin", p.h.device), _cached(p.fit, "vim_residual", p.h.device),
               p.fit.vim_alpha)


def _nci(p, alpha):
    from .detectors.distance import nci

    return nci(p.h, p.logits, p.head, _cached(p.fit, "mean", p.h.device), alpha)


def _fdbd(p, _):
    from .detectors.distance import fdbd

    return fdbd(p.h, p.logits, p.head, _cached(p.fit, "mean", p.h.device))


def _adascale(p, p_range):
    from .detectors.shaping import adascale, adascale_percentile, adascale_shift_statistic

    if p.h_perturbed is None:
        raise ConfigError("adascale needs its perturbed forward: score with adascale enabled")
    q = adascale_shift_statistic(p.h, p.h_perturbed)
    pct = adascale_percentile(q, _cached(p.fit, "adascale_q", p.h.device), tuple(p_range))
    return adascale(p.h, p.head, pct)


_TENSORS: dict[tuple[int, str, str], Any] = {}


def _cached(fit, name: str, device):
    """``fit.<name>`` as a contiguous float32 tensor on ``device``, prepared once per fit object (the
    KNN bank: once per scoring actor, not per batch; the methods compute in float32 anyway)."""
    import torch

    key = (id(fit), name, str(device))
    t = _TENSORS.get(key)
    if t is None or t[0] is not fit:
        t = (fit, torch.as_tensor(getattr(fit, name), dtype=torch.float32, device=device).contiguous())
        if len(_TENSORS) > 64:
            _TENSORS.clear()
        _TENSORS[key] = t
    return t[1]


_PCT = (60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
register(ScoreMethod("msp", "max softmax(f(x))", False, from_pass=_msp,
                     citation="Hendrycks & Gimpel, ICLR 2017"))
register(ScoreMethod("max_logit", "max f(x)", False, from_pass=lambda p, _: p.logits.amax(dim=1),
                     citation="Hendrycks et al., ICML 2022"))
register(ScoreMethod("energy", "T_e · logsumexp(f(x)/T_e)", False, from_pass=_energy,
                     citation="Liu et al., NeurIPS 2020"))
register(ScoreMethod("odin", "max softmax(f(x − ε·sign(∇ₓCE(f(x)/T, ŷ))/std)/T)", True, from_pass=lambda p, _: p.odin,
                     param=Param("(T, ε)", None), citation="Liang, Li & Srikant, ICLR 2018"))
register(ScoreMethod("gen", "−Σ_{top-M} p^γ(1−p)^γ, p = softmax(z), M = min(100, C)", False, from_pass=_gen,
                     param=Param("gamma", 0.1, (0.01, 0.05, 0.1, 0.5, 1.0)), citation="Liu et al., CVPR 2023"))
register(ScoreMethod("scale", "logsumexp(W·(h·exp(Σh/Σ_top-k h)) + b), k = D − round(D·p/100)", False,
                     from_pass=_scale, needs_features=True, param=Param("p", 85.0, _PCT),
                     citation="Xu et al., ICLR 2024"))
register(ScoreMethod("ash_s", "logsumexp(W·(top-k(h)·exp(Σh/Σ_top-k h)) + b), k = D − round(D·p/100)", False,
                     from_pass=_ash, needs_features=True, param=Param("p", 90.0, _PCT),
                     citation="Djurisic et al., ICLR 2023"))
register(ScoreMethod("react", "logsumexp(W·min(h, c) + b), c = p-th percentile of reference activations", False,
                     from_pass=_react, needs_features=True, needs_fit=True,
                     param=Param("p", 90.0, (80.0, 85.0, 90.0, 95.0, 99.0)), citation="Sun, Guo & Li, NeurIPS 2021"))
register(ScoreMethod("knn", "−‖ĥ − b̂_(k)‖, k-th nearest normalized reference feature", False, from_pass=_knn,
                     needs_features=True, needs_fit=True, param=Param("k", 50, (1, 5, 10, 20, 50, 100, 200)),
                     citation="Sun et al., ICML 2022"))
register(ScoreMethod("vim", "logsumexp(z) − α·‖Rᵀ(h − u)‖, u = −pinv(W)b", False, from_pass=_vim,
                     needs_features=True, needs_fit=True, citation="Wang et al., CVPR 2022"))
register(ScoreMethod("nci", "w_ŷ·(h − μ)/‖h − μ‖ + α·‖h‖₁", False, from_pass=_nci, needs_features=True,
                     needs_fit=True, param=Param("alpha", 1e-4, (1e-4, 1e-3, 1e-2, 1e-1)),
                     citation="Liu & Qin, 2023"))
register(ScoreMethod("fdbd", "mean_{c≠ŷ} (z_ŷ − z_c)/‖w_ŷ − w_c‖ / ‖h − μ‖", False, from_pass=_fdbd,
                     needs_features=True, needs_fit=True, citation="Liu & Qin, ICML 2024"))
register(ScoreMethod("adascale", "logsumexp(W·(h·exp(Σrelu(h)/Σ_top-k(x) relu(h))) + b), "
                     "p(x) = p_min + (1 − F_ref(Q'(x)))·(p_max − p_min)", True, from_pass=_adascale,
                     needs_features=True, needs_fit=True,
                     param=Param("p_range", (75.0, 85.0), ((60.0, 70.0), (70.0, 80.0), (75.0, 85.0), (80.0, 90.0),
                                                           (85.0, 95.0), (90.0, 99.0))),
                     citation="Regmi, 2025", on_request=True))

#: the score-table columns, one per built-in method (methods registered later are not in the table)
TABLE_METHODS: tuple[str, ...] = tuple(REGISTRY)
FEATURE_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.needs_features)
FITTED_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.needs_fit)
#: computed only when asked for (an extra pass each); the rest is the default set
ON_REQUEST_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.on_request)
#: ``--methods`` words: ``default`` = every method this model and fit allow but the on-request ones
#: (they ride in the pass ODIN already runs), ``all`` = every one, AdaSCALE included
METHOD_SETS = ("default", "all")


def parse_methods(spec, flag: str = "--methods") -> tuple[str, ...] | None:
    """``"default,adascale"`` / ``["all"]`` → the words and names, checked (``ConfigError`` naming
    ``flag``); ``None``, empty or ``"default"`` alone → ``None`` (the default set)."""
    if spec is None:
        return None
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [t for t in items if t]
    for t in items:
        if t not in METHOD_SETS and t not in REGISTRY:
            raise ConfigError(f"{flag}: unknown method {t!r}; give a comma-separated list of "
                              f"{', '.join(METHOD_SETS)} or method names {sorted(REGISTRY)}")
    out = tuple(dict.fromkeys(items))
    return None if out in ((), ("default",)) else out


def with_method(spec: tuple[str, ...] | None, method: str | None) -> tuple[str, ...] | None:
    """``spec`` extended so that ``method`` (the one δ thresholds) is computed: added unless the set
    already holds it (by name, ``all``, or ``default`` for a method that is not on request)."""
    if not method:
        return spec
    words = spec or ("default",)
    covered = method in words or "all" in words or ("default" in words and method not in ON_REQUEST_METHODS)
    return spec if covered else (*words, method)


def require_fit(method: str | None, fit_given: bool, flag: str = "--method") -> None:
    """``ConfigError`` (exit 2) naming ``fit`` when ``method`` needs a fit that was not given."""
    if method and method in REGISTRY and REGISTRY[method].needs_fit and not fit_given:
        raise ConfigError(f"{flag} {method} needs fitted reference statistics: run `odin-audit fit --reference SRC "
                          f"--model … --output FIT` on in-distribution images and pass --fit FIT")
