//! The CUDA backend: a [`Grid`] over the CUDA driver (cudarc, loaded dynamically, so nothing
//! CUDA is needed to build or start the program). Every driver failure is an [`Error`].

pub mod images;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUfunction_attribute_enum, cudaError_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::grid::{Grid, GridDevice, KArg, LaunchCfg};
use crate::backend::Peaks;
use crate::error::{Error, Result};

/// The CUDA backend.
pub type Cuda = Grid<CudaGrid>;

/// The value of a null device pointer argument.
static NULL_PTR: u64 = 0;

/// Dynamic shared memory above this needs an opt-in attribute per function.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

/// Why a GPU can or cannot be used here, without creating a context.
#[derive(Clone, Debug)]
pub struct Availability {
    pub driver: bool,
    pub devices: usize,
    pub nvrtc: bool,
    /// One line for `flowfuse info`.
    pub reason: String,
}

/// Looks for the driver library and counts devices. Never panics.
pub fn availability() -> Availability {
    // SAFETY: only tries to open the shared library by name.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    // SAFETY: as above, for libnvrtc.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !driver {
        return Availability {
            driver,
            devices: 0,
            nvrtc,
            reason: "the CUDA driver library (libcuda.so) was not found".into(),
        };
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Availability {
            driver,
            devices: n as usize,
            nvrtc,
            reason: format!("{n} CUDA device(s)"),
        },
        Ok(_) => Availability {
            driver,
            devices: 0,
            nvrtc,
            reason: "the CUDA driver reports no devices".into(),
        },
        Err(e) => Availability {
            driver,
            devices: 0,
            nvrtc,
            reason: format!("the CUDA driver failed to initialise: {e}"),
        },
    }
}

fn driver_err(op: &str, e: DriverError) -> Error {
    if e.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{op}: {e}"))
    } else {
        Error::Cuda {
            op: op.to_string(),
            reason: e.to_string(),
        }
    }
}

/// Which image of a kernel family was loaded.
#[derive(Clone, Debug)]
pub struct LoadedFamily {
    pub name: &'static str,
    pub image: &'static str,
}

pub struct CudaGrid {
    peaks: Peaks,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(LoadedFamily, Arc<CudaModule>)>,
    /// Loaded functions, and whether their dynamic shared-memory limit has been raised.
    functions: Mutex<HashMap<&'static str, (CudaFunction, bool)>>,
    description: String,
}

impl std::fmt::Debug for CudaGrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGrid({})", self.description)
    }
}

impl Cuda {
    /// Opens device `ordinal` and loads every kernel family. Set FLOWFUSE_KERNEL_SOURCE=nvrtc
    /// to compile the embedded source with NVRTC instead of using the build-time images.
    pub fn open(ordinal: usize) -> Result<Cuda> {
        let avail = availability();
        if !avail.driver {
            return Err(Error::NoDriver(avail.reason));
        }
        if ordinal >= avail.devices {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested; {}",
                avail.reason
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating a context", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("compute capability", e))?;
        let name = ctx.name().map_err(|e| driver_err("device name", e))?;
        let stream = ctx.default_stream();
        let force_nvrtc = std::env::var("FLOWFUSE_KERNEL_SOURCE").is_ok_and(|v| v == "nvrtc");
        let mut modules = Vec::new();
        for fam in images::FAMILIES {
            let (image, module) = load_family(&ctx, fam, (major, minor), force_nvrtc)?;
            modules.push((
                LoadedFamily {
                    name: fam.name,
                    image,
                },
                module,
            ));
        }
        let description = format!("cuda:{ordinal} ({name}, sm_{major}{minor})");
        let peaks = peaks(&ctx, major)?;
        Ok(Grid::with_device(CudaGrid {
            peaks,
            _ctx: ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            description,
        }))
    }
}

/// Peak rates from the SM count, clocks and bus width. Per SM and clock: 128 FP32 FMA lanes
/// (256 flops) on sm_80/sm_90; dense bf16 mma 2048 flops (sm_80) or 4096 (sm_90).
fn peaks(ctx: &Arc<CudaContext>, major: i32) -> Result<Peaks> {
    use cudarc::driver::sys::CUdevice_attribute_enum as A;
    let attr = |a| {
        ctx.attribute(a)
            .map(|v| v as f64)
            .map_err(|e| driver_err("device attribute", e))
    };
    let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let clock_hz = attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? * 1e3;
    let mem_hz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? * 1e3;
    let bus_bytes = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? / 8.0;
    let mma_per_clock = if major >= 9 { 4096.0 } else { 2048.0 };
    Ok(Peaks {
        fp32_tflops: sms * clock_hz * 256.0 / 1e12,
        bf16_tflops: sms * clock_hz * mma_per_clock / 1e12,
        // Double data rate.
        memory_gbs: 2.0 * mem_hz * bus_bytes / 1e9,
    })
}

impl CudaGrid {
    /// Which image each kernel family was loaded from.
    pub fn loaded(&self) -> Vec<LoadedFamily> {
        self.modules.iter().map(|(l, _)| l.clone()).collect()
    }

    fn function(&self, name: &'static str, smem: u32) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().map_err(|_| Error::Cuda {
            op: "kernel cache".into(),
            reason: "poisoned lock".into(),
        })?;
        if !cache.contains_key(name) {
            let f = self
                .modules
                .iter()
                .find_map(|(_, m)| m.load_function(name).ok())
                .ok_or_else(|| {
                    Error::NoKernelImage(format!("kernel {name} is in no loaded module"))
                })?;
            cache.insert(name, (f, false));
        }
        let (f, raised) = cache.get_mut(name).expect("inserted above");
        // The first launch that needs more than 48 KiB raises the limit, also when earlier
        // launches of the same kernel (smaller tiles) did not.
        if smem > DEFAULT_SMEM_LIMIT && !*raised {
            // Large tiles opt in to the full shared memory of the SM (227 KiB on Hopper).
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                227 * 1024,
            )
            .map_err(|e| driver_err(name, e))?;
            *raised = true;
        }
        Ok(f.clone())
    }
}

/// Loads the first image of a family that the device accepts: fatbin, then the sm_90 cubin
/// (on sm_90 only), then compute_80 PTX (sm_80 and newer), then NVRTC on the embedded source.
fn load_family(
    ctx: &Arc<CudaContext>,
    fam: &images::FamilyImages,
    cc: (i32, i32),
    force_nvrtc: bool,
) -> Result<(&'static str, Arc<CudaModule>)> {
    let mut tried = Vec::new();
    if !force_nvrtc {
        if let Some(fatbin) = fam.fatbin {
            match ctx.load_module(Ptx::from_binary(fatbin.to_vec())) {
                Ok(m) => return Ok(("fatbin", m)),
                Err(e) => tried.push(format!("fatbin: {e}")),
            }
        }
        if let (Some(cubin), (9, 0)) = (fam.cubin_sm90, cc) {
            match ctx.load_module(Ptx::from_binary(cubin.to_vec())) {
                Ok(m) => return Ok(("cubin sm_90", m)),
                Err(e) => tried.push(format!("cubin sm_90: {e}")),
            }
        }
        if let Some(ptx) = fam.ptx_compute80.filter(|_| cc.0 >= 8) {
            match ctx.load_module(Ptx::from_src(ptx.trim_end_matches('\0'))) {
                Ok(m) => return Ok(("ptx compute_80", m)),
                Err(e) => tried.push(format!("ptx compute_80: {e}")),
            }
        }
    }
    // SAFETY: only tries to open the shared library by name.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let arch: &'static str = Box::leak(format!("sm_{}{}", cc.0, cc.1).into_boxed_str());
        let opts = CompileOptions {
            arch: Some(arch),
            use_fast_math: Some(true),
            options: vec![
                "-std=c++17".into(),
                "-default-device".into(),
                "-DFF_NVRTC".into(),
            ],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(fam.source, opts)
            .map_err(|e| Error::Compile(format!("{}: {e}", fam.name)))?;
        return ctx
            .load_module(ptx)
            .map(|m| ("NVRTC at run time", m))
            .map_err(|e| {
                Error::NoKernelImage(format!("{}: NVRTC output rejected: {e}", fam.name))
            });
    }
    tried.push("NVRTC: libnvrtc not found".into());
    Err(Error::NoKernelImage(format!(
        "{} on sm_{}{}: {}",
        fam.name,
        cc.0,
        cc.1,
        tried.join("; ")
    )))
}

impl GridDevice for CudaGrid {
    type Buf = CudaSlice<u8>;

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| driver_err("alloc", e))
    }

    fn htod(&self, src: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream
            .clone_htod(src)
            .map_err(|e| driver_err("host to device copy", e))
    }

    fn dtoh(&self, src: &CudaSlice<u8>, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.len() {
            return Err(Error::shape("device to host copy", src.len(), dst.len()));
        }
        let view = src.slice(0..dst.len());
        self.stream
            .memcpy_dtoh(&view, dst)
            .map_err(|e| driver_err("device to host copy", e))
    }

    fn dtod(&self, src: &CudaSlice<u8>) -> Result<CudaSlice<u8>> {
        self.stream
            .clone_dtod(src)
            .map_err(|e| driver_err("device copy", e))
    }

    fn launch(
        &self,
        kernel: &'static str,
        cfg: LaunchCfg,
        args: &[KArg<'_, CudaSlice<u8>>],
    ) -> Result<()> {
        let f = self.function(kernel, cfg.shared_bytes)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KArg::Buf(buf) => b.arg(*buf),
                KArg::Null => b.arg(&NULL_PTR),
                KArg::I32(v) => b.arg(v),
                KArg::U32(v) => b.arg(v),
                KArg::I64(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
            };
        }
        let lc = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shared_bytes,
        };
        // SAFETY: every kernel's parameter list is matched by its launch site in
        // ops/<family>/cuda.rs, and buffer sizes are checked there before the launch.
        unsafe { b.launch(lc) }
            .map(|_| ())
            .map_err(|e| driver_err(kernel, e))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }

    fn peaks(&self) -> Option<Peaks> {
        Some(self.peaks)
    }
}
