//! Build script: compiles the CUDA kernels when a CUDA toolchain is present (build/kernels.rs),
//! and with the `emu` feature also compiles kernels/*.cu and the grid emulator (tests/emu) with
//! the host C++ compiler, so the kernel source runs on the CPU in tests (build/emu.rs).

#[path = "build/emu.rs"]
mod emu;
#[path = "build/kernels.rs"]
mod kernels;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    kernels::build();
    if std::env::var_os("CARGO_FEATURE_EMU").is_some() {
        emu::build();
    }
}
