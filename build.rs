//! Build script: compiles the CUDA kernels when a toolchain is present (build/kernels.rs).

#[path = "build/kernels.rs"]
mod kernels;

fn main() {
    kernels::build();
}
