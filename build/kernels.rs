//! Compiles kernels/*.cu at build time, by the best route this machine offers, and writes
//! `$OUT_DIR/kernel_images.rs` with the images as byte constants. The build never fails for
//! lack of CUDA:
//! 1. nvcc found          -> one fatbin per family (sm_90 SASS + compute_80 PTX);
//! 2. else NVRTC found    -> an sm_90 cubin and compute_80 PTX per family;
//! 3. else                -> the source only, compiled by NVRTC at first use.
//!
//! Register and shared-memory use of every kernel (from ptxas -v, through nvcc, NVRTC or the
//! ptxas binary) goes to `$OUT_DIR/kernel_report.txt`. With FLOWFUSE_DENY_SPILLS=1 a register
//! spill or a compile error fails the build (CI sets it).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One kernel family, after `#include "..."` of local headers has been inlined.
struct Family {
    name: String,
    source: String,
}

/// What one compile produced.
#[derive(Default)]
struct Images {
    fatbin: Option<Vec<u8>>,
    cubin_sm90: Option<Vec<u8>>,
    ptx_compute80: Option<String>,
    /// ptxas -v lines, per kernel.
    usage: BTreeMap<String, KernelUsage>,
}

#[derive(Default, Clone)]
struct KernelUsage {
    arch: String,
    registers: u32,
    smem: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
}

pub fn build() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "FLOWFUSE_EMBED_PTX",
        "FLOWFUSE_NVCC",
        "FLOWFUSE_NVRTC",
        "FLOWFUSE_PTXAS",
        "FLOWFUSE_DENY_SPILLS",
        "FLOWFUSE_KERNEL_MODE",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let families = read_families(Path::new("kernels"));
    let deny_spills = std::env::var("FLOWFUSE_DENY_SPILLS").is_ok_and(|v| v == "1");
    let forced = std::env::var("FLOWFUSE_KERNEL_MODE").unwrap_or_default();

    let nvcc = if forced.is_empty() || forced == "nvcc" {
        find_nvcc()
    } else {
        None
    };
    let nvrtc = if nvcc.is_none() && (forced.is_empty() || forced == "nvrtc") {
        Nvrtc::load()
    } else {
        None
    };
    let ptxas = find_ptxas();

    let mut mode = "source (NVRTC at first use)".to_string();
    let mut images: Vec<(String, Images)> = Vec::new();
    let mut failures = Vec::new();
    for fam in &families {
        let result = if let Some(nvcc) = &nvcc {
            mode = format!("nvcc fatbin ({})", nvcc.display());
            compile_nvcc(nvcc, fam, &out)
        } else if let Some(nvrtc) = &nvrtc {
            mode = format!("NVRTC {} at build time", nvrtc.version);
            compile_nvrtc(nvrtc, fam, ptxas.as_deref(), &out)
        } else {
            Ok(Images::default())
        };
        match result {
            Ok(img) => images.push((fam.name.clone(), img)),
            Err(e) => {
                failures.push(format!("{}: {e}", fam.name));
                images.push((fam.name.clone(), Images::default()));
            }
        }
    }

    let report = write_report(&out, &mode, &images, &failures);
    println!(
        "cargo:warning=flowfuse kernels: {mode}; {} families{}",
        families.len(),
        summary_line(&images)
    );
    let spills: Vec<String> = images
        .iter()
        .flat_map(|(_, img)| img.usage.iter())
        .filter(|(_, u)| u.spill_stores > 0 || u.spill_loads > 0)
        .map(|(k, u)| {
            format!(
                "{k} [{}]: {} B spill stores, {} B spill loads",
                u.arch, u.spill_stores, u.spill_loads
            )
        })
        .collect();
    for f in &failures {
        println!(
            "cargo:warning=kernel compile failed: {}",
            f.lines().next().unwrap_or("")
        );
    }
    for s in &spills {
        println!("cargo:warning=register spill: {s}");
    }
    if deny_spills && (!failures.is_empty() || !spills.is_empty()) {
        panic!("kernel check failed (FLOWFUSE_DENY_SPILLS=1):\n{report}");
    }
    write_images_rs(&out, &mode, &families, &images);
}

fn summary_line(images: &[(String, Images)]) -> String {
    let n: usize = images.iter().map(|(_, i)| i.usage.len()).sum();
    if n == 0 {
        String::new()
    } else {
        format!(", {n} kernel/arch entries checked by ptxas")
    }
}

/// Reads kernels/*.cu (sorted), inlining `#include "x.cuh"` from the same folder so that each
/// family is one self-contained source (what NVRTC gets at run time).
fn read_families(dir: &Path) -> Vec<Family> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    paths.sort();
    paths
        .iter()
        .map(|p| Family {
            name: p.file_stem().unwrap().to_string_lossy().into_owned(),
            source: inline_includes(
                dir,
                &std::fs::read_to_string(p).expect("read kernel source"),
                &mut Vec::new(),
            ),
        })
        .collect()
}

fn inline_includes(dir: &Path, src: &str, seen: &mut Vec<String>) -> String {
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end().trim_end_matches('"').to_string();
            if !seen.contains(&name) {
                seen.push(name.clone());
                let text = std::fs::read_to_string(dir.join(&name))
                    .unwrap_or_else(|e| panic!("kernels/{name}: {e}"));
                out.push_str(&inline_includes(dir, &text, seen));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn find_in_path(exe: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FLOWFUSE_NVCC") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    if let Ok(cuda) = std::env::var("CUDA_PATH") {
        let p = Path::new(&cuda).join("bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    find_in_path("nvcc")
}

/// Where pip's `--target .nvidia` install puts the toolkit pieces, relative to the crate.
fn pip_dir() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(".nvidia/nvidia")
}

fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FLOWFUSE_PTXAS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let pip = pip_dir().join("cuda_nvcc/bin/ptxas");
    if pip.is_file() {
        return Some(pip);
    }
    find_in_path("ptxas")
}

fn compile_nvcc(nvcc: &Path, fam: &Family, out: &Path) -> Result<Images, String> {
    let src = out.join(format!("{}.cu", fam.name));
    std::fs::write(&src, &fam.source).map_err(|e| e.to_string())?;
    let fatbin = out.join(format!("{}.fatbin", fam.name));
    let output = Command::new(nvcc)
        .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"])
        .args([
            "-gencode",
            "arch=compute_90,code=sm_90",
            "-gencode",
            "arch=compute_80,code=compute_80",
        ])
        .arg("-o")
        .arg(&fatbin)
        .arg(&src)
        .output()
        .map_err(|e| format!("running nvcc: {e}"))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(log);
    }
    Ok(Images {
        fatbin: Some(std::fs::read(&fatbin).map_err(|e| e.to_string())?),
        usage: parse_ptxas_log(&log, "sm_90"),
        ..Default::default()
    })
}

fn compile_nvrtc(
    nvrtc: &Nvrtc,
    fam: &Family,
    ptxas: Option<&Path>,
    out: &Path,
) -> Result<Images, String> {
    let common = [
        "-std=c++17",
        "--use_fast_math",
        "-default-device",
        "-DFF_NVRTC",
    ];
    let mut opts: Vec<&str> = common.to_vec();
    opts.extend(["-arch=sm_90", "-Xptxas", "-v"]);
    let (cubin, log90) = nvrtc.compile(&fam.source, &fam.name, &opts, Output::Cubin)?;
    let mut opts80: Vec<&str> = common.to_vec();
    opts80.push("-arch=compute_80");
    let (ptx, _) = nvrtc.compile(&fam.source, &fam.name, &opts80, Output::Ptx)?;
    // NVRTC's PTX ends in a NUL byte; keep it out of the text image.
    let ptx = String::from_utf8_lossy(&ptx)
        .trim_end_matches('\0')
        .to_string();
    let mut usage = parse_ptxas_log(&log90, "sm_90");
    if let Some(ptxas) = ptxas {
        // compute_80 PTX assembled for sm_80 too, so spills on either target are reported.
        let ptx_path = out.join(format!("{}.compute_80.ptx", fam.name));
        std::fs::write(&ptx_path, &ptx).map_err(|e| e.to_string())?;
        let o = Command::new(ptxas)
            .args(["-v", "-arch=sm_80", "-o"])
            .arg(out.join(format!("{}.sm_80.cubin", fam.name)))
            .arg(&ptx_path)
            .output()
            .map_err(|e| format!("running ptxas: {e}"))?;
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() {
            return Err(format!("ptxas sm_80: {log}"));
        }
        for (k, u) in parse_ptxas_log(&log, "sm_80") {
            usage.insert(format!("{k}@sm_80"), u);
        }
    }
    Ok(Images {
        cubin_sm90: Some(cubin),
        ptx_compute80: Some(ptx),
        usage,
        ..Default::default()
    })
}

/// Parses `ptxas -v` output: "Compiling entry function 'k' for 'sm_90'", "Function properties
/// for k", "N bytes stack frame, S bytes spill stores, L bytes spill loads", "Used R registers,
/// ... M bytes smem".
fn parse_ptxas_log(log: &str, arch: &str) -> BTreeMap<String, KernelUsage> {
    let mut map: BTreeMap<String, KernelUsage> = BTreeMap::new();
    let mut current: Option<String> = None;
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let idx = line.find(word)?;
        line[..idx].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(name) = quoted_after(line, "entry function '")
            .or_else(|| word_after(line, "Function properties for "))
        {
            current = Some(name.clone());
            map.entry(name).or_insert_with(|| KernelUsage {
                arch: arch.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(k) = current.as_ref() else { continue };
        let u = map.get_mut(k).expect("inserted above");
        if let Some(v) = number_before(line, "bytes stack frame") {
            u.stack = v;
        }
        if let Some(v) = number_before(line, "bytes spill stores") {
            u.spill_stores = v;
        }
        if let Some(v) = number_before(line, "bytes spill loads") {
            u.spill_loads = v;
        }
        if let Some(v) = number_before(line, "registers") {
            u.registers = v;
        }
        if let Some(v) = number_before(line, "bytes smem") {
            u.smem = v;
        }
    }
    map
}

fn quoted_after(line: &str, prefix: &str) -> Option<String> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('\'')?].to_string())
}

fn word_after(line: &str, prefix: &str) -> Option<String> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace()
        .next()
        .map(|s| s.trim_end_matches(':').to_string())
}

fn write_report(
    out: &Path,
    mode: &str,
    images: &[(String, Images)],
    failures: &[String],
) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "kernel build: {mode}");
    let _ = writeln!(
        r,
        "{:<44} {:>6} {:>5} {:>8} {:>7} {:>7} {:>7}",
        "kernel", "arch", "regs", "smem(B)", "stack", "spillS", "spillL"
    );
    for (_, img) in images {
        for (k, u) in &img.usage {
            let name = k.split('@').next().unwrap_or(k);
            let _ = writeln!(
                r,
                "{:<44} {:>6} {:>5} {:>8} {:>7} {:>7} {:>7}",
                name, u.arch, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
            );
        }
    }
    for f in failures {
        let _ = writeln!(r, "COMPILE ERROR {f}");
    }
    std::fs::write(out.join("kernel_report.txt"), &r).expect("write kernel report");
    r
}

fn write_images_rs(out: &Path, mode: &str, families: &[Family], images: &[(String, Images)]) {
    let mut rs = String::new();
    let _ = writeln!(
        rs,
        "/// How build.rs compiled the kernels.\npub const BUILD_MODE: &str = {mode:?};"
    );
    let _ = writeln!(
        rs,
        "/// ptxas register/shared-memory report of the build.\npub const REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/kernel_report.txt\"));"
    );
    let _ = writeln!(rs, "pub static FAMILIES: &[FamilyImages] = &[");
    for (fam, (_, img)) in families.iter().zip(images) {
        let src_path = out.join(format!("{}.inlined.cu", fam.name));
        std::fs::write(&src_path, &fam.source).expect("write inlined source");
        let bytes = |name: &str, data: &Option<Vec<u8>>| -> String {
            match data {
                Some(d) => {
                    let p = out.join(name);
                    std::fs::write(&p, d).expect("write image");
                    format!("Some(include_bytes!({:?}))", p.display().to_string())
                }
                None => "None".into(),
            }
        };
        // FLOWFUSE_EMBED_PTX=0 leaves the compute_80 PTX out of the binary (it is still compiled
        // and checked): the GPU bundle only needs the sm_90 cubin and the source.
        let embed_ptx = std::env::var("FLOWFUSE_EMBED_PTX").map_or(true, |v| v != "0");
        let ptx = match img.ptx_compute80.as_ref().filter(|_| embed_ptx) {
            Some(p) => {
                let path = out.join(format!("{}.compute_80.ptx", fam.name));
                std::fs::write(&path, p).expect("write ptx");
                format!("Some(include_str!({:?}))", path.display().to_string())
            }
            None => "None".into(),
        };
        let _ = writeln!(
            rs,
            "    FamilyImages {{ name: {:?}, source: include_str!({:?}), fatbin: {}, cubin_sm90: {}, ptx_compute80: {} }},",
            fam.name,
            src_path.display().to_string(),
            bytes(&format!("{}.fatbin.bin", fam.name), &img.fatbin),
            bytes(&format!("{}.sm_90.cubin", fam.name), &img.cubin_sm90),
            ptx
        );
    }
    let _ = writeln!(rs, "];");
    std::fs::write(out.join("kernel_images.rs"), rs).expect("write kernel_images.rs");
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    Ptx,
    Cubin,
}

type NvrtcProgram = *mut c_void;

/// The few NVRTC entry points build.rs needs, loaded from the library by path, so that a pip
/// wheel outside the loader's search path works.
struct Nvrtc {
    lib: libloading::Library,
    version: String,
}

impl Nvrtc {
    fn load() -> Option<Nvrtc> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(p) = std::env::var("FLOWFUSE_NVRTC") {
            candidates.push(PathBuf::from(p));
        }
        candidates.push(pip_dir().join("cuda_nvrtc/lib/libnvrtc.so.12"));
        if let Ok(cuda) = std::env::var("CUDA_PATH") {
            candidates.push(Path::new(&cuda).join("lib64/libnvrtc.so"));
        }
        candidates.push(PathBuf::from("libnvrtc.so.12"));
        candidates.push(PathBuf::from("libnvrtc.so"));
        for c in candidates {
            // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
            if let Ok(lib) = unsafe { libloading::Library::new(&c) } {
                let mut nv = Nvrtc {
                    lib,
                    version: String::new(),
                };
                let (mut major, mut minor) = (0, 0);
                type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
                // SAFETY: nvrtcVersion has this signature in every NVRTC release.
                unsafe {
                    if let Ok(f) = nv.lib.get::<VersionFn>(b"nvrtcVersion\0") {
                        f(&mut major, &mut minor);
                    }
                }
                nv.version = format!("{major}.{minor} ({})", c.display());
                return Some(nv);
            }
        }
        None
    }

    fn compile(
        &self,
        src: &str,
        name: &str,
        opts: &[&str],
        what: Output,
    ) -> Result<(Vec<u8>, String), String> {
        type Create = unsafe extern "C" fn(
            *mut NvrtcProgram,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type Compile = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int;
        type Get = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut NvrtcProgram) -> c_int;
        type ErrStr = unsafe extern "C" fn(c_int) -> *const c_char;
        let csrc = CString::new(src).map_err(|e| e.to_string())?;
        let cname = CString::new(format!("{name}.cu")).expect("no NUL in file names");
        let copts: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(*o).expect("no NUL in options"))
            .collect();
        let popts: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
        // SAFETY: the symbols have the documented NVRTC signatures; every pointer passed lives
        // across the calls; output buffers are sized by the matching *Size call.
        unsafe {
            let create = *self
                .lib
                .get::<Create>(b"nvrtcCreateProgram\0")
                .map_err(|e| e.to_string())?;
            let compile = *self
                .lib
                .get::<Compile>(b"nvrtcCompileProgram\0")
                .map_err(|e| e.to_string())?;
            let log_size = *self
                .lib
                .get::<Size>(b"nvrtcGetProgramLogSize\0")
                .map_err(|e| e.to_string())?;
            let get_log = *self
                .lib
                .get::<Get>(b"nvrtcGetProgramLog\0")
                .map_err(|e| e.to_string())?;
            let (size_sym, get_sym): (&[u8], &[u8]) = match what {
                Output::Ptx => (b"nvrtcGetPTXSize\0", b"nvrtcGetPTX\0"),
                Output::Cubin => (b"nvrtcGetCUBINSize\0", b"nvrtcGetCUBIN\0"),
            };
            let out_size = *self.lib.get::<Size>(size_sym).map_err(|e| e.to_string())?;
            let get_out = *self.lib.get::<Get>(get_sym).map_err(|e| e.to_string())?;
            let destroy = *self
                .lib
                .get::<Destroy>(b"nvrtcDestroyProgram\0")
                .map_err(|e| e.to_string())?;
            let err_str = *self
                .lib
                .get::<ErrStr>(b"nvrtcGetErrorString\0")
                .map_err(|e| e.to_string())?;
            let describe =
                |code: c_int| CStr::from_ptr(err_str(code)).to_string_lossy().into_owned();

            let mut prog: NvrtcProgram = std::ptr::null_mut();
            let rc = create(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram: {}", describe(rc)));
            }
            let rc = compile(prog, popts.len() as c_int, popts.as_ptr());
            let mut n = 0usize;
            log_size(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            get_log(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string();
            if rc != 0 {
                destroy(&mut prog);
                return Err(format!("{} ({}):\n{log}", describe(rc), opts.join(" ")));
            }
            let mut size = 0usize;
            out_size(prog, &mut size);
            let mut buf = vec![0u8; size];
            get_out(prog, buf.as_mut_ptr() as *mut c_char);
            destroy(&mut prog);
            Ok((buf, log))
        }
    }
}
