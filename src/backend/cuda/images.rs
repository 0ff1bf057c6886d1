//! The kernel images build.rs produced (see build/kernels.rs), embedded in the binary.

/// One kernel family's images; the runtime loads the best one the GPU accepts.
pub struct FamilyImages {
    pub name: &'static str,
    /// The self-contained source (local headers inlined), for NVRTC at run time.
    pub source: &'static str,
    /// nvcc fatbin: sm_90 SASS + compute_80 PTX.
    pub fatbin: Option<&'static [u8]>,
    /// NVRTC cubin for sm_90.
    pub cubin_sm90: Option<&'static [u8]>,
    /// NVRTC PTX for compute_80 (JIT-compiled by the driver on sm_80 and newer).
    pub ptx_compute80: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
