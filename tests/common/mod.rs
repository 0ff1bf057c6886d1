//! Backends for the test suites. A test body is written once, generic over `B: Backend`, and
//! instantiated for every backend with [`on_grid_backends!`]: the emulated grid under several
//! thread orders (every `cargo test`), and the CUDA backend when a GPU is present. Without a
//! GPU the CUDA instance prints why it skips; with FLOWFUSE_REQUIRE_GPU=1 a skip is a failure.
#![allow(dead_code)]

use flowfuse::backend::cuda::{Cuda, availability};

pub mod coupling;
pub mod failures;
pub mod train;

/// The CUDA backend, or None (with the reason printed) when this machine cannot run it.
pub fn cuda_or_skip(test: &str) -> Option<Cuda> {
    let required = std::env::var("FLOWFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let avail = availability();
    let reason = if avail.devices == 0 {
        avail.reason
    } else {
        match Cuda::open(0) {
            Ok(c) => return Some(c),
            Err(e) => e.to_string(),
        }
    };
    if required {
        panic!("{test}: FLOWFUSE_REQUIRE_GPU=1 but the CUDA backend is unavailable: {reason}");
    }
    eprintln!("skipping {test} on CUDA: {reason}");
    None
}

/// Instantiates `$body(&backend)` as one test per emulated thread order and one on CUDA.
#[macro_export]
macro_rules! on_grid_backends {
    ($name:ident, $body:path) => {
        mod $name {
            #[test]
            fn emu_forward() {
                $body(&flowfuse::backend::emu::Emu::emulated(
                    flowfuse::backend::emu::ThreadOrder::Forward,
                ));
            }
            #[test]
            fn emu_reverse() {
                $body(&flowfuse::backend::emu::Emu::emulated(
                    flowfuse::backend::emu::ThreadOrder::Reverse,
                ));
            }
            #[test]
            fn emu_shuffled() {
                $body(&flowfuse::backend::emu::Emu::emulated(
                    flowfuse::backend::emu::ThreadOrder::Shuffle(0x5eed),
                ));
            }
            #[test]
            fn cuda() {
                if let Some(b) = $crate::common::cuda_or_skip(concat!(module_path!(), "::cuda")) {
                    $body(&b);
                }
            }
        }
    };
}

/// `on_grid_backends!` with the grid backends switched to bf16 tensor-core matrix products.
#[macro_export]
macro_rules! on_grid_backends_bf16 {
    ($name:ident, $body:path) => {
        mod $name {
            use flowfuse::backend::emu::{Emu, ThreadOrder};
            use flowfuse::backend::grid::Precision;
            #[test]
            fn emu_forward() {
                $body(&Emu::emulated(ThreadOrder::Forward).with_precision(Precision::Bf16));
            }
            #[test]
            fn emu_reverse() {
                $body(&Emu::emulated(ThreadOrder::Reverse).with_precision(Precision::Bf16));
            }
            #[test]
            fn emu_shuffled() {
                $body(&Emu::emulated(ThreadOrder::Shuffle(0x5eed)).with_precision(Precision::Bf16));
            }
            #[test]
            fn cuda() {
                if let Some(b) = $crate::common::cuda_or_skip(concat!(module_path!(), "::cuda")) {
                    $body(&b.with_precision(Precision::Bf16));
                }
            }
        }
    };
}
