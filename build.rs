//! Build script. With the `emu` feature, compiles kernels/*.cu and the grid emulator (tests/emu)
//! with the host C++ compiler so the kernel source runs on the CPU in tests.

#[path = "build/emu.rs"]
mod emu;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    if std::env::var_os("CARGO_FEATURE_EMU").is_some() {
        emu::build();
    }
}
