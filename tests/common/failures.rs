//! Collects comparison failures so that one run reports every failing configuration.

use flowfuse::Tensor;
use flowfuse::testing::{compare, compare_with_slack};

#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    /// Records a failure of [`compare`].
    pub fn check(&mut self, what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
        print_margin(what, got, want, atol, rtol);
        if let Err(msg) = compare(what, got, want, atol, rtol) {
            self.0.push(msg);
        }
    }

    /// As `check`, plus a per-element allowance for ill-conditioned reference values
    /// ([`compare_with_slack`]).
    pub fn check_slack(
        &mut self,
        what: &str,
        got: &Tensor,
        want: &Tensor,
        atol: f32,
        rtol: f32,
        slack: &Tensor,
    ) {
        print_margin(what, got, want, atol, rtol);
        if let Err(msg) = compare_with_slack(what, got, want, atol, rtol, slack) {
            self.0.push(msg);
        }
    }

    /// Records a failure found by other means.
    pub fn push(&mut self, msg: String) {
        self.0.push(msg);
    }

    #[track_caller]
    pub fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} failures:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// FLOWFUSE_TEST_MARGINS=1 prints how much of the tolerance each check uses.
fn print_margin(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    if std::env::var_os("FLOWFUSE_TEST_MARGINS").is_some() {
        let worst = got
            .data()
            .iter()
            .zip(want.data())
            .map(|(g, w)| (g - w).abs() / (atol + rtol * w.abs()))
            .fold(0.0f32, f32::max);
        eprintln!("margin {worst:8.3} of tolerance: {what}");
    }
}
