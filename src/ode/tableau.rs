//! The Dormand–Prince 5(4) Butcher tableau (Dormand & Prince 1980; Hairer, Nørsett & Wanner,
//! *Solving ODEs I*, Table II.5.2) and Shampine's (1986) 4th-order continuous extension used for
//! dense output (the same interpolant as scipy's RK45 and diffrax's Dopri5).
//!
//! Stage s (0-based) is K_s = f(t + C[s]·h, y + h·Σ_{j<s} A[s][j]·K_j). The last stage is
//! evaluated at the 5th-order solution itself (A[6] = B5, "first same as last"), so an accepted
//! step hands its K_6 to the next step as K_0: 6 new evaluations per step.

/// Number of stages, counting the FSAL stage.
pub const STAGES: usize = 7;

/// Order of the propagated (5th-order) solution.
pub const ORDER: usize = 5;

/// Order of the embedded error estimator; the controller's exponent is −1/(ERROR_ORDER + 1).
pub const ERROR_ORDER: usize = 4;

/// Nodes c_s.
pub const C: [f64; STAGES] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];

/// Stage coefficients a_sj (row s uses columns j < s).
pub const A: [[f64; STAGES - 1]; STAGES] = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.0 / 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0, 0.0],
    [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0, 0.0],
    [
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
        0.0,
        0.0,
    ],
    [
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
        0.0,
    ],
    [
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];

/// Weights of the 5th-order solution (the one that is propagated: local extrapolation).
pub const B5: [f64; STAGES] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
    0.0,
];

/// Weights of the embedded 4th-order solution.
pub const B4: [f64; STAGES] = [
    5179.0 / 57600.0,
    0.0,
    7571.0 / 16695.0,
    393.0 / 640.0,
    -92097.0 / 339200.0,
    187.0 / 2100.0,
    1.0 / 40.0,
];

/// Error weights e = B5 − B4, written as exact fractions so that they do not carry the
/// cancellation of subtracting two rounded vectors. The local error estimate is h·Σ e_s K_s.
pub const E: [f64; STAGES] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

/// Shampine's continuous extension: b_s(σ) = Σ_j P[s][j]·σ^(j+1) for σ ∈ [0, 1], so that
/// y(t + σh) ≈ y + h·Σ_s b_s(σ)·K_s, with b_s(1) = B5[s]. It is 4th-order accurate.
pub const P: [[f64; 4]; STAGES] = [
    [
        1.0,
        -8048581381.0 / 2820520608.0,
        8663915743.0 / 2820520608.0,
        -12715105075.0 / 11282082432.0,
    ],
    [0.0, 0.0, 0.0, 0.0],
    [
        0.0,
        131558114200.0 / 32700410799.0,
        -68118460800.0 / 10900136933.0,
        87487479700.0 / 32700410799.0,
    ],
    [
        0.0,
        -1754552775.0 / 470086768.0,
        14199869525.0 / 1410260304.0,
        -10690763975.0 / 1880347072.0,
    ],
    [
        0.0,
        127303824393.0 / 49829197408.0,
        -318862633887.0 / 49829197408.0,
        701980252875.0 / 199316789632.0,
    ],
    [
        0.0,
        -282668133.0 / 205662961.0,
        2019193451.0 / 616988883.0,
        -1453857185.0 / 822651844.0,
    ],
    [
        0.0,
        40617522.0 / 29380423.0,
        -110615467.0 / 29380423.0,
        69997945.0 / 29380423.0,
    ],
];

/// The dense-output weights b_s(σ) at the fraction σ = (t − t_old)/h of an accepted step.
pub fn dense_weights(sigma: f64) -> [f64; STAGES] {
    let mut w = [0.0; STAGES];
    for (ws, ps) in w.iter_mut().zip(&P) {
        // Horner in σ for Σ_j P[j]·σ^(j+1).
        *ws = sigma * (ps[0] + sigma * (ps[1] + sigma * (ps[2] + sigma * ps[3])));
    }
    w
}
