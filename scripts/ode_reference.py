#!/usr/bin/env python3
"""Reference numbers for tests/ode.rs: scipy's RK45 (an established Dormand-Prince code) on the
non-stiff test problems of Hairer, Norsett & Wanner, Solving ODEs I (section II.10), at several
tolerances. For each run it records the function evaluations, the accepted and rejected steps and
the global error at t1 against a tight DOP853 solve, which is stored as well.

Usage: python3 scripts/ode_reference.py [out.json]   (default tests/data/ode_reference.json)
Needs numpy and scipy. The Rust test reads only the JSON, so CI does not need Python.
"""

import json
import math
import sys

import numpy as np
import scipy
from scipy.integrate import DOP853, RK45

TOLERANCES = [1e-3, 1e-4, 1e-6, 1e-8, 1e-10]
# Tightest tolerances scipy accepts without raising rtol itself (it needs rtol >= 100 eps).
REF_RTOL = 2.5e-14
REF_ATOL = 1e-14


def arenstorf(t, y):
    mu = 0.012277471
    mu1 = 1.0 - mu
    d1 = ((y[0] + mu) ** 2 + y[1] ** 2) ** 1.5
    d2 = ((y[0] - mu1) ** 2 + y[1] ** 2) ** 1.5
    return np.array([
        y[2],
        y[3],
        y[0] + 2.0 * y[3] - mu1 * (y[0] + mu) / d1 - mu * (y[0] - mu1) / d2,
        y[1] - 2.0 * y[2] - mu1 * y[1] / d1 - mu * y[1] / d2,
    ])


def brusselator(t, y):
    u, v = y
    return np.array([1.0 + u * u * v - 4.0 * u, 3.0 * u - u * u * v])


def lotka_volterra(t, y):
    a, b, c, d = 1.5, 1.0, 3.0, 1.0
    x, p = y
    return np.array([a * x - b * x * p, -c * p + d * x * p])


def rigid_body(t, y):
    # Euler's equations of a rigid body with I1 = 0.5, I2 = 2, I3 = 3 and a torque
    # 0.25 sin^2 t on the third axis for 3 pi <= t <= 4 pi (Hairer I, problem EULR).
    forcing = 0.25 * math.sin(t) ** 2 if 3.0 * math.pi <= t <= 4.0 * math.pi else 0.0
    return np.array([
        -2.0 * y[1] * y[2],
        1.25 * y[2] * y[0],
        -0.5 * y[0] * y[1] + forcing,
    ])


def pleiades(t, y):
    # Seven bodies in the plane, masses m_i = i; state (x_1..7, y_1..7, x'_1..7, y'_1..7).
    x, yy = y[0:7], y[7:14]
    m = np.arange(1.0, 8.0)
    dx = x[None, :] - x[:, None]
    dy = yy[None, :] - yy[:, None]
    r2 = dx * dx + dy * dy
    np.fill_diagonal(r2, 1.0)
    r3 = r2 ** 1.5
    w = m[None, :] / r3
    np.fill_diagonal(w, 0.0)
    ax = (w * dx).sum(axis=1)
    ay = (w * dy).sum(axis=1)
    return np.concatenate([y[14:21], y[21:28], ax, ay])


PROBLEMS = [
    ("arenstorf", arenstorf, 0.0, 17.0652165601579625588917206249,
     [0.994, 0.0, 0.0, -2.00158510637908252240537862224]),
    ("brusselator", brusselator, 0.0, 20.0, [1.5, 3.0]),
    ("lotka_volterra", lotka_volterra, 0.0, 15.0, [10.0, 5.0]),
    ("rigid_body", rigid_body, 0.0, 20.0, [1.0, 0.0, 0.9]),
    ("pleiades", pleiades, 0.0, 3.0,
     [3.0, 3.0, -1.0, -3.0, 2.0, -2.0, 2.0,
      3.0, -3.0, 2.0, 0.0, 0.0, -4.0, 4.0,
      0.0, 0.0, 0.0, 0.0, 0.0, 1.75, -1.5,
      0.0, 0.0, 0.0, -1.25, 1.0, 0.0, 0.0]),
]


def integrate(method, fun, t0, t1, y0, rtol, atol):
    """Steps a scipy OdeSolver to t1; returns (y1, nfev, accepted steps)."""
    solver = method(fun, t0, np.array(y0, dtype=float), t1, rtol=rtol, atol=atol)
    accepted = 0
    while solver.status == "running":
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"{method.__name__} failed: {message}")
        accepted += 1
    return solver.y.copy(), solver.nfev, accepted


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/ode_reference.json"
    problems = []
    for name, fun, t0, t1, y0 in PROBLEMS:
        ref, ref_nfev, _ = integrate(DOP853, fun, t0, t1, y0, REF_RTOL, REF_ATOL)
        runs = []
        for tol in TOLERANCES:
            y1, nfev, accepted = integrate(RK45, fun, t0, t1, y0, tol, tol)
            # Every RK45 step attempt costs 6 evaluations after the 2 of the start.
            rejected = (nfev - 2) // 6 - accepted
            error = float(np.max(np.abs(y1 - ref)))
            runs.append({"tol": tol, "nfev": int(nfev), "accepted": accepted,
                         "rejected": int(rejected), "error": error})
            print(f"{name:15s} tol {tol:.0e}: nfev {nfev:6d} accepted {accepted:5d} "
                  f"rejected {rejected:4d} error {error:.3e}")
        problems.append({"name": name, "t0": t0, "t1": t1, "y0": y0,
                         "reference": [float(v) for v in ref], "reference_nfev": int(ref_nfev),
                         "runs": runs})
    doc = {
        "generator": "scripts/ode_reference.py",
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "method": "scipy.integrate.RK45, rtol = atol = tol; error = max |y(t1) - reference|",
        "reference_method": f"scipy.integrate.DOP853, rtol {REF_RTOL}, atol {REF_ATOL}",
        "problems": problems,
    }
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
