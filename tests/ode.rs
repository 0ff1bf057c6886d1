//! The adaptive Dormand–Prince solver: tableau, exact solutions, Hairer's non-stiff test
//! problems against scipy's RK45 (numbers in tests/data/ode_reference.json, written by
//! scripts/ode_reference.py), per-sample stepping, and typed failures.
//!
//! The solver works on host f64 arrays and takes the vector field as a closure, so these tests
//! have no backend parameter: a backend enters through the closure.

use std::f64::consts::PI;

use flowfuse::Error;
use flowfuse::error::OdeFailure;
use flowfuse::ode::tableau::{A, B4, B5, C, E, STAGES, dense_weights};
use flowfuse::ode::{
    Controller, IController, OdeOptions, PiController, Span, StepController, StepMemory, Stepping,
    scaled_error_norm, solve_batch, solve_batch_rows, solve_ivp,
};

// ---------------------------------------------------------------- tableau

fn a_full() -> [[f64; STAGES]; STAGES] {
    let mut a = [[0.0; STAGES]; STAGES];
    for s in 0..STAGES {
        a[s][..STAGES - 1].copy_from_slice(&A[s]);
    }
    a
}

fn mat_vec(a: &[[f64; STAGES]; STAGES], v: &[f64; STAGES]) -> [f64; STAGES] {
    std::array::from_fn(|s| (0..STAGES).map(|j| a[s][j] * v[j]).sum())
}

fn mul(u: &[f64; STAGES], v: &[f64; STAGES]) -> [f64; STAGES] {
    std::array::from_fn(|s| u[s] * v[s])
}

fn dot(u: &[f64; STAGES], v: &[f64; STAGES]) -> f64 {
    u.iter().zip(v).map(|(a, b)| a * b).sum()
}

/// The Butcher order conditions of the rooted trees up to order 5, as (Φ(weights), 1/γ).
/// Conditions of order p have exact value σ^p/γ for the continuous extension at σ.
fn order_conditions(b: &[f64; STAGES], sigma: f64) -> Vec<(usize, f64, f64)> {
    let a = a_full();
    let one = [1.0; STAGES];
    let c = C;
    let c2 = mul(&c, &c);
    let c3 = mul(&c2, &c);
    let ac = mat_vec(&a, &c);
    let ac2 = mat_vec(&a, &c2);
    let aac = mat_vec(&a, &ac);
    let trees: Vec<(usize, [f64; STAGES], f64)> = vec![
        (1, one, 1.0),
        (2, c, 2.0),
        (3, c2, 3.0),
        (3, ac, 6.0),
        (4, c3, 4.0),
        (4, mul(&c, &ac), 8.0),
        (4, ac2, 12.0),
        (4, aac, 24.0),
        (5, mul(&c3, &c), 5.0),
        (5, mul(&c2, &ac), 10.0),
        (5, mul(&c, &ac2), 15.0),
        (5, mul(&c, &aac), 30.0),
        (5, mul(&ac, &ac), 20.0),
        (5, mat_vec(&a, &c3), 20.0),
        (5, mat_vec(&a, &mul(&c, &ac)), 40.0),
        (5, mat_vec(&a, &ac2), 60.0),
        (5, mat_vec(&a, &aac), 120.0),
    ];
    trees
        .into_iter()
        .map(|(p, phi, gamma)| (p, dot(b, &phi), sigma.powi(p as i32) / gamma))
        .collect()
}

#[test]
fn tableau_rows_sum_to_nodes() {
    for s in 0..STAGES {
        let sum: f64 = A[s].iter().sum();
        assert!(
            (sum - C[s]).abs() < 1e-14,
            "stage {s}: Σa = {sum}, c = {}",
            C[s]
        );
    }
}

#[test]
fn tableau_order_conditions_hold() {
    // The propagated solution is of order 5, the embedded one of order 4 but not 5.
    for (p, got, want) in order_conditions(&B5, 1.0) {
        assert!((got - want).abs() < 1e-14, "B5 order {p}: {got} vs {want}");
    }
    let b4 = order_conditions(&B4, 1.0);
    for &(p, got, want) in b4.iter().filter(|c| c.0 <= 4) {
        assert!((got - want).abs() < 1e-14, "B4 order {p}: {got} vs {want}");
    }
    let worst5 = b4
        .iter()
        .filter(|c| c.0 == 5)
        .map(|c| (c.1 - c.2).abs())
        .fold(0.0, f64::max);
    assert!(
        worst5 > 1e-6,
        "B4 should not satisfy every order-5 condition"
    );
}

#[test]
fn tableau_is_first_same_as_last_and_error_weights_match() {
    assert_eq!(C[STAGES - 1], 1.0);
    for j in 0..STAGES - 1 {
        assert_eq!(A[STAGES - 1][j], B5[j], "last stage row must be B5 (FSAL)");
    }
    assert_eq!(B5[STAGES - 1], 0.0);
    for s in 0..STAGES {
        assert!((E[s] - (B5[s] - B4[s])).abs() < 1e-16, "E[{s}]");
    }
}

#[test]
fn dense_output_weights_are_a_continuous_extension() {
    let w0 = dense_weights(0.0);
    assert!(w0.iter().all(|&w| w == 0.0));
    let w1 = dense_weights(1.0);
    for s in 0..STAGES {
        assert!(
            (w1[s] - B5[s]).abs() < 1e-14,
            "b_{s}(1) = {} vs {}",
            w1[s],
            B5[s]
        );
    }
    for sigma in [0.1, 0.25, 0.5, 0.8, 0.95] {
        let w = dense_weights(sigma);
        for (p, got, want) in order_conditions(&w, sigma) {
            if p <= 4 {
                assert!(
                    (got - want).abs() < 1e-14,
                    "σ = {sigma}: order {p}: {got} vs {want}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- controller pieces

#[test]
fn error_norm_is_rms_of_mixed_tolerance_ratios() {
    let y0 = [1.0, -4.0];
    let y1 = [2.0, 0.5];
    let e = [0.03, 0.2];
    let (rtol, atol) = (0.01, 0.001);
    // sc = [0.001 + 0.01·2, 0.001 + 0.01·4]
    let r: [f64; 2] = [0.03 / 0.021, 0.2 / 0.041];
    let want = ((r[0] * r[0] + r[1] * r[1]) / 2.0).sqrt();
    let got = scaled_error_norm(&y0, &y1, &e, rtol, atol);
    assert!((got - want).abs() < 1e-14 * want, "{got} vs {want}");
}

#[test]
fn integral_controller_follows_scipy_rules() {
    let c = IController::default();
    let mut m = StepMemory::default();
    let d = c.decide(0.0, &mut m);
    assert!(d.accept && d.factor == 10.0);
    let d = c.decide(0.5, &mut m);
    assert!(d.accept && (d.factor - 0.9 * 0.5f64.powf(-0.2)).abs() < 1e-15);
    let d = c.decide(1e6, &mut m);
    assert!(!d.accept && d.factor == 0.2, "{d:?}");
    let d = c.decide(2.0, &mut m);
    assert!(!d.accept && (d.factor - 0.9 * 2.0f64.powf(-0.2)).abs() < 1e-15);
    // No growth on the step right after a rejection, growth again afterwards.
    let d = c.decide(1e-3, &mut m);
    assert!(d.accept && d.factor == 1.0, "{d:?}");
    let d = c.decide(1e-3, &mut m);
    assert!(d.accept && d.factor > 1.0);
    let d = c.decide(f64::NAN, &mut m);
    assert!(!d.accept && d.factor == 0.2);
}

#[test]
fn pi_controller_remembers_the_last_error() {
    let c = PiController::default();
    let mut calm = StepMemory::default();
    let mut rough = StepMemory::default();
    c.decide(0.01, &mut calm);
    c.decide(0.9, &mut rough);
    // Same current error, different history: a rough history asks for a bolder step (the
    // β term rewards a previous error that was large and has since come down).
    let a = c.decide(0.3, &mut calm);
    let b = c.decide(0.3, &mut rough);
    assert!(a.accept && b.accept);
    assert!(b.factor > a.factor, "{a:?} {b:?}");
    assert!(!c.decide(1.5, &mut calm).accept);
}

// ---------------------------------------------------------------- exact solutions

fn tight(tol: f64) -> OdeOptions {
    OdeOptions::with_tolerances(tol, tol)
}

#[test]
fn exponential_decay_per_row_rates() {
    let rates = [0.5, 1.0, 3.0, 7.0];
    let y0 = [1.0, 2.0, -1.0, 0.5];
    let sol = solve_batch_rows(
        |rows, _t, y, dy| {
            for (i, &r) in rows.iter().enumerate() {
                dy[i] = -rates[r] * y[i];
            }
            Ok(())
        },
        &y0,
        1,
        (0.0, 2.0),
        &tight(1e-8),
    )
    .unwrap();
    for r in 0..4 {
        let want = y0[r] * (-rates[r] * 2.0).exp();
        let got = sol.y[r];
        assert!(
            (got - want).abs() <= 1e-7 * (1e-8 + want.abs()) + 1e-8,
            "row {r}: {got} vs {want}"
        );
    }
    // Faster decay needs more steps.
    assert!(sol.stats.nfe[3] > sol.stats.nfe[0], "{:?}", sol.stats.nfe);
}

/// The right-hand side of the oscillator y'' = −ω² y as (y, y'), for `solve_ivp`.
fn oscillator(omega: f64) -> impl Fn(f64, &[f64], &mut [f64]) -> flowfuse::Result<()> {
    move |_t: f64, y: &[f64], dy: &mut [f64]| {
        dy[0] = y[1];
        dy[1] = -omega * omega * y[0];
        Ok(())
    }
}

#[test]
fn harmonic_oscillator_keeps_its_energy() {
    let sol = solve_ivp(oscillator(1.0), 0.0, 20.0, &[1.0, 0.0], &tight(1e-10)).unwrap();
    let energy = 0.5 * (sol.y[0] * sol.y[0] + sol.y[1] * sol.y[1]);
    assert!((energy - 0.5).abs() < 1e-8, "energy {energy}");
    assert!((sol.y[0] - 20f64.cos()).abs() < 1e-8);
    assert!((sol.y[1] + 20f64.sin()).abs() < 1e-8);
    assert_eq!(sol.nfe, 2 + 6 * (sol.accepted + sol.rejected));
}

#[test]
fn linear_system_matches_its_matrix_exponential() {
    // y' = [[-a, w], [-w, -a]] y has y(t) = e^{-at}·R(-wt)·y0.
    let (a, w) = (0.3, 2.0);
    let y0 = [1.5, -0.5];
    let t1 = 6.0;
    let t_eval: Vec<f64> = (0..=24).map(|k| k as f64 * 0.25).collect();
    let exact = |t: f64| {
        let (s, c) = (w * t).sin_cos();
        let g = (-a * t).exp();
        [g * (c * y0[0] + s * y0[1]), g * (-s * y0[0] + c * y0[1])]
    };
    let tol = 1e-7;
    let sol = solve_batch(
        |_t, y, dy| {
            dy[0] = -a * y[0] + w * y[1];
            dy[1] = -w * y[0] - a * y[1];
            Ok(())
        },
        &y0,
        2,
        (0.0, t1),
        &tight(tol).t_eval(t_eval.clone()),
    )
    .unwrap();
    let mut worst_dense: f64 = 0.0;
    for (k, &t) in t_eval.iter().enumerate() {
        worst_dense = worst_dense.max(max_abs_diff(sol.eval_row(k, 0), &exact(t)));
    }
    let want = exact(t1);
    let end_err = (sol.y[0] - want[0]).abs().max((sol.y[1] - want[1]).abs());
    assert!(end_err < 20.0 * tol, "end error {end_err:e}");
    // Dense output is 4th order against the 5th-order steps, but still near the tolerance.
    assert!(worst_dense < 20.0 * tol, "dense error {worst_dense:e}");
    assert_eq!(sol.eval_row(0, 0), &y0);
    assert_eq!(sol.eval_row(t_eval.len() - 1, 0), sol.final_row(0));
}

#[test]
fn dense_output_tracks_the_solution_between_steps() {
    // Few, long steps (loose tolerance) so that most output points fall strictly inside steps.
    for tol in [1e-4, 1e-6, 1e-8] {
        let t_eval: Vec<f64> = (0..=200).map(|k| k as f64 * 0.05).collect();
        let sol = solve_ivp(
            oscillator(1.0),
            0.0,
            10.0,
            &[1.0, 0.0],
            &tight(tol).t_eval(t_eval.clone()),
        )
        .unwrap();
        assert!(sol.accepted < 200, "steps {}", sol.accepted);
        let mut worst: f64 = 0.0;
        for (k, &t) in t_eval.iter().enumerate() {
            worst = worst.max((sol.y_eval[k][0] - t.cos()).abs());
            worst = worst.max((sol.y_eval[k][1] + t.sin()).abs());
        }
        let end = (sol.y[0] - 10f64.cos()).abs();
        assert!(worst < 30.0 * tol, "tol {tol:e}: dense error {worst:e}");
        // The interpolant is not much worse than the steps themselves.
        assert!(
            worst < 10.0 * end.max(tol),
            "tol {tol:e}: {worst:e} vs {end:e}"
        );
    }
}

#[test]
fn backward_integration_returns_to_the_start() {
    let rhs = |_t: &[f64], y: &[f64], dy: &mut [f64]| -> flowfuse::Result<()> {
        for (yr, dr) in y.chunks(2).zip(dy.chunks_mut(2)) {
            // A nonlinear pendulum.
            dr[0] = yr[1];
            dr[1] = -yr[0].sin();
        }
        Ok(())
    };
    let y0 = [0.3, 0.0, 1.0, 0.5, -2.0, 0.1];
    let opts = tight(1e-10);
    let fwd = solve_batch(rhs, &y0, 2, (0.0, 5.0), &opts).unwrap();
    let back = solve_batch(rhs, &fwd.y, 2, (5.0, 0.0), &opts).unwrap();
    for (k, (&a, &b)) in back.y.iter().zip(&y0).enumerate() {
        assert!((a - b).abs() < 1e-8, "component {k}: {a} vs {b}");
    }
}

#[test]
fn backward_dense_output_follows_the_solution() {
    // y' = −y from t = 3 down to t = 0 with y(3) = e^{−3}: y(t) = e^{−t}.
    let t_eval = vec![3.0, 2.2, 1.5, 0.3, 0.0];
    let tol = 1e-8;
    let sol = solve_ivp(
        |_t, y, dy| {
            dy[0] = -y[0];
            Ok(())
        },
        3.0,
        0.0,
        &[(-3.0f64).exp()],
        &tight(tol).t_eval(t_eval.clone()),
    )
    .unwrap();
    for (k, &t) in t_eval.iter().enumerate() {
        let want = (-t).exp();
        let got = sol.y_eval[k][0];
        assert!(
            (got - want).abs() < 10.0 * tol * want,
            "t = {t}: {got} vs {want}"
        );
    }
    assert_eq!(sol.y_eval[4], sol.y);
}

#[test]
fn per_row_spans_may_differ_in_length_and_direction() {
    let rhs = |t: &[f64], y: &[f64], dy: &mut [f64]| -> flowfuse::Result<()> {
        for i in 0..t.len() {
            dy[i] = y[i] * t[i].cos();
        }
        Ok(())
    };
    // y' = y·cos t has y(t) = y(t0)·exp(sin t − sin t0).
    let t0 = vec![0.0, 1.0, 3.0, 2.0];
    let t1 = vec![2.0, -1.5, 3.0, 0.5];
    let y0 = [1.0, 2.0, -1.0, 0.5];
    let t_eval = vec![2.0, 1.0, 0.5];
    let sol = solve_batch(
        rhs,
        &y0,
        1,
        Span::per_row(t0.clone(), t1.clone()),
        &tight(1e-9),
    )
    .unwrap();
    for r in 0..4 {
        let want = y0[r] * (t1[r].sin() - t0[r].sin()).exp();
        assert!(
            (sol.y[r] - want).abs() < 1e-8,
            "row {r}: {} vs {want}",
            sol.y[r]
        );
        // A row with t0 == t1 costs nothing and returns y0.
        if t0[r] == t1[r] {
            assert_eq!(sol.stats.nfe[r], 0);
            assert_eq!(sol.y[r], y0[r]);
        }
    }
    // A t_eval list must lie in every row's span, in its direction: here rows 0 and 2 reject it.
    let err = solve_batch(
        rhs,
        &y0,
        1,
        Span::per_row(t0, t1),
        &tight(1e-6).t_eval(t_eval),
    );
    assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
}

// ---------------------------------------------------------------- scipy comparison

type Rhs = fn(f64, &[f64], &mut [f64]);

fn arenstorf(_t: f64, y: &[f64], dy: &mut [f64]) {
    let mu = 0.012277471;
    let mu1 = 1.0 - mu;
    let d1 = ((y[0] + mu).powi(2) + y[1] * y[1]).powf(1.5);
    let d2 = ((y[0] - mu1).powi(2) + y[1] * y[1]).powf(1.5);
    dy[0] = y[2];
    dy[1] = y[3];
    dy[2] = y[0] + 2.0 * y[3] - mu1 * (y[0] + mu) / d1 - mu * (y[0] - mu1) / d2;
    dy[3] = y[1] - 2.0 * y[2] - mu1 * y[1] / d1 - mu * y[1] / d2;
}

fn brusselator(_t: f64, y: &[f64], dy: &mut [f64]) {
    let (u, v) = (y[0], y[1]);
    dy[0] = 1.0 + u * u * v - 4.0 * u;
    dy[1] = 3.0 * u - u * u * v;
}

fn lotka_volterra(_t: f64, y: &[f64], dy: &mut [f64]) {
    let (a, b, c, d) = (1.5, 1.0, 3.0, 1.0);
    dy[0] = a * y[0] - b * y[0] * y[1];
    dy[1] = -c * y[1] + d * y[0] * y[1];
}

fn rigid_body(t: f64, y: &[f64], dy: &mut [f64]) {
    let forcing = if (3.0 * PI..=4.0 * PI).contains(&t) {
        0.25 * t.sin().powi(2)
    } else {
        0.0
    };
    dy[0] = -2.0 * y[1] * y[2];
    dy[1] = 1.25 * y[2] * y[0];
    dy[2] = -0.5 * y[0] * y[1] + forcing;
}

fn pleiades(_t: f64, y: &[f64], dy: &mut [f64]) {
    let (x, yy) = (&y[0..7], &y[7..14]);
    dy[..14].copy_from_slice(&y[14..28]);
    for i in 0..7 {
        let (mut ax, mut ay) = (0.0, 0.0);
        for j in 0..7 {
            if i != j {
                let (dx, dyy) = (x[j] - x[i], yy[j] - yy[i]);
                let r3 = (dx * dx + dyy * dyy).powf(1.5);
                let m = (j + 1) as f64;
                ax += m * dx / r3;
                ay += m * dyy / r3;
            }
        }
        dy[14 + i] = ax;
        dy[21 + i] = ay;
    }
}

fn problem(name: &str) -> Rhs {
    match name {
        "arenstorf" => arenstorf,
        "brusselator" => brusselator,
        "lotka_volterra" => lotka_volterra,
        "rigid_body" => rigid_body,
        "pleiades" => pleiades,
        other => panic!("unknown problem {other} in the reference file"),
    }
}

fn reference() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ode_reference.json");
    let text = std::fs::read_to_string(path).expect("tests/data/ode_reference.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn solve_problem(
    rhs: Rhs,
    t0: f64,
    t1: f64,
    y0: &[f64],
    opts: &OdeOptions,
) -> flowfuse::ode::IvpSolution {
    solve_ivp(
        |t, y, dy| {
            rhs(t, y, dy);
            Ok(())
        },
        t0,
        t1,
        y0,
        opts,
    )
    .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn hairer_problems_match_scipy_rk45_in_error_and_evaluations() {
    let doc = reference();
    let mut report = Vec::new();
    let mut checked = 0;
    for p in doc["problems"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let rhs = problem(name);
        let (t0, t1) = (p["t0"].as_f64().unwrap(), p["t1"].as_f64().unwrap());
        let y0 = floats(&p["y0"]);
        let y_ref = floats(&p["reference"]);
        for run in p["runs"].as_array().unwrap() {
            let tol = run["tol"].as_f64().unwrap();
            let scipy_nfe = run["nfev"].as_u64().unwrap() as f64;
            let scipy_err = run["error"].as_f64().unwrap();
            let sol = solve_problem(rhs, t0, t1, &y0, &tight(tol));
            let err = max_abs_diff(&sol.y, &y_ref);
            let nfe = sol.nfe as f64;
            report.push(format!(
                "{name:15} tol {tol:.0e}: nfe {nfe:6} (scipy {scipy_nfe:6}) error {err:.3e} (scipy {scipy_err:.3e})"
            ));
            assert!(
                (nfe - scipy_nfe).abs() <= 0.15 * scipy_nfe,
                "{name} tol {tol:e}: nfe {nfe} vs scipy {scipy_nfe}\n{}",
                report.join("\n")
            );
            let ratio = err / scipy_err;
            assert!(
                (0.1..=10.0).contains(&ratio),
                "{name} tol {tol:e}: error {err:e} vs scipy {scipy_err:e}\n{}",
                report.join("\n")
            );
            checked += 1;
        }
    }
    println!("{}", report.join("\n"));
    assert!(checked >= 20, "reference file has only {checked} runs");
}

#[test]
fn hairer_problems_converge_to_the_reference_solution() {
    // Our own tight solve agrees with the stored DOP853 reference (so the reference is right),
    // and the error falls as the tolerance falls.
    let doc = reference();
    for p in doc["problems"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let rhs = problem(name);
        let (t0, t1) = (p["t0"].as_f64().unwrap(), p["t1"].as_f64().unwrap());
        let y0 = floats(&p["y0"]);
        let y_ref = floats(&p["reference"]);
        let scale = y_ref.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let tight_sol = solve_problem(rhs, t0, t1, &y0, &tight(1e-12).max_steps(200_000));
        let err = max_abs_diff(&tight_sol.y, &y_ref);
        assert!(err < 1e-7 * scale, "{name}: tight error {err:e}");
        let errs: Vec<f64> = [1e-6, 1e-8, 1e-10]
            .iter()
            .map(|&tol| max_abs_diff(&solve_problem(rhs, t0, t1, &y0, &tight(tol)).y, &y_ref))
            .collect();
        assert!(
            errs[2] < errs[0] && errs[1] < errs[0],
            "{name}: errors {errs:?} do not fall with the tolerance"
        );
    }
}

#[test]
fn pi_controller_solves_the_test_problems_with_similar_work() {
    let doc = reference();
    let pi = Controller::ProportionalIntegral(PiController::default());
    for p in doc["problems"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let rhs = problem(name);
        let (t0, t1) = (p["t0"].as_f64().unwrap(), p["t1"].as_f64().unwrap());
        let y0 = floats(&p["y0"]);
        let y_ref = floats(&p["reference"]);
        let tol = 1e-8;
        let i_sol = solve_problem(rhs, t0, t1, &y0, &tight(tol));
        let pi_sol = solve_problem(rhs, t0, t1, &y0, &tight(tol).controller(pi));
        let (ei, epi) = (
            max_abs_diff(&i_sol.y, &y_ref),
            max_abs_diff(&pi_sol.y, &y_ref),
        );
        let work = pi_sol.nfe as f64 / i_sol.nfe as f64;
        assert!(
            (0.6..=1.5).contains(&work),
            "{name}: PI nfe {} vs I {}",
            pi_sol.nfe,
            i_sol.nfe
        );
        assert!(
            epi < 10.0 * ei.max(tol),
            "{name}: PI error {epi:e} vs I {ei:e}"
        );
    }
}

// ---------------------------------------------------------------- per-sample stepping

/// Rows (y, y') of oscillators y'' = −ω_r² y: rows 0..3 slow, row 3 fast.
const OMEGAS: [f64; 4] = [1.0, 1.2, 0.8, 40.0];

fn oscillator_rows(rows: &[usize], y: &[f64], dy: &mut [f64]) -> flowfuse::Result<()> {
    for (i, &r) in rows.iter().enumerate() {
        let w = OMEGAS[r];
        dy[2 * i] = y[2 * i + 1];
        dy[2 * i + 1] = -w * w * y[2 * i];
    }
    Ok(())
}

#[test]
fn per_sample_steps_let_easy_rows_finish_early() {
    let y0 = [1.0, 0.0, 0.5, 0.5, -1.0, 0.2, 1.0, 0.0];
    let opts = tight(1e-7);
    let per_row = solve_batch_rows(
        |r, _t, y, dy| oscillator_rows(r, y, dy),
        &y0,
        2,
        (0.0, 10.0),
        &opts,
    )
    .unwrap();
    let shared = solve_batch_rows(
        |r, _t, y, dy| oscillator_rows(r, y, dy),
        &y0,
        2,
        (0.0, 10.0),
        &opts.clone().stepping(Stepping::Shared),
    )
    .unwrap();
    let nfe = &per_row.stats.nfe;
    for r in 0..3 {
        assert!(
            5 * nfe[r] < nfe[3],
            "row {r}: {} vs hard row {}",
            nfe[r],
            nfe[3]
        );
    }
    // Shared stepping makes every row pay for the hard one.
    let s = &shared.stats;
    assert!(s.nfe.iter().all(|&n| n == s.nfe[0]), "{:?}", s.nfe);
    assert!(
        s.nfe[0] >= nfe[3] * 9 / 10,
        "shared {} vs hard row {}",
        s.nfe[0],
        nfe[3]
    );
    assert!(
        2 * per_row.stats.row_evaluations < s.row_evaluations,
        "per-row work {} vs shared {}",
        per_row.stats.row_evaluations,
        s.row_evaluations
    );
    assert_eq!(per_row.stats.row_evaluations, nfe.iter().sum::<usize>());
    // Both modes are accurate.
    for (r, &w) in OMEGAS.iter().enumerate() {
        let (a, b) = (y0[2 * r], y0[2 * r + 1] / w);
        let (s10, c10) = (w * 10.0).sin_cos();
        let want = [a * c10 + b * s10, w * (-a * s10 + b * c10)];
        for sol in [&per_row, &shared] {
            let got = sol.final_row(r);
            let err = max_abs_diff(got, &want);
            assert!(err < 1e-4 * w, "row {r}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn a_row_in_a_batch_takes_exactly_the_steps_it_takes_alone() {
    let y0 = [1.0, 0.0, 0.5, 0.5, -1.0, 0.2, 1.0, 0.0];
    let opts = tight(1e-6).t_eval(vec![0.0, 2.5, 7.0, 10.0]);
    let batch = solve_batch_rows(
        |r, _t, y, dy| oscillator_rows(r, y, dy),
        &y0,
        2,
        (0.0, 10.0),
        &opts,
    )
    .unwrap();
    for r in 0..4 {
        let alone = solve_batch_rows(
            |_rows, _t, y, dy| oscillator_rows(&[r], y, dy),
            &y0[2 * r..2 * r + 2],
            2,
            (0.0, 10.0),
            &opts,
        )
        .unwrap();
        assert_eq!(batch.final_row(r), alone.final_row(0), "row {r}");
        assert_eq!(batch.stats.nfe[r], alone.stats.nfe[0], "row {r}");
        assert_eq!(batch.stats.accepted[r], alone.stats.accepted[0]);
        assert_eq!(batch.stats.rejected[r], alone.stats.rejected[0]);
        for k in 0..4 {
            assert_eq!(
                batch.eval_row(k, r),
                alone.eval_row(k, 0),
                "row {r}, t_eval[{k}]"
            );
        }
    }
}

#[test]
fn closure_sees_only_active_rows_in_per_row_mode() {
    let y0 = [1.0, 0.0, 0.5, 0.5, -1.0, 0.2, 1.0, 0.0];
    let mut calls_with_hard_row_alone = 0;
    let sol = solve_batch_rows(
        |rows, t, y, dy| {
            assert_eq!(t.len(), rows.len());
            assert_eq!(y.len(), 2 * rows.len());
            assert!(rows.windows(2).all(|w| w[0] < w[1]));
            if rows == [3] {
                calls_with_hard_row_alone += 1;
            }
            oscillator_rows(rows, y, dy)
        },
        &y0,
        2,
        (0.0, 10.0),
        &tight(1e-6),
    )
    .unwrap();
    assert!(calls_with_hard_row_alone > sol.stats.closure_calls / 2);
}

// ---------------------------------------------------------------- failures

#[test]
fn nan_from_the_vector_field_is_a_typed_error() {
    let y0 = [1.0, 1.0, 1.0];
    let err = solve_batch_rows(
        |rows, t, y, dy| {
            for (i, &r) in rows.iter().enumerate() {
                dy[i] = if r == 2 && t[i] > 0.5 {
                    f64::NAN
                } else {
                    -y[i]
                };
            }
            Ok(())
        },
        &y0,
        1,
        (0.0, 3.0),
        &OdeOptions::default(),
    )
    .unwrap_err();
    match err {
        Error::Ode(OdeFailure::NonFinite { row, t }) => {
            assert_eq!(row, 2);
            assert!(t > 0.5 && t < 3.0, "t = {t}");
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // A closure that leaves dy unwritten is caught the same way.
    let err = solve_batch(
        |_t, _y, _dy| Ok(()),
        &y0,
        1,
        (0.0, 1.0),
        &OdeOptions::default(),
    );
    assert!(
        matches!(err, Err(Error::Ode(OdeFailure::NonFinite { .. }))),
        "{err:?}"
    );
}

#[test]
fn exhausting_the_step_budget_is_a_typed_error() {
    let err = solve_ivp(
        oscillator(100.0),
        0.0,
        100.0,
        &[1.0, 0.0],
        &tight(1e-8).max_steps(50),
    )
    .unwrap_err();
    match err {
        Error::Ode(OdeFailure::MaxSteps { row, t, max_steps }) => {
            assert_eq!((row, max_steps), (0, 50));
            assert!(t > 0.0 && t < 100.0);
        }
        other => panic!("expected MaxSteps, got {other:?}"),
    }
}

#[test]
fn finite_time_blow_up_ends_in_step_underflow() {
    // y' = y², y(0) = 1 has y = 1/(1 − t): it blows up at t = 1.
    let mut calls = 0usize;
    let err = solve_ivp(
        |_t, y, dy| {
            calls += 1;
            dy[0] = y[0] * y[0];
            Ok(())
        },
        0.0,
        2.0,
        &[1.0],
        &tight(1e-6).max_steps(1_000_000),
    )
    .unwrap_err();
    match err {
        Error::Ode(OdeFailure::StepUnderflow { row, t, h }) => {
            assert_eq!(row, 0);
            assert!((t - 1.0).abs() < 1e-6, "stopped at t = {t}");
            assert!(h < 1e-12, "h = {h:e}");
        }
        other => panic!("expected StepUnderflow, got {other:?}"),
    }
    assert!(calls < 100_000, "{calls} evaluations before giving up");
}

#[test]
fn shared_mode_failure_names_the_limiting_row() {
    let y0 = [1.0, 1.0, 1.0];
    let err = solve_batch(
        |_t, y, dy| {
            dy[0] = -y[0];
            dy[1] = y[1] * y[1];
            dy[2] = 0.0;
            Ok(())
        },
        &y0,
        1,
        (0.0, 2.0),
        &tight(1e-6).max_steps(1_000_000).stepping(Stepping::Shared),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Ode(OdeFailure::StepUnderflow { row: 1, .. })),
        "{err:?}"
    );
}

#[test]
fn closure_errors_propagate() {
    let err = solve_batch(
        |t, _y, _dy| {
            if t[0] > 0.2 {
                Err(Error::invalid("vector field refused"))
            } else {
                _dy.fill(1.0);
                Ok(())
            }
        },
        &[0.0],
        1,
        (0.0, 1.0),
        &OdeOptions::default(),
    );
    assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
}

#[test]
fn bad_input_is_rejected_before_any_work() {
    let rhs = |_t: &[f64], y: &[f64], dy: &mut [f64]| -> flowfuse::Result<()> {
        dy.copy_from_slice(y);
        Ok(())
    };
    let ok = OdeOptions::default();
    let cases: Vec<(&str, flowfuse::Result<flowfuse::ode::BatchSolution>)> = vec![
        ("empty", solve_batch(rhs, &[], 2, (0.0, 1.0), &ok)),
        ("dim 0", solve_batch(rhs, &[1.0], 0, (0.0, 1.0), &ok)),
        (
            "ragged",
            solve_batch(rhs, &[1.0, 2.0, 3.0], 2, (0.0, 1.0), &ok),
        ),
        (
            "nan y0",
            solve_batch(rhs, &[1.0, f64::NAN], 2, (0.0, 1.0), &ok),
        ),
        (
            "inf t1",
            solve_batch(rhs, &[1.0], 1, (0.0, f64::INFINITY), &ok),
        ),
        (
            "zero tol",
            solve_batch(rhs, &[1.0], 1, (0.0, 1.0), &tight(0.0)),
        ),
        (
            "neg tol",
            solve_batch(rhs, &[1.0], 1, (0.0, 1.0), &tight(-1e-3)),
        ),
        (
            "no steps",
            solve_batch(rhs, &[1.0], 1, (0.0, 1.0), &ok.clone().max_steps(0)),
        ),
        (
            "bad h0",
            solve_batch(rhs, &[1.0], 1, (0.0, 1.0), &ok.clone().h0(-1.0)),
        ),
        (
            "t_eval outside",
            solve_batch(
                rhs,
                &[1.0],
                1,
                (0.0, 1.0),
                &ok.clone().t_eval(vec![0.5, 1.5]),
            ),
        ),
        (
            "t_eval unsorted",
            solve_batch(
                rhs,
                &[1.0],
                1,
                (0.0, 1.0),
                &ok.clone().t_eval(vec![0.5, 0.2]),
            ),
        ),
        (
            "span rows",
            solve_batch(
                rhs,
                &[1.0, 2.0],
                1,
                Span::per_row(vec![0.0], vec![1.0]),
                &ok,
            ),
        ),
        (
            "shared per-row span",
            solve_batch(
                rhs,
                &[1.0, 2.0],
                1,
                Span::per_row(vec![0.0, 0.0], vec![1.0, 2.0]),
                &ok.clone().stepping(Stepping::Shared),
            ),
        ),
        (
            "controller",
            solve_batch(
                rhs,
                &[1.0],
                1,
                (0.0, 1.0),
                &ok.clone().controller(Controller::Integral(IController {
                    safety: 0.9,
                    min_factor: 2.0,
                    max_factor: 10.0,
                })),
            ),
        ),
    ];
    for (what, result) in cases {
        match result {
            Err(Error::Ode(_)) | Ok(_) => panic!("{what}: expected an input error, got {result:?}"),
            Err(_) => {}
        }
    }
}

#[test]
fn given_first_step_saves_the_probe_evaluation() {
    let sol = solve_ivp(
        oscillator(1.0),
        0.0,
        1.0,
        &[1.0, 0.0],
        &tight(1e-6).h0(0.01),
    )
    .unwrap();
    assert_eq!(sol.nfe, 1 + 6 * (sol.accepted + sol.rejected));
    assert!((sol.y[0] - 1f64.cos()).abs() < 1e-5);
}
