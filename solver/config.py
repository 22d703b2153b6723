"""The experiment configuration: the single source of truth for every parameter.

Names, defaults, bounds and help text live here and nowhere else; the solvers, the command line
and the dashboard's widgets are generated from :class:`Experiment`. Symbols follow
``../shared/THEORY.md`` (sections 1-2).

Conventions (THEORY.md section 2): time ``t = j*eta/d`` after ``j`` SGD steps, temperature
``tau = eta/B``, ``delta = n/d``. After time ``t`` SGD has made ``t*d/eta`` steps and
``t/(tau*delta)`` passes over the data.
"""
from __future__ import annotations

import json
import math

import param

LOSSES = ("square", "logistic")
TEACHERS = ("linear", "sign")
ALGOS = ("gd", "sgf", "sgd")
SAMPLINGS = ("fresh", "reshuffle")
METHODS = ("auto", "mc", "exact", "online")
MODELS = ("glm", "committee")
ACTIVATIONS = ("erf", "relu", "tanh")


class ConfigError(ValueError):
    """Invalid configuration; ``param`` names the offending parameter."""

    def __init__(self, param_name: str, message: str):
        self.param = param_name
        super().__init__(f"{param_name}: {message}")


class Experiment(param.Parameterized):
    """One experiment: data, teacher, student, optimiser, theory accuracy and simulation size."""

    # --- data and teacher -------------------------------------------------------------------
    delta = param.Number(2.0, bounds=(0.01, 1000.0), softbounds=(0.1, 10.0),
                         doc="Sample ratio delta = n/d (number of samples per dimension).")
    teacher = param.Selector(default="sign", objects=list(TEACHERS),
                             doc="Teacher y = phi(h*, eps): 'linear' y = h* + noise*eps; "
                                 "'sign' y = sign(h*) flipped with probability flip.")
    noise = param.Number(0.0, bounds=(0.0, 10.0), softbounds=(0.0, 2.0),
                         doc="Label noise sigma of the linear teacher (y = h* + sigma*eps).")
    flip = param.Number(0.0, bounds=(0.0, 0.5),
                        doc="Label-flip probability p of the sign teacher.")
    rho = param.Number(1.0, bounds=(1e-6, 100.0), softbounds=(0.1, 4.0),
                       doc="Teacher second moment rho = E[theta*_i^2] (so Var h* = rho).")

    # --- model and loss ---------------------------------------------------------------------
    model = param.Selector(default="glm", objects=list(MODELS),
                           doc="Student: 'glm' generalised linear model (width k = 1); 'committee' "
                               "two-layer network yhat = (1/k) sum_a v_a sigma(h_a) with a fixed "
                               "second layer, square loss.")
    k = param.Integer(2, bounds=(1, 16), doc="Committee: student width k (hidden units).")
    kstar = param.Integer(2, bounds=(1, 16),
                          doc="Committee: teacher width k*; teacher y = (1/k*) sum_b sigma(h*_b) "
                              "+ noise*eps.")
    activation = param.Selector(default="erf", objects=list(ACTIVATIONS),
                                doc="Committee activation sigma: erf(x/sqrt 2), relu or tanh.")
    v = param.List(default=[1.0], item_type=(int, float),
                   doc="Committee second layer v (fixed): one value for all units, or k values.")
    Q0 = param.Array(default=None, allow_None=True,
                     doc="Committee: initial student overlap matrix Q(0) (k x k); None means q0*I.")
    M0 = param.Array(default=None, allow_None=True,
                     doc="Committee: initial teacher overlap matrix M(0) (k x k*); None means "
                         "m0*I (unit a aligned with teacher unit a).")
    rho_matrix = param.Array(default=None, allow_None=True,
                             doc="Committee: teacher row covariance (k* x k*); None means rho*I.")
    loss = param.Selector(default="logistic", objects=list(LOSSES),
                          doc="Per-sample loss l(h, y): 'square' (h-y)^2/2, "
                              "'logistic' log(1+exp(-y h)) (needs labels +-1).")
    lam = param.Number(0.01, bounds=(0.0, 100.0), softbounds=(0.0, 2.0),
                       doc="Ridge penalty lambda: (lambda/2)|theta|^2 per row.")
    q0 = param.Number(0.0, bounds=(0.0, 100.0), softbounds=(0.0, 4.0),
                      doc="Initial self-overlap q0 = E[theta_i(0)^2] (0: start at zero).")
    m0 = param.Number(0.0, bounds=(-100.0, 100.0), softbounds=(-2.0, 2.0),
                      doc="Initial teacher overlap m0 = E[theta_i(0) theta*_i]; needs m0^2 <= q0*rho.")

    # --- optimiser ----------------------------------------------------------------------------
    tau = param.Number(0.5, bounds=(0.0, 100.0), softbounds=(0.0, 4.0),
                       doc="Temperature tau = eta/B of the stochastic gradient flow (0: gradient flow).")
    batch = param.Integer(8, bounds=(1, 100000), softbounds=(1, 256),
                          doc="SGD batch size B (simulator); changing it keeps tau and rescales eta.")
    eta = param.Number(4.0, bounds=(0.0, 1e6), softbounds=(0.0, 64.0),
                       doc="SGD learning rate eta = tau*B (derived from tau and batch; "
                           "setting it sets tau = eta/B).")

    # --- time grid ----------------------------------------------------------------------------
    T = param.Number(10.0, bounds=(1e-3, 1e4), softbounds=(0.5, 50.0),
                     doc="Horizon T in SGF time t = steps*eta/d.")
    dt = param.Number(0.05, bounds=(1e-4, 2.0), softbounds=(0.005, 0.5),
                      doc="Grid step dt of the DMFT and of the Euler-Maruyama SGF / GD simulator.")
    record_every = param.Integer(1, bounds=(1, 100000),
                                 doc="Record observables every this many grid steps.")

    # --- theory -------------------------------------------------------------------------------
    method = param.Selector(default="auto", objects=list(METHODS),
                            doc="DMFT method: 'mc' Monte Carlo time marching; 'exact' square loss "
                                "with linear teacher (deterministic); 'online' delta -> infinity "
                                "ODEs; 'auto' exact where it applies, else mc.")
    samples = param.Integer(4000, bounds=(16, 2_000_000), softbounds=(500, 40000),
                            doc="Population N of sample trajectories in the Monte Carlo DMFT.")

    # --- simulation ---------------------------------------------------------------------------
    d = param.Integer(1000, bounds=(2, 100_000), softbounds=(100, 8000),
                      doc="Dimension d of the finite-size simulation (n = round(delta*d)).")
    seeds = param.Integer(4, bounds=(1, 1000), softbounds=(1, 32),
                          doc="Number of independent seeds (data sets) in the simulation.")
    algo = param.Selector(default="sgf", objects=list(ALGOS),
                          doc="Simulated dynamics: 'gd' full-batch GD with step dt; 'sgf' "
                              "Euler-Maruyama SGF with step dt; 'sgd' minibatch SGD with "
                              "eta = tau*batch.")
    sampling = param.Selector(default="fresh", objects=list(SAMPLINGS),
                              doc="SGD batches: 'fresh' independent batch every step (what the SGF "
                                  "describes); 'reshuffle' epochs of random reshuffling (outside "
                                  "the theory).")
    seed = param.Integer(0, bounds=(0, 2**31 - 1), doc="Base random seed; seed s uses seed+s.")

    def __init__(self, **params):
        # tau and eta describe the same thing; apply batch first, then whichever of tau/eta given.
        eta = params.pop("eta", None)
        tau_given = "tau" in params
        for key in ("Q0", "M0", "rho_matrix"):  # accept nested lists (JSON, URL, Python API)
            if isinstance(params.get(key), (list, tuple)):
                import numpy as np

                params[key] = np.atleast_2d(np.asarray(params[key], dtype=float))
        super().__init__(**params)
        if eta is not None:
            if tau_given and not math.isclose(eta, self.tau * self.batch, rel_tol=1e-9, abs_tol=1e-12):
                raise ConfigError("eta", f"eta={eta} contradicts tau*batch={self.tau * self.batch}; "
                                         "give tau or eta, not both")
            self.eta = eta
        else:
            self._sync_eta()

    # tau <-> eta, batch keeps tau. Guard against the watcher ping-pong.
    _syncing = False

    @param.depends("tau", "batch", watch=True)
    def _sync_eta(self):
        if self._syncing:
            return
        self._syncing = True
        try:
            self.eta = self.tau * self.batch
        finally:
            self._syncing = False

    @param.depends("eta", watch=True)
    def _sync_tau(self):
        if self._syncing:
            return
        self._syncing = True
        try:
            self.tau = self.eta / self.batch
        finally:
            self._syncing = False

    # --- derived quantities -----------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of samples of the simulation, n = round(delta*d) (at least 1)."""
        return max(1, int(round(self.delta * self.d)))

    @property
    def steps(self) -> int:
        """Number K of grid steps up to the horizon T."""
        return max(1, int(round(self.T / self.dt)))

    @property
    def is_classification(self) -> bool:
        return self.teacher == "sign"

    def epochs(self, t):
        """Passes over the data after time t: t/(tau*delta) for SGD/SGF; t/dt for GD (one per step)."""
        if self.algo == "gd" or self.tau == 0:
            return t / self.dt
        return t / (self.tau * self.delta)

    def sgd_steps(self, t):
        """SGD steps after time t: t*d/eta (inf where eta = 0)."""
        return t * self.d / self.eta if self.eta > 0 else t * math.inf

    def resolved_method(self) -> str:
        if self.method != "auto":
            return self.method
        if self.model == "committee":
            return "mc"
        return "exact" if (self.loss == "square" and self.teacher == "linear") else "mc"

    # --- validation ---------------------------------------------------------------------------
    def validate(self) -> "Experiment":
        """Cross-field checks (single-field bounds are enforced by param on assignment)."""
        for name, p in self.param.objects("existing").items():
            v = getattr(self, name)
            if isinstance(p, param.Number) and not isinstance(v, bool) and v is not None:
                if not math.isfinite(v):
                    raise ConfigError(name, f"must be a finite number, got {v}")
        if self.model == "glm" and self.m0 ** 2 > self.q0 * self.rho * (1 + 1e-12):
            lim = math.sqrt(self.q0 * self.rho)
            raise ConfigError("m0", f"needs m0^2 <= q0*rho, i.e. m0 in [{-lim:g}, {lim:g}] "
                                    f"for q0={self.q0:g}, rho={self.rho:g}; got m0={self.m0:g}")
        if self.loss == "logistic" and self.teacher != "sign":
            raise ConfigError("loss", "logistic loss needs labels +-1: use teacher='sign' "
                                      "(or loss='square')")
        if self.model == "committee":
            self._validate_committee()
        if self.dt > self.T:
            raise ConfigError("dt", f"must be <= T={self.T:g}, got {self.dt:g}")
        if self.algo == "sgd":
            if self.tau <= 0:
                raise ConfigError("tau", "SGD needs tau > 0 (eta = tau*batch > 0); use algo='gd' "
                                         "for tau = 0")
            if self.batch > self.n:
                raise ConfigError("batch", f"must be in [1, n={self.n}] (n = delta*d), "
                                           f"got {self.batch}")
        if self.method == "exact" and (self.model == "committee" or not (
                self.loss == "square" and self.teacher == "linear")):
            raise ConfigError("method", "'exact' applies to square loss with a linear teacher; "
                                        "use 'auto', 'mc' or 'online'")
        return self

    @classmethod
    def checked(cls, **params) -> "Experiment":
        """Build and validate from untrusted values (CLI, URL, widgets, Python API).

        Every rejection is a :class:`ConfigError` naming the parameter and its valid range.
        Values are only compared and stored, never evaluated.
        """
        for k, v in params.items():
            if k not in cls.param or k == "name":
                raise ConfigError(k, f"unknown parameter; valid names: {', '.join(names())}")
            p = cls.param[k]
            if isinstance(p, param.List):
                if isinstance(v, str):
                    try:
                        v = [float(x) for x in v.split(",") if x.strip()]
                    except ValueError:
                        raise ConfigError(k, f"must be comma-separated numbers, got {v!r}") from None
                if (not isinstance(v, (list, tuple)) or not v
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                   and math.isfinite(x) for x in v)):
                    raise ConfigError(k, f"must be a non-empty list of finite numbers, got {v!r}")
                params[k] = [float(x) for x in v]
                continue
            if isinstance(p, param.Array):
                if v is None:
                    continue
                try:
                    import numpy as np

                    arr = np.atleast_2d(np.asarray(v, dtype=float))
                except (TypeError, ValueError):
                    raise ConfigError(k, f"must be a matrix of numbers, got {v!r}") from None
                if arr.ndim != 2 or not np.all(np.isfinite(arr)):
                    raise ConfigError(k, "must be a 2-D matrix of finite numbers")
                params[k] = arr
                continue
            if isinstance(p, param.Number) and not isinstance(p, param.Integer):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(k, f"must be a number in {valid_range(k)}, got {v!r}")
                if not math.isfinite(v):
                    raise ConfigError(k, f"must be a finite number in {valid_range(k)}, got {v}")
            if isinstance(p, param.Integer) and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(k, f"must be an integer in {valid_range(k)}, got {v!r}")
        try:
            exp = cls(**params)
        except ConfigError:
            raise
        except ValueError as e:
            msg = str(e)
            name = next((k for k in params if f"'{cls.__name__}.{k}'" in msg), None)
            if name is None:
                raise ConfigError("config", msg) from None
            raise ConfigError(name, f"{msg.replace(cls.__name__ + '.', '')} "
                                    f"Valid: {valid_range(name)}.") from None
        return exp.validate()

    def _validate_committee(self):
        import numpy as np

        if self.loss != "square" or self.teacher != "linear":
            raise ConfigError("loss", "the committee model uses square loss and its own teacher: "
                                      "set loss='square', teacher='linear'")
        if len(self.v) not in (1, self.k):
            raise ConfigError("v", f"needs 1 or k={self.k} values, got {len(self.v)}")
        if not all(math.isfinite(x) for x in self.v):
            raise ConfigError("v", "values must be finite")
        Q0, M0, rho = self.overlaps0()
        for name, A, shape in (("Q0", Q0, (self.k, self.k)), ("M0", M0, (self.k, self.kstar)),
                               ("rho_matrix", rho, (self.kstar, self.kstar))):
            if A.shape != shape:
                raise ConfigError(name, f"must have shape {shape}, got {A.shape}")
            if not np.all(np.isfinite(A)):
                raise ConfigError(name, "entries must be finite")
        for name, A in (("Q0", Q0), ("rho_matrix", rho)):
            if not np.allclose(A, A.T):
                raise ConfigError(name, "must be symmetric")
        if np.linalg.eigvalsh(rho).min() <= 0:
            raise ConfigError("rho_matrix", "must be positive definite")
        # joint covariance of (theta(0), theta*) must be positive semi-definite
        J = np.block([[Q0, M0], [M0.T, rho]])
        if np.linalg.eigvalsh(J).min() < -1e-10 * max(1.0, np.abs(J).max()):
            raise ConfigError("M0", "the initial overlaps [[Q0, M0], [M0^T, rho]] must form a "
                                    "positive semi-definite matrix (for scalars: m0^2 <= q0*rho)")

    def overlaps0(self):
        """(Q(0), M(0), rho) as matrices; for the GLM 1x1."""
        import numpy as np

        if self.model == "glm":
            return (np.array([[self.q0]]), np.array([[self.m0]]), np.array([[self.rho]]))
        k, ks = self.k, self.kstar
        Q0 = np.asarray(self.Q0, float) if self.Q0 is not None else self.q0 * np.eye(k)
        M0 = (np.asarray(self.M0, float) if self.M0 is not None
              else self.m0 * np.eye(k, ks))
        rho = (np.asarray(self.rho_matrix, float) if self.rho_matrix is not None
               else self.rho * np.eye(ks))
        return np.atleast_2d(Q0), np.atleast_2d(M0), np.atleast_2d(rho)

    def second_layer(self):
        """v as an array of length k."""
        import numpy as np

        v = np.asarray(self.v, float)
        return np.full(self.k, v[0]) if v.size == 1 else v

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for k in self.param:
            if k == "name":
                continue
            v = getattr(self, k)
            out[k] = v.tolist() if hasattr(v, "tolist") else (list(v) if isinstance(v, list) else v)
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        import numpy as np

        d = {k: v for k, v in d.items() if k in cls.param and k != "name"}
        for k in ("Q0", "M0", "rho_matrix"):
            if d.get(k) is not None:
                d[k] = np.asarray(d[k], float)
        # eta is derived from tau and batch; a saved config holds both, tau wins.
        if "tau" in d:
            d.pop("eta", None)
        return cls(**d)

    def copy(self, **changes) -> "Experiment":
        d = self.to_dict()
        if "eta" in changes:
            d.pop("tau")
        d.pop("eta")
        d.update(changes)
        return type(self).from_dict(d)


def names() -> list[str]:
    """Every parameter name, in declaration order."""
    return [k for k in Experiment.param if k != "name"]


def valid_range(name: str) -> str:
    """'[lo, hi]' for numbers, the choices for selectors."""
    p = Experiment.param[name]
    if isinstance(p, param.Selector):
        return "{" + ", ".join(map(str, p.objects)) + "}"
    lo, hi = p.bounds or (None, None)
    return f"[{lo}, {hi}]"


def parameter_help(name: str) -> str:
    """Help text with the valid range of a parameter, for CLIs and tooltips."""
    p = Experiment.param[name]
    text = p.doc or ""
    if isinstance(p, param.Selector):
        text += f" Choices: {', '.join(map(str, p.objects))}."
    elif isinstance(p, param.Number) and p.bounds:
        lo, hi = p.bounds
        text += f" Range: [{lo}, {hi}]."
    return text
