"""Two-layer networks ("committee machines", THEORY.md section 1 with width k > 1).

Student ``yhat = (1/k) sum_a v_a sigma(h_a)`` with a fixed second layer ``v``, teacher
``y = (1/k*) sum_b sigma(h*_b) + noise*eps``, square loss. Modules:

* :mod:`.activations` -- numba ``sigma, sigma', sigma''`` by integer code (erf(x/sqrt 2), relu, tanh).
* :mod:`.observables` -- Gaussian pair moments and the generalisation error from (Q, M, rho).
* :mod:`.simulate` -- finite-size GD / SGF / SGD (and online SGD) simulator, ``stream(exp)``.
* :mod:`.online` -- online (Saad-Solla) ODEs in matrix form, ``stream(exp)``.

Conventions (m, Q, cosine, test_error for the committee): ``docs/committee.md``.
"""
