"""The About tab: model, SGF and DMFT equations, the meaning of every parameter (generated from
the Experiment docs), time conventions, reference.

Maths is TeX between ``$$`` in Markdown panes, typeset by the MathJax bundle that Bokeh serves
from the Panel server itself (``static/js/bokeh-mathjax.min.js``, SVG output, no web fonts): it
works offline. (Panel's KaTeX pane also loads locally, but its fonts are not bundled and the
formulas fall back to plain serif glyphs.) Needs ``pn.extension('mathjax')``.
"""
from __future__ import annotations

import html

import panel as pn
import param

from solver.config import Experiment

from .controls import GROUPS, LABELS

PAPER = ("S. Nishiyama & M. Imaizumi, *High-Dimensional Limit of Stochastic Gradient Flow via "
         "Dynamical Mean-Field Theory*, arXiv:2602.06320 (2026).")

EQUATIONS = [
    ("Data, teacher and student",
     r"$$x_\mu \sim \mathcal N(0, I_d/d),\quad h^*_\mu = \theta^{*\top} x_\mu,\quad "
     r"y_\mu = \varphi(h^*_\mu, \varepsilon_\mu),\quad h_\mu = \theta^\top x_\mu,\quad "
     r"\delta = n/d$$"),
    ("SGD with learning rate η and batch B",
     r"$$\theta_{j+1} = \theta_j - \eta\Big[\frac1B\sum_{\mu\in S_j} x_\mu\, \ell'(h_\mu, y_\mu)"
     r" + \frac{\lambda}{d}\theta_j\Big],\qquad t = \frac{j\eta}{d},\quad \tau = \frac{\eta}{B}$$"),
    ("Stochastic gradient flow (one Brownian motion per sample)",
     r"$$d\theta = -\Big[\lambda\theta + \delta^{-1}\sum_\mu x_\mu \ell'(h_\mu, y_\mu)\Big]dt"
     r" - \sqrt{\tau/\delta}\,\sum_\mu x_\mu \ell'(h_\mu, y_\mu)\, dW_\mu(t)$$"),
    ("DMFT: effective sample process (Itô)",
     r"$$h(t) = \omega(t) - \int_0^t R(t,s)\,\ell'(h(s), y)\,\big[\delta^{-1} ds + "
     r"\sqrt{\tau/\delta}\, dW(s)\big],\qquad \mathbb E[\omega(t)\omega(s)] = C(t,s),\ "
     r"\mathbb E[\omega(t) h^*] = m(t)$$"),
    ("DMFT: effective parameter process",
     r"$$d\theta(t) = -\Big[\lambda\theta(t) + \int_0^t \Gamma(t,s)\theta(s)\,ds + "
     r"\kappa(t)\,\theta^*\Big]dt + dU(t),\qquad \mathbb E[U(t)U(s)] = \delta\,\mathbb E[A(t)A(s)],"
     r"\ A(t) = \int_0^t \ell'(h, y)\big[\delta^{-1}dr + \sqrt{\tau/\delta}\,dW\big]$$"),
    ("Closure",
     r"$$C(t,s) = \mathbb E[\theta(t)\theta(s)],\quad m(t) = \mathbb E[\theta(t)\theta^*],\quad "
     r"R(t,s) = \frac{\delta \theta(t)}{\delta F(s)},\quad "
     r"\Gamma(t,s) = \frac{\delta\, \ell'(h(t), y)}{\delta \epsilon(s)},\quad "
     r"\kappa(t) = \mathbb E\Big[\frac{\partial \ell'(h(t),y)}{\partial h^*}\Big]$$"),
    ("Observables",
     r"$$Q(t) = C(t,t),\quad \cos(t) = \frac{m(t)}{\sqrt{Q(t)\rho}},\quad "
     r"\text{test loss} = \mathbb E\,\ell\big(\omega, \varphi(h^*, \varepsilon)\big),\ "
     r"(\omega, h^*) \sim \mathcal N\Big(0, \begin{pmatrix} Q & m\\ m & \rho\end{pmatrix}\Big)$$"),
]

CONVENTIONS = r"""
### Time, SGD and SGF

* **Time** $$t = j\,\eta/d$$ after $$j$$ SGD steps; **temperature** $$\tau = \eta/B$$;
  $$\delta = n/d$$.
* After time $$t$$, SGD has made $$t\,d/\eta$$ steps and $$t/(\tau\delta)$$ passes
  (**epochs**) over the data. The x-axis switch of the curves shows all three; for gradient
  descent (GD) one step of length dt is one epoch.
* The SGF is the diffusion whose drift is gradient flow and whose noise has the covariance of
  SGD's minibatch noise at temperature $$\tau$$; $$\tau = 0$$ is gradient flow. Its DMFT (black
  curves) is the large-$$d$$ limit of the Euler–Maruyama SGF simulation with the same dt, and of
  SGD with **fresh** batches as $$\eta/d \to 0$$ at fixed $$\tau$$.
* **SGD with random reshuffling** (each sample once per epoch) is a different dynamics: it is
  outside the theory, shown so that you can see where the two part.
* **GD** is full-batch gradient descent with step dt; its theory is the DMFT at $$\tau = 0$$
  (blue line, when *DMFT at τ = 0 for GD* is ticked).
* Error bars and bands are **one standard error**: over the Monte Carlo population of the DMFT
  (N samples), over the seeds (independent data sets) of a simulation.
"""


def parameter_table() -> str:
    """Markdown table of every edited parameter, generated from the Experiment docs."""
    rows = ["| Group | Parameter | Meaning | Range / choices | Default |", "|---|---|---|---|---|"]
    for group, names in GROUPS:
        for n in names:
            p = Experiment.param[n]
            if isinstance(p, param.Selector):
                rng = ", ".join(map(str, p.objects))
            elif isinstance(p, param.List):
                rng = "1 or k numbers"
            elif isinstance(p, param.Array):
                rng = "matrix (empty: scalar × I)"
            else:
                lo, hi = p.bounds or (None, None)
                rng = f"[{lo:g}, {hi:g}]" if lo is not None else ""
            doc = html.escape((p.doc or "").replace("|", "/"), quote=False).replace("*", r"\*")
            rows.append(f"| {group} | `{n}` ({LABELS.get(n, n)}) | {doc} | {rng} | {p.default} |")
    rows.append("| Simulation | GD / SGF / SGD fresh / SGD reshuffle | Which finite-size "
                "dynamics to simulate next to the theory (each a copy of the experiment with "
                "`algo`/`sampling` set). | any subset | GD, SGF, SGD fresh |")
    return "\n".join(rows)


def about_panel() -> pn.Column:
    items = [pn.pane.Markdown(
        "## About\nThis dashboard puts the **dynamical mean-field theory (DMFT) of the stochastic "
        "gradient flow** next to finite-size simulations of SGD, of the SGF and of gradient "
        "descent, streaming live as they are computed. Source of the physics: " + PAPER,
        sizing_mode="stretch_width")]
    eqs = "\n\n".join(f"**{title}**\n\n{eq}" for title, eq in EQUATIONS)
    items.append(pn.pane.Markdown("### The model and its DMFT\n\n" + eqs,
                                  sizing_mode="stretch_width", css_classes=["sgf-eqs"]))
    items.append(pn.pane.Markdown(CONVENTIONS, sizing_mode="stretch_width"))
    items.append(pn.pane.Markdown("### Parameters\n" + parameter_table(),
                                  sizing_mode="stretch_width"))
    items.append(pn.pane.Markdown(
        "### Reference\n" + PAPER + " The discretised equations this code solves are in the "
        "project's `THEORY.md`; numerics in `solver/`, this dashboard in `app/` "
        "(see `docs/dashboard.md`).", sizing_mode="stretch_width"))
    return pn.Column(*items, sizing_mode="stretch_width", max_width=1100)
