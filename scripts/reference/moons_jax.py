#!/usr/bin/env python3
"""A JAX reference for flowfuse's two-moons quality bar.

Trains, in JAX on the CPU, flows of the same size and with the same recipe as the defaults of
`flowfuse train --data moons` (RealNVP, MAF, and a CNF by flow matching) and prints one JSON line
per run with the test NLL, the train NLL (nats per sample, in the data's own units), the seconds
of training and samples/s; after all seeds of a model, one summary line (mean, std, min, max).

What is matched to flowfuse (src/train/data.rs, src/flows/presets.rs, src/flows/actnorm.rs,
src/ops/coupling/, src/nn/made.rs, src/cnf/, src/train/trainer.rs, src/bin/flowfuse/run.rs):
- data: make_moons-style, n = 20000, noise 0.05, random 80/20 split, standardisation with the
  train mean and population std; NLLs in data units (the standardised NLL plus sum(log std));
- PyTorch-style init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases; the output layer
  of every coupling conditioner and MADE zeroed (each layer starts as the identity);
- ActNorm before every coupling / MAF layer, initialised from the first 4096 training rows as
  they reach it in the density direction;
- mini-batches: a fresh permutation per epoch, remainder dropped; Adam (0.9, 0.999, 1e-8),
  global-norm clipping at 100, cosine decay to 1% of the learning rate over the run.
The random draws themselves differ (numpy and jax.random instead of flowfuse's xoshiro), so a
seed here is not the same data set or initialisation as the same seed in flowfuse.

Usage: python moons_jax.py [--models realnvp,maf,cnf] [--seeds 0,1,2] [--out runs.jsonl]
Needs jax and optax; the CNF's density solve uses diffrax when it is installed and
jax.experimental.ode.odeint otherwise. CI does not run this script (see README.md).
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------------------------
# Data (src/train/data.rs)


def make_moons(n, noise, rng):
    """n/2 points (cos t, sin t) and n - n/2 points (1 - cos t, 0.5 - sin t), t evenly spaced on
    [0, pi], shuffled, plus N(0, noise^2) noise."""
    upper = n // 2
    lower = n - upper
    t_up = np.linspace(0.0, math.pi, upper)
    t_lo = np.linspace(0.0, math.pi, lower)
    pts = np.concatenate(
        [
            np.stack([np.cos(t_up), np.sin(t_up)], axis=1),
            np.stack([1.0 - np.cos(t_lo), 0.5 - np.sin(t_lo)], axis=1),
        ]
    )
    pts = pts[rng.permutation(n)]
    return (pts + noise * rng.standard_normal(pts.shape)).astype(np.float32)


def train_test_split(data, test_fraction, rng):
    """round(n * test_fraction) random rows for the test set, the rest for training."""
    n = data.shape[0]
    n_test = int(round(n * test_fraction))
    order = rng.permutation(n)
    return data[order[n_test:]], data[order[:n_test]]


def standardiser(train):
    """Column mean and population std, in f64 (flowfuse's Standardizer::fit)."""
    x = train.astype(np.float64)
    return x.mean(axis=0), x.std(axis=0)


def batch_indices(n, batch, steps, rng):
    """flowfuse's Batches: walk a random permutation in steps of `batch`; when too few rows
    remain for a full batch, reshuffle and start a new epoch."""
    order = rng.permutation(n)
    pos = 0
    out = np.empty((steps, batch), dtype=np.int32)
    for k in range(steps):
        if pos + batch > n:
            rng.shuffle(order)
            pos = 0
        out[k] = order[pos : pos + batch]
        pos += batch
    return out


# ---------------------------------------------------------------------------------------------
# Networks (src/nn/mlp.rs, src/nn/made.rs)

ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu}


def init_mlp(key, widths, zero_last):
    """Layers y = x W + b with W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `zero_last` zeroes the
    output layer so that a coupling or autoregressive layer starts as the identity."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(fan_in)
        w = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
        b = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
        if zero_last and i == len(widths) - 2:
            w, b = jnp.zeros_like(w), jnp.zeros_like(b)
        layers.append({"w": w, "b": b})
    return layers


def apply_mlp(layers, x, act, masks=None):
    """The activation between layers, not after the last; `masks` (MADE) multiply the weights."""
    for i, layer in enumerate(layers):
        w = layer["w"] if masks is None else layer["w"] * masks[i]
        x = x @ w + layer["b"]
        if i + 1 < len(layers):
            x = act(x)
    return x


def made_degrees(dim, hidden, reversed_order):
    """MADE degrees (Germain et al. 2015) as flowfuse chooses them: input degrees 1..D (natural)
    or D..1 (reversed), hidden unit i of every layer gets degree (i mod (D-1)) + 1 (sorted),
    outputs [b | raw s] repeat the input degrees."""
    inputs = np.arange(1, dim + 1)
    if reversed_order:
        inputs = inputs[::-1].copy()
    degrees = [inputs]
    for width in hidden:
        degrees.append(np.sort(np.arange(width) % (dim - 1) + 1))
    degrees.append(np.concatenate([inputs, inputs]))
    return degrees


def made_masks(dim, hidden, reversed_order):
    """0/1 masks of the MADE weights: a weight from degree a to degree c is live iff c >= a into
    a hidden layer, c > a into the output layer."""
    degrees = made_degrees(dim, hidden, reversed_order)
    masks = []
    for layer, (d_in, d_out) in enumerate(zip(degrees[:-1], degrees[1:])):
        is_output = layer == len(degrees) - 2
        live = d_out[None, :] > d_in[:, None] if is_output else d_out[None, :] >= d_in[:, None]
        masks.append(jnp.asarray(live, dtype=jnp.float32))
    return masks


# ---------------------------------------------------------------------------------------------
# Discrete flows in the density direction x -> z (eq. 18.7): each layer returns its output and
# log|det d out / d in| per row.

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def soft_clamp(raw, clamp):
    """s = c tanh(raw / c): a bounded log-scale instead of a raw exp of an unbounded output."""
    return clamp * jnp.tanh(raw / clamp)


def actnorm_inverse(p, x):
    """x = z exp(log_scale) + loc, so z = (x - loc) exp(-log_scale), log-det -sum(log_scale)."""
    z = (x - p["loc"]) * jnp.exp(-p["log_scale"])
    return z, -jnp.sum(p["log_scale"]) * jnp.ones(x.shape[0], x.dtype)


def coupling_inverse(net, x, copy_lower, clamp):
    """Affine coupling (RealNVP, eq. 18.10-18.14): the copied half (columns 0..D/2 when
    `copy_lower`, else D/2..D) feeds the conditioner [raw s | b]; z_B = (x_B - b) exp(-s) and
    the log-det is -sum(s)."""
    mid = x.shape[1] // 2
    x_a, x_b = (x[:, :mid], x[:, mid:]) if copy_lower else (x[:, mid:], x[:, :mid])
    out = apply_mlp(net, x_a, jax.nn.relu)
    nb = x_b.shape[1]
    s = soft_clamp(out[:, :nb], clamp)
    z_b = (x_b - out[:, nb:]) * jnp.exp(-s)
    z = jnp.concatenate([x_a, z_b] if copy_lower else [z_b, x_a], axis=1)
    return z, -jnp.sum(s, axis=1)


def maf_inverse(net, masks, x, clamp):
    """MAF density pass (eq. 18.18): [b | raw s] = MADE(x), z = (x - b) exp(-s), log-det
    -sum(s), all coordinates in one pass."""
    d = x.shape[1]
    out = apply_mlp(net, x, jax.nn.relu, masks)
    s = soft_clamp(out[:, d:], clamp)
    return (x - out[:, :d]) * jnp.exp(-s), -jnp.sum(s, axis=1)


def flow_inverse(model, params, x):
    """Blocks [ActNorm -> layer] from the base side; the density runs the data-side block first,
    and inside each block the layer before its ActNorm."""
    total = jnp.zeros(x.shape[0], x.dtype)
    for i in reversed(range(len(params))):
        x, ld = model.layer_inverse(i, params[i]["layer"], x)
        total = total + ld
        x, ld = actnorm_inverse(params[i]["actnorm"], x)
        total = total + ld
    return x, total


def flow_log_prob(model, params, x):
    z, ld = flow_inverse(model, params, x)
    base = -0.5 * jnp.sum(z * z, axis=1) - z.shape[1] * HALF_LOG_2PI
    return base + ld


def actnorm_init_from_data(model, params, x):
    """Data-dependent ActNorm init: pass the batch down the density direction and let each
    ActNorm take the mean and population std of what reaches it (so its output has zero mean
    and unit variance). A near-constant column keeps log_scale = 0."""
    x = jnp.asarray(x)
    for i in reversed(range(len(params))):
        x, _ = model.layer_inverse(i, params[i]["layer"], x)
        mean, std = jnp.mean(x, axis=0), jnp.std(x, axis=0)
        log_scale = jnp.where(std > 1e-6, jnp.log(jnp.maximum(std, 1e-6)), 0.0)
        params[i]["actnorm"] = {"loc": mean, "log_scale": log_scale}
        x, _ = actnorm_inverse(params[i]["actnorm"], x)
    return params


class RealNvp:
    """8 blocks of [ActNorm -> affine coupling]; conditioner [D/2 -> 64 -> 64 -> 2 (D - D/2)]
    ReLU; block i copies the lower half when i is even (Fig. 18.2)."""

    name = "realnvp"
    blocks = 8
    hidden = (64, 64)
    clamp = 3.0

    def __init__(self, dim):
        self.dim = dim

    def init(self, key):
        mid = self.dim // 2
        params = []
        for i in range(self.blocks):
            key, k = jax.random.split(key)
            n_in = mid if i % 2 == 0 else self.dim - mid
            n_out = 2 * (self.dim - n_in)
            params.append(
                {
                    "actnorm": identity_actnorm(self.dim),
                    "layer": init_mlp(k, [n_in, *self.hidden, n_out], zero_last=True),
                }
            )
        return params

    def layer_inverse(self, i, net, x):
        return coupling_inverse(net, x, copy_lower=(i % 2 == 0), clamp=self.clamp)


class Maf:
    """5 blocks of [ActNorm -> MAF layer]; MADE [D -> 64 -> 64 -> 2D] ReLU; block i uses the
    natural order when i is even, the reversed one when odd."""

    name = "maf"
    blocks = 5
    hidden = (64, 64)
    clamp = 3.0

    def __init__(self, dim):
        self.dim = dim
        self.masks = [
            made_masks(dim, self.hidden, reversed_order=(i % 2 == 1)) for i in range(self.blocks)
        ]

    def init(self, key):
        params = []
        for i in range(self.blocks):
            key, k = jax.random.split(key)
            net = init_mlp(k, [self.dim, *self.hidden, 2 * self.dim], zero_last=True)
            # Dead weights zeroed as in flowfuse (the masks keep them out of the output anyway).
            net = [{"w": l["w"] * m, "b": l["b"]} for l, m in zip(net, self.masks[i])]
            params.append({"actnorm": identity_actnorm(self.dim), "layer": net})
        return params

    def layer_inverse(self, i, net, x):
        return maf_inverse(net, self.masks[i], x, self.clamp)


def identity_actnorm(dim):
    return {"loc": jnp.zeros(dim, jnp.float32), "log_scale": jnp.zeros(dim, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Training (src/train/trainer.rs)


def optimiser(lr, steps, clip=100.0, final_fraction=0.01):
    """Adam with global-norm clipping and lr(k) = lr (f + (1 - f)(1 + cos(pi k / steps)) / 2),
    k = 0 on the first step: flowfuse's schedule."""
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=final_fraction)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
    )


def compile_train(loss_fn, opt, params, data, idx, key):
    """The whole run as one lax.scan over precomputed batch indices (no per-step dispatch from
    Python), compiled ahead of time so that the timed call is optimisation only."""

    def run(params, opt_state, data_, idx_):
        def step(carry, xs):
            params, opt_state = carry
            k, ib = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, data_[ib], jax.random.fold_in(key, k))
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = jnp.arange(idx_.shape[0])
        return jax.lax.scan(step, (params, opt_state), (steps, idx_))

    opt_state = opt.init(params)
    started = time.perf_counter()
    compiled = jax.jit(run).lower(params, opt_state, data, idx).compile()
    return compiled, opt_state, time.perf_counter() - started


def timed(fn, *args):
    started = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - started


def loss_curve(losses, shift=0.0, every=500):
    """Mean training loss over each window of `every` steps, like flowfuse's metrics.jsonl."""
    v = np.asarray(losses, dtype=np.float64)
    return [round(float(v[k : k + every].mean()) + shift, 5) for k in range(0, len(v), every)]


def count_params(params):
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))


def run_discrete(model_cls, seed, args, data):
    train, test, log_std = data
    rng = np.random.default_rng(seed + 1000)
    model = model_cls(train.shape[1])
    params = model.init(jax.random.PRNGKey(seed))
    params = actnorm_init_from_data(model, params, train[:4096])
    steps = args.steps or 3000

    def loss_fn(p, x, _key):
        return -jnp.mean(flow_log_prob(model, p, x))

    opt = optimiser(2e-3, steps)
    idx = jnp.asarray(batch_indices(train.shape[0], args.batch, steps, rng))
    train_dev = jnp.asarray(train)
    compiled, opt_state, compile_s = compile_train(
        loss_fn, opt, params, train_dev, idx, jax.random.PRNGKey(seed)
    )
    load_before = os.getloadavg()[0]
    ((params, _), losses), seconds = timed(compiled, params, opt_state, train_dev, idx)
    load_after = os.getloadavg()[0]
    nll = jax.jit(lambda p, x: -jnp.mean(flow_log_prob(model, p, x)))
    return {
        "params": count_params(params),
        "steps": steps,
        "loss_every_500": loss_curve(losses, log_std),
        "train_nll": float(nll(params, train_dev)) + log_std,
        "test_nll": float(nll(params, jnp.asarray(test))) + log_std,
        "seconds": seconds,
        "compile_seconds": compile_s,
        "samples_per_second": steps * args.batch / seconds,
        "load_avg_1min": [load_before, load_after],
    }


# ---------------------------------------------------------------------------------------------
# Continuous flow by flow matching (src/cnf/matching.rs, src/cnf/density.rs)

CNF_HIDDEN = (64, 64)
SIGMA_MIN = 1e-4


def field(params, z, t):
    """f(z, t): an MLP on [z, t] with time as the last input, SiLU."""
    t_col = jnp.broadcast_to(jnp.reshape(t, (-1, 1)), (z.shape[0], 1)).astype(z.dtype)
    return apply_mlp(params, jnp.concatenate([z, t_col], axis=1), jax.nn.silu)


def flow_matching_loss(params, x1, key):
    """Conditional flow matching on the OT path (Lipman et al. 2022): x0 ~ N(0, I), t ~ U(0, 1),
    x_t = (1 - (1 - sigma_min) t) x0 + t x1, target u = x1 - (1 - sigma_min) x0; the loss is the
    batch mean of |f(x_t, t) - u|^2."""
    k0, kt = jax.random.split(key)
    x0 = jax.random.normal(k0, x1.shape, x1.dtype)
    t = jax.random.uniform(kt, (x1.shape[0], 1), x1.dtype)
    shrink = 1.0 - SIGMA_MIN
    x_t = (1.0 - shrink * t) * x0 + t * x1
    u = x1 - shrink * x0
    r = field(params, x_t, t) - u
    return jnp.mean(jnp.sum(r * r, axis=1))


def augmented_dynamics(params, t, state):
    """One row's (z, L) with dz/dt = f and dL/dt = Tr(df/dz) (exact trace; eq. 18.28)."""
    d = state.shape[0] - 1
    z = state[:d]

    def f(z_):
        return field(params, z_[None, :], t)[0]

    fz, jac = f(z), jax.jacfwd(f)(z)
    return jnp.concatenate([fz, jnp.trace(jac)[None]])


def cnf_log_prob_fn(rtol, atol, solver):
    """log p(x) = log N(z(0); 0, I) - integral_0^1 Tr(df/dz) dt, with (z, L) solved from (x, 0)
    at t = 1 back to t = 0 by adaptive Dormand-Prince RK45, each row with its own steps (vmap).
    Integrated in s = 1 - t, so both solvers run forward in time."""

    def reversed_dynamics(params, s, state):
        return -augmented_dynamics(params, 1.0 - s, state)

    if solver == "diffrax":
        import diffrax

        def solve_row(params, x):
            y0 = jnp.concatenate([x, jnp.zeros(1, x.dtype)])
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda s, y, p: reversed_dynamics(p, s, y)),
                diffrax.Dopri5(),
                t0=0.0,
                t1=1.0,
                dt0=None,
                y0=y0,
                args=params,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                max_steps=10_000,
            )
            steps = sol.stats["num_accepted_steps"] + sol.stats["num_rejected_steps"]
            return sol.ys[-1], steps

    else:
        from jax.experimental.ode import odeint

        def solve_row(params, x):
            y0 = jnp.concatenate([x, jnp.zeros(1, x.dtype)])
            ys = odeint(
                lambda y, s, p: reversed_dynamics(p, s, y),
                y0,
                jnp.array([0.0, 1.0], x.dtype),
                params,
                rtol=rtol,
                atol=atol,
                mxstep=10_000,
            )
            return ys[-1], jnp.zeros((), jnp.int32)

    @jax.jit
    def log_prob(params, x):
        y, steps = jax.vmap(solve_row, in_axes=(None, 0))(params, x)
        d = x.shape[1]
        z, integral = y[:, :d], y[:, d]
        base = -0.5 * jnp.sum(z * z, axis=1) - d * HALF_LOG_2PI
        # s runs forward, so the last state holds -integral_0^1 Tr dt from the sign flip.
        return base + integral, steps

    return log_prob


def run_cnf(seed, args, data):
    train, test, log_std = data
    rng = np.random.default_rng(seed + 1000)
    dim = train.shape[1]
    params = init_mlp(jax.random.PRNGKey(seed), [dim + 1, *CNF_HIDDEN, dim], zero_last=False)
    steps = args.cnf_steps or 20_000
    opt = optimiser(3e-3, steps)
    idx = jnp.asarray(batch_indices(train.shape[0], args.batch, steps, rng))
    train_dev = jnp.asarray(train)
    compiled, opt_state, compile_s = compile_train(
        flow_matching_loss, opt, params, train_dev, idx, jax.random.PRNGKey(seed + 7919)
    )
    load_before = os.getloadavg()[0]
    ((params, _), losses), seconds = timed(compiled, params, opt_state, train_dev, idx)
    load_after = os.getloadavg()[0]

    log_prob = cnf_log_prob_fn(args.rtol, args.atol, args.solver)
    (lp_test, steps_test), eval_s = timed(log_prob, params, jnp.asarray(test))
    lp_train, _ = log_prob(params, train_dev)
    return {
        "params": count_params(params),
        "steps": steps,
        "fm_loss_every_2500": loss_curve(losses, every=2500),
        "train_nll": -float(jnp.mean(lp_train)) + log_std,
        "test_nll": -float(jnp.mean(lp_test)) + log_std,
        "seconds": seconds,
        "compile_seconds": compile_s,
        "samples_per_second": steps * args.batch / seconds,
        "solver": args.solver,
        "rtol": args.rtol,
        "atol": args.atol,
        "test_log_prob_seconds": eval_s,
        "steps_per_row_mean": float(jnp.mean(steps_test)) if args.solver == "diffrax" else None,
        "load_avg_1min": [load_before, load_after],
    }


# ---------------------------------------------------------------------------------------------
# Self-checks (--check): the log-dets and solves above against autodiff and a second solver, on
# random non-identity parameters, so that a sign or mask error cannot hide behind training.


def randomise(params, key, scale=0.5):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def check_discrete(model_cls, key):
    """Each layer's per-row log-det against log|det| of its autodiff Jacobian, at the inputs
    that reach it (layer by layer: the Jacobian of the whole stack is too ill-conditioned for a
    2x2 determinant in f32), and for MAF the autoregressive property: dz_j/dx_k = 0 for every
    k after j in the layer's order."""
    model = model_cls(2)
    k_init, k_noise, k_x = jax.random.split(key, 3)
    params = randomise(model.init(k_init), k_noise)
    if model_cls is Maf:  # keep the masks' zeros: a dead weight must stay dead
        for i, p in enumerate(params):
            p["layer"] = [
                {"w": l["w"] * m, "b": l["b"]} for l, m in zip(p["layer"], model.masks[i])
            ]
    x = jax.random.normal(k_x, (64, 2), jnp.float32) * 1.5
    err, masked = 0.0, 0.0
    for i in reversed(range(len(params))):
        steps = [
            lambda r, i=i: model.layer_inverse(i, params[i]["layer"], r),
            lambda r, i=i: actnorm_inverse(params[i]["actnorm"], r),
        ]
        for k, fn in enumerate(steps):
            y, ld = fn(x)
            jac = jax.vmap(jax.jacfwd(lambda r: fn(r[None, :])[0][0]))(x)
            err = max(err, float(jnp.max(jnp.abs(ld - jnp.linalg.slogdet(jac)[1]))))
            if model_cls is Maf and k == 0:
                # natural order: z_0 may not depend on x_1; reversed: z_1 may not depend on x_0
                dead = jac[:, 0, 1] if i % 2 == 0 else jac[:, 1, 0]
                masked = max(masked, float(jnp.max(jnp.abs(dead))))
            x = y
    return {
        "check": model_cls.name,
        "max_logdet_error": err,
        "max_masked_jacobian": masked,
        "ok": err < 1e-4 and masked == 0.0,
    }


def check_cnf(key):
    """The exact-trace log-density of a random field by diffrax and by odeint agree, and both
    match a fixed-step RK4 with 2000 steps."""
    k_init, k_x = jax.random.split(key)
    params = init_mlp(k_init, [3, *CNF_HIDDEN, 2], zero_last=False)
    x = jax.random.normal(k_x, (32, 2), jnp.float32)
    results = {}
    for solver in ("diffrax", "odeint"):
        try:
            results[solver] = cnf_log_prob_fn(1e-5, 1e-5, solver)(params, x)[0]
        except ImportError:
            pass

    def rk4_row(xr, n=2000):
        h = 1.0 / n
        fn = lambda s, y: -augmented_dynamics(params, 1.0 - s, y)

        def body(k, y):
            s = k * h
            a = fn(s, y)
            b = fn(s + h / 2, y + h / 2 * a)
            c = fn(s + h / 2, y + h / 2 * b)
            d = fn(s + h, y + h * c)
            return y + h / 6 * (a + 2 * b + 2 * c + d)

        y = jax.lax.fori_loop(0, n, body, jnp.concatenate([xr, jnp.zeros(1, xr.dtype)]))
        return -0.5 * jnp.sum(y[:2] ** 2) - 2 * HALF_LOG_2PI + y[2]

    ref = jax.jit(jax.vmap(rk4_row))(x)
    errs = {k: float(jnp.max(jnp.abs(v - ref))) for k, v in results.items()}
    return {
        "check": "cnf",
        "max_log_prob_error_vs_rk4": errs,
        "ok": all(e < 1e-3 for e in errs.values()),
    }


def read_safetensors(path):
    """(metadata, {name: f32 array}) of a safetensors file: an 8-byte little-endian header
    length, a JSON header, then the raw tensor bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        tensors[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(
            info["shape"]
        )
    return meta, tensors


def flowfuse_log_prob(path, rtol, atol, solver):
    """log p(x) in data units of a model written by `flowfuse train`, computed by the JAX code
    above with flowfuse's weights. Raises if the checkpoint's structure (halves copied, MADE
    degrees, layer order, standardisation last) differs from what this script builds, so a
    matching NLL shows that the two implement the same model."""
    meta, t = read_safetensors(path)
    desc = json.loads(meta["flowfuse"])
    layers = desc["layers"]
    std_layer = layers[-1]
    if std_layer["type"] != "actnorm" or std_layer["trainable"]:
        raise ValueError("expected the fixed standardisation layer on the data side")
    k_std = len(layers) - 1

    def net(prefix):
        out, i = [], 0
        while f"{prefix}w{i}" in t:
            out.append(
                {"w": jnp.asarray(t[f"{prefix}w{i}"]), "b": jnp.asarray(t[f"{prefix}b{i}"][0])}
            )
            i += 1
        return out

    mean = jnp.asarray(t[f"layers.{k_std}.loc"][0])
    log_std = jnp.asarray(t[f"layers.{k_std}.log_scale"][0])

    def to_model(x):
        # The standardisation's density-direction log-det is -sum(log std) per row.
        return (x - mean) * jnp.exp(-log_std), -jnp.sum(log_std)

    if desc["kind"] == "cnf":
        field_params = net("field.")
        cnf_log_prob = cnf_log_prob_fn(rtol, atol, solver)

        def cnf_data_log_prob(x):
            u, ld = to_model(x)
            return cnf_log_prob(field_params, u)[0] + ld

        return desc["family"], cnf_data_log_prob

    family = desc["family"]
    model_cls = {"realnvp": RealNvp, "maf": Maf}[family]
    model = model_cls(desc["dim"])
    if len(layers) != 2 * model.blocks + 1:
        raise ValueError(f"{len(layers)} layers, expected {2 * model.blocks + 1}")
    params = []
    for i in range(model.blocks):
        an, layer = layers[2 * i], layers[2 * i + 1]
        if an["type"] != "actnorm":
            raise ValueError(f"layer {2 * i} is {an['type']}, expected actnorm")
        if family == "realnvp":
            want = "lower" if i % 2 == 0 else "upper"
            spec = layer["spec"]
            if spec["copied"] != want or spec["kind"] != {"kind": "affine", "clamp": model.clamp}:
                raise ValueError(f"block {i}: {spec}, expected affine coupling copying {want}")
        else:
            got = layer["spec"]["degrees"]
            want = made_degrees(model.dim, model.hidden, reversed_order=(i % 2 == 1))
            if [list(map(int, d)) for d in want] != got or layer["spec"]["clamp"] != model.clamp:
                raise ValueError(f"block {i}: MADE degrees or clamp differ from this script's")
        params.append(
            {
                "actnorm": {
                    "loc": jnp.asarray(t[f"layers.{2 * i}.loc"][0]),
                    "log_scale": jnp.asarray(t[f"layers.{2 * i}.log_scale"][0]),
                },
                "layer": net(f"layers.{2 * i + 1}."),
            }
        )

    @jax.jit
    def log_prob(x):
        u, ld = to_model(x)
        return flow_log_prob(model, params, u) + ld

    return family, log_prob


def compare_checkpoint(path, flowfuse_bin, args):
    """Evaluates a flowfuse checkpoint here and with `flowfuse eval` on the same 4000 moons
    points (written to a temporary .npy), and prints both mean NLLs."""
    import subprocess
    import tempfile

    x = make_moons(4000, 0.05, np.random.default_rng(2024))
    family, log_prob = flowfuse_log_prob(path, args.rtol, args.atol, args.solver)
    jax_nll = -float(jnp.mean(log_prob(jnp.asarray(x))))
    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "moons.npy")
        np.save(npy, x)
        cmd = [flowfuse_bin, "eval", "--model", path, "--data", npy, "--device", "cpu"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ff_nll = json.loads(out.strip().splitlines()[-1])["nll"]
    diff = abs(jax_nll - ff_nll)
    print(
        json.dumps(
            {
                "check": "flowfuse_checkpoint",
                "family": family,
                "checkpoint": path,
                "rows": int(x.shape[0]),
                "jax_nll": jax_nll,
                "flowfuse_nll": ff_nll,
                "abs_diff": diff,
                "ok": diff < 1e-3,
            }
        ),
        flush=True,
    )
    return 0 if diff < 1e-3 else 1


def run_checks():
    key = jax.random.PRNGKey(123)
    rows = [check_discrete(RealNvp, key), check_discrete(Maf, key), check_cnf(key)]
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


# ---------------------------------------------------------------------------------------------


def load_moons(seed, args):
    rng = np.random.default_rng(seed)
    data = make_moons(args.samples, 0.05, rng)
    train, test = train_test_split(data, 0.2, rng)
    mean, std = standardiser(train)
    standardise = lambda x: ((x - mean) / std).astype(np.float32)
    # The standardised NLL plus sum(log std) is the NLL in the data's own units (eq. 18.1).
    return standardise(train), standardise(test), float(np.sum(np.log(std)))


def summary(model, rows):
    out = {"model": model, "summary": True, "seeds": [r["seed"] for r in rows]}
    for key in ("test_nll", "train_nll", "seconds", "samples_per_second"):
        v = np.array([r[key] for r in rows])
        out[key] = {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()),
            "max": float(v.max()),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="realnvp,maf,cnf")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="discrete flows (default 3000)")
    ap.add_argument("--cnf-steps", type=int, default=None, help="flow matching (default 20000)")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--solver", choices=["auto", "diffrax", "odeint"], default="auto")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--check", action="store_true", help="only run the self-checks")
    ap.add_argument(
        "--compare-checkpoint",
        metavar="MODEL.safetensors",
        help="only evaluate a `flowfuse train` checkpoint here and with `flowfuse eval`",
    )
    ap.add_argument("--flowfuse", default="target/release/flowfuse", help="the flowfuse binary")
    args = ap.parse_args()
    if args.solver == "auto":
        has_diffrax = importlib.util.find_spec("diffrax") is not None
        args.solver = "diffrax" if has_diffrax else "odeint"
    if args.check:
        return run_checks()
    if args.compare_checkpoint:
        return compare_checkpoint(args.compare_checkpoint, args.flowfuse, args)

    runners = {
        "realnvp": lambda s, d: run_discrete(RealNvp, s, args, d),
        "maf": lambda s, d: run_discrete(Maf, s, args, d),
        "cnf": lambda s, d: run_cnf(s, args, d),
    }
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in runners]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(runners)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    sink = open(args.out, "a") if args.out else None

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    for model in models:
        rows = []
        for seed in seeds:
            data = load_moons(seed, args)
            result = runners[model](seed, data)
            row = {
                "framework": "jax",
                "jax": jax.__version__,
                "device": jax.devices()[0].platform,
                "model": model,
                "seed": seed,
                "batch": args.batch,
                **result,
            }
            rows.append(row)
            emit(row)
        emit(summary(model, rows))
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
