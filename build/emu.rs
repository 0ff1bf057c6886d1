//! Builds the CUDA grid emulator (feature `emu`): compiles every kernels/*.cu and the emulator's
//! self-test kernels as C++ with tests/emu/cuda_emu.h force-included, generates a launch thunk
//! per `extern "C" __global__` kernel and a name -> thunk registry, compiles planted-bug variants
//! of the same sources, and links it all with the runtime into one static library.
//!
//! Steps per source file and variant:
//! 1. `g++ -E` with the variant's defines. `__global__` expands to `__attribute__((ffemu_global))`,
//!    which survives preprocessing, so kernels that a macro instantiates are found as well.
//! 2. A wrapper .cpp `#include`s the .cu and appends one thunk per kernel plus the file's table.
//! 3. After compiling, each object is post-processed with objcopy: static `__shared__` variables
//!    (thread_local here) get global names the registry can point at (to poison them and to size
//!    them per kernel), and in a variant every other defined global symbol is renamed with a
//!    variant prefix, so two builds of the same source link side by side without clashes, inline
//!    functions included.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Planted-bug builds: (variant name, extra defines). A kernel `k` compiled under variant `v` is
/// launched as "v/k". Only files whose preprocessed text the defines change are rebuilt.
pub const VARIANTS: &[(&str, &[&str])] = &[
    ("planted_off_by_one", &["FF_PLANT_OFF_BY_ONE"]),
    ("planted_no_barrier", &["FF_PLANT_NO_BARRIER"]),
    ("planted_wrong_shuffle", &["FF_PLANT_WRONG_SHUFFLE"]),
];

const RUNTIME_SOURCES: &[&str] = &[
    "runtime/api.cpp",
    "runtime/machine.cpp",
    "runtime/collectives.cpp",
    "runtime/fiber.cpp",
];

struct Paths {
    emu: PathBuf,
    kernels: PathBuf,
    out: PathBuf,
}

/// One `extern "C" __global__` kernel found in a preprocessed file.
#[derive(Debug, Clone)]
struct Kernel {
    name: String,
    /// How generated code at global scope names it (namespaces included).
    qualified: String,
    /// First argument of `__launch_bounds__`, as source text.
    max_threads: Option<String>,
}

/// A static `__shared__` object of one compiled file.
struct Region {
    symbol: String,
    size: u64,
    owner: Option<String>,
}

struct CompiledFile {
    variant: String,
    table_symbol: String,
    regions: Vec<Region>,
}

pub fn build() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let paths = Paths {
        emu: root.join("tests/emu"),
        kernels: root.join("kernels"),
        out: PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("emu"),
    };
    std::fs::create_dir_all(&paths.out).expect("create OUT_DIR/emu");
    println!("cargo:rerun-if-changed={}", paths.emu.display());
    // A missing path would make cargo rerun this script on every build; kernels/ is watched once
    // it exists (creating it the first time needs a touch of build.rs).
    if paths.kernels.is_dir() {
        println!("cargo:rerun-if-changed={}", paths.kernels.display());
    }

    let mut sources = list_files(&paths.kernels, "cu");
    sources.push(paths.emu.join("selftest.cu"));
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let compiler = kernel_build(&paths, &[]).get_compiler();
    let mut clean_text: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut compiled: Vec<CompiledFile> = Vec::new();
    let mut objects: Vec<PathBuf> = Vec::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();

    let all_variants = std::iter::once(("", &[][..])).chain(VARIANTS.iter().copied());
    for (variant, defines) in all_variants {
        let mut wrappers: Vec<(PathBuf, String, Vec<Kernel>, String)> = Vec::new();
        for src in &sources {
            let text = preprocess(&compiler, &paths, src, defines);
            if variant.is_empty() {
                clean_text.insert(src.clone(), text.clone());
            } else if clean_text.get(src) == Some(&text) {
                continue;
            }
            check_dynamic_shared_names(&text, src);
            let kernels = find_kernels(&text, src);
            if !variant.is_empty() && kernels.is_empty() {
                continue;
            }
            for k in &kernels {
                let full = if variant.is_empty() {
                    k.name.clone()
                } else {
                    format!("{variant}/{}", k.name)
                };
                if let Some(prev) = seen.insert(full.clone(), src.clone()) {
                    panic!(
                        "emu: kernel {full} is defined in both {} and {}",
                        prev.display(),
                        src.display()
                    );
                }
            }
            let stem = ident(&src.file_stem().unwrap().to_string_lossy());
            let table = table_symbol(variant, &stem);
            let wrapper = write_wrapper(&paths, variant, &stem, src, &kernels, &table);
            wrappers.push((wrapper, table, kernels, stem));
        }
        if wrappers.is_empty() {
            continue;
        }
        let mut b = kernel_build(&paths, defines);
        let obj_dir = paths
            .out
            .join(if variant.is_empty() { "clean" } else { variant })
            .join("obj");
        std::fs::create_dir_all(&obj_dir).expect("create object dir");
        b.out_dir(&obj_dir);
        for (w, _, _, _) in &wrappers {
            b.file(w);
        }
        let objs = b.compile_intermediates();
        for (obj, (_, table, kernels, stem)) in objs.into_iter().zip(wrappers) {
            let regions = postprocess_object(&obj, variant, &stem, &table, &kernels);
            compiled.push(CompiledFile {
                variant: variant.to_string(),
                table_symbol: table,
                regions,
            });
            objects.push(obj);
        }
    }

    let registry = write_registry(&paths, &compiled);
    let mut rt = cc::Build::new();
    rt.cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .include(&paths.emu)
        .file(&registry)
        .objects(&objects);
    for s in RUNTIME_SOURCES {
        rt.file(paths.emu.join(s));
    }
    rt.compile("ffemu");
}

/// The cc configuration for kernel translation units.
fn kernel_build(paths: &Paths, defines: &[&str]) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .cargo_metadata(false)
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(paths.emu.join("cuda_emu.h").to_str().expect("utf-8 path"))
        .include(paths.emu.join("include"))
        .include(&paths.kernels)
        .include(&paths.emu)
        // CUDA code reinterprets bytes freely and nvcc tolerates it; g++ -O2 would not.
        .flag("-fno-strict-aliasing")
        .flag("-Wno-attributes");
    for d in defines {
        b.define(d, None);
    }
    b
}

fn list_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn preprocess(compiler: &cc::Tool, paths: &Paths, src: &Path, defines: &[&str]) -> String {
    let mut cmd = compiler.to_command();
    cmd.arg("-E").arg("-x").arg("c++").arg("-std=c++17");
    cmd.arg("-include").arg(paths.emu.join("cuda_emu.h"));
    cmd.arg("-I").arg(paths.emu.join("include"));
    cmd.arg("-I").arg(&paths.kernels);
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    cmd.arg(src);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("emu: cannot run the C++ compiler: {e}"));
    if !out.status.success() {
        panic!(
            "emu: preprocessing {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ident(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn table_symbol(variant: &str, stem: &str) -> String {
    format!(
        "ffemu_table_{}__{}",
        if variant.is_empty() { "clean" } else { variant },
        stem
    )
}

fn write_wrapper(
    paths: &Paths,
    variant: &str,
    stem: &str,
    src: &Path,
    kernels: &[Kernel],
    table: &str,
) -> PathBuf {
    let dir = paths
        .out
        .join(if variant.is_empty() { "clean" } else { variant });
    std::fs::create_dir_all(&dir).expect("create wrapper dir");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// Generated by build/emu.rs: launch thunks for {}.",
        src.display()
    );
    let _ = writeln!(s, "#include \"{}\"", src.display());
    let _ = writeln!(s, "#include \"ffemu_thunk.h\"");
    if kernels.is_empty() {
        let _ = writeln!(
            s,
            "static const ffemu_kernel_entry* const ffemu_entries = nullptr;"
        );
    } else {
        // The launch bound is evaluated where the kernel is declared, so a constant from the
        // kernel's own namespace resolves.
        let mut bounds = Vec::new();
        for k in kernels {
            let Some(expr) = &k.max_threads else {
                bounds.push("0u".to_string());
                continue;
            };
            let ns = &k.qualified[2..k.qualified.rfind("::").unwrap_or(2).max(2)];
            let var = format!("ffemu_launch_bound_{}", k.name);
            if ns.is_empty() {
                let _ = writeln!(s, "static constexpr unsigned {var} = (unsigned)({expr});");
                bounds.push(var);
            } else {
                let _ = writeln!(
                    s,
                    "namespace {ns} {{ static constexpr unsigned {var} = (unsigned)({expr}); }}"
                );
                bounds.push(format!("::{ns}::{var}"));
            }
        }
        let _ = writeln!(s, "static const ffemu_kernel_entry ffemu_entries[] = {{");
        for (k, bound) in kernels.iter().zip(&bounds) {
            let _ = writeln!(
                s,
                "    {{\"{name}\", &ffemu::thunk<&{q}>, ffemu::arity(&{q}), {bound}}},",
                name = k.name,
                q = k.qualified
            );
        }
        let _ = writeln!(s, "}};");
    }
    let _ = writeln!(
        s,
        "extern \"C\" const ffemu_kernel_table {table} = {{\"{stem}\", ffemu_entries, {}u}};",
        kernels.len()
    );
    let path = dir.join(format!("{stem}.cpp"));
    write_if_changed(&path, &s);
    path
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("emu: write {}: {e}", path.display()));
    }
}

fn tool(name: &str) -> String {
    std::env::var(name.to_uppercase()).unwrap_or_else(|_| name.to_string())
}

/// Renames symbols as described in the module comment; returns the file's static shared objects.
fn postprocess_object(
    obj: &Path,
    variant: &str,
    stem: &str,
    table: &str,
    kernels: &[Kernel],
) -> Vec<Region> {
    let out = Command::new(tool("objdump"))
        .arg("-t")
        .arg(obj)
        .output()
        .unwrap_or_else(|e| panic!("emu: cannot run objdump (binutils): {e}"));
    if !out.status.success() {
        panic!(
            "emu: objdump -t {} failed: {}",
            obj.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let tag = ident(if variant.is_empty() { "clean" } else { variant });
    let mut renames: BTreeMap<String, String> = BTreeMap::new();
    let mut globalize: BTreeSet<String> = BTreeSet::new();
    let mut regions = Vec::new();
    for line in listing.lines() {
        let Some(sym) = parse_symbol_line(line) else {
            continue;
        };
        if sym.section == "*UND*" || sym.section == "*ABS*" || renames.contains_key(&sym.name) {
            continue;
        }
        if sym.section.starts_with(".tbss") || sym.section.starts_with(".tdata") {
            if sym.size == 0 {
                continue;
            }
            let new = format!("ffemu_sm_{tag}_{stem}_{}", regions.len());
            let owner = kernels
                .iter()
                .find(|k| {
                    sym.name
                        .starts_with(&format!("_ZZ{}{}E", k.name.len(), k.name))
                })
                .map(|k| k.name.clone());
            renames.insert(sym.name.clone(), new.clone());
            globalize.insert(new.clone());
            regions.push(Region {
                symbol: new,
                size: sym.size,
                owner,
            });
        } else if !variant.is_empty() && sym.global && sym.name != table {
            renames.insert(sym.name.clone(), format!("ffv_{tag}__{}", sym.name));
        }
    }
    if renames.is_empty() {
        return regions;
    }
    let map_path = obj.with_extension("redefine");
    let glob_path = obj.with_extension("globalize");
    let map: String = renames.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
    let glob: String = globalize.iter().map(|g| format!("{g}\n")).collect();
    std::fs::write(&map_path, map).expect("write symbol map");
    std::fs::write(&glob_path, glob).expect("write globalize list");
    let status = Command::new(tool("objcopy"))
        .arg(format!("--redefine-syms={}", map_path.display()))
        .arg(format!("--globalize-symbols={}", glob_path.display()))
        .arg(obj)
        .status()
        .unwrap_or_else(|e| panic!("emu: cannot run objcopy (binutils): {e}"));
    if !status.success() {
        panic!("emu: objcopy on {} failed", obj.display());
    }
    regions
}

struct Symbol {
    name: String,
    section: String,
    size: u64,
    /// Global, GNU-unique or weak binding.
    global: bool,
}

/// One line of `objdump -t`: "VALUE FLAGS SECTION\tSIZE [.hidden] NAME", FLAGS 7 characters.
fn parse_symbol_line(line: &str) -> Option<Symbol> {
    let (left, right) = line.split_once('\t')?;
    if left.len() < 26 || !left.as_bytes()[..16].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let flags = left.get(17..24)?.as_bytes();
    let section = left.get(25..)?.trim().to_string();
    if flags[5] == b'd' || flags[6] == b'f' {
        return None; // section or file symbols
    }
    let mut parts = right.split_whitespace();
    let size = u64::from_str_radix(parts.next()?, 16).ok()?;
    let name = parts.last()?.to_string();
    let global = matches!(flags[0], b'g' | b'u') || flags[1] == b'w';
    Some(Symbol {
        name,
        section,
        size,
        global,
    })
}

fn write_registry(paths: &Paths, files: &[CompiledFile]) -> PathBuf {
    let mut s = String::from(
        "// Generated by build/emu.rs: every kernel table and static shared object.\n",
    );
    s.push_str("#include \"ffemu_abi.h\"\n\n");
    for f in files {
        let _ = writeln!(
            s,
            "extern \"C\" const ffemu_kernel_table {};",
            f.table_symbol
        );
        for r in &f.regions {
            let _ = writeln!(s, "extern __thread unsigned char {}[];", r.symbol);
            let _ = writeln!(s, "static void* addr_{0}() {{ return {0}; }}", r.symbol);
        }
    }
    s.push('\n');
    for (i, f) in files.iter().enumerate() {
        if f.regions.is_empty() {
            continue;
        }
        let _ = writeln!(s, "static const ffemu_smem_region regions_{i}[] = {{");
        for r in &f.regions {
            let owner = r
                .owner
                .as_ref()
                .map_or("nullptr".to_string(), |o| format!("\"{o}\""));
            let _ = writeln!(s, "    {{{owner}, &addr_{}, {}u}},", r.symbol, r.size);
        }
        let _ = writeln!(s, "}};");
    }
    s.push_str("\nextern \"C\" const ffemu_registry_file ffemu_registry_files[] = {\n");
    for (i, f) in files.iter().enumerate() {
        let regions = if f.regions.is_empty() {
            "nullptr".to_string()
        } else {
            format!("regions_{i}")
        };
        let _ = writeln!(
            s,
            "    {{\"{}\", &{}, {regions}, {}u}},",
            f.variant,
            f.table_symbol,
            f.regions.len()
        );
    }
    if files.is_empty() {
        s.push_str("    {\"\", nullptr, nullptr, 0u},\n");
    }
    s.push_str("};\n");
    let _ = writeln!(
        s,
        "extern \"C\" const unsigned ffemu_registry_file_count = {}u;",
        files.len()
    );
    let path = paths.out.join("registry.cpp");
    write_if_changed(&path, &s);
    path
}

// ---- scanning the preprocessed source ----

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Punct(char),
    Other,
}

struct Token {
    tok: Tok,
    end: usize,
}

/// A C++ tokenizer good enough to find declarations: identifiers, string and character literals,
/// numbers and single punctuation characters; preprocessor line markers are skipped.
fn tokenize(src: &str) -> Vec<Token> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line_start = true;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if line_start && c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        line_start = false;
        let start = i;
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &src[start..i];
            // Raw string literal R"delim( ... )delim" (also u8R, LR, ...).
            if word.ends_with('R') && i < b.len() && b[i] == b'"' {
                let open = src[i + 1..].find('(').map(|p| i + 1 + p);
                if let Some(open) = open {
                    let delim = &src[i + 1..open];
                    let close = format!("){delim}\"");
                    let end = src[open..]
                        .find(&close)
                        .map_or(b.len(), |p| open + p + close.len());
                    out.push(Token {
                        tok: Tok::Str(src[start..end].to_string()),
                        end,
                    });
                    i = end;
                    continue;
                }
            }
            out.push(Token {
                tok: Tok::Ident(word.to_string()),
                end: i,
            });
        } else if c.is_ascii_digit() || (c == b'.' && i + 1 < b.len() && b[i + 1].is_ascii_digit())
        {
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'\'' || b[i] == b'_')
            {
                if (b[i] == b'e' || b[i] == b'E' || b[i] == b'p' || b[i] == b'P')
                    && i + 1 < b.len()
                    && (b[i + 1] == b'+' || b[i + 1] == b'-')
                {
                    i += 1;
                }
                i += 1;
            }
            out.push(Token {
                tok: Tok::Other,
                end: i,
            });
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(b.len());
            let tok = if c == b'"' {
                Tok::Str(src[start..i].to_string())
            } else {
                Tok::Other
            };
            out.push(Token { tok, end: i });
        } else {
            let ch = src[i..].chars().next().unwrap();
            i += ch.len_utf8();
            out.push(Token {
                tok: Tok::Punct(ch),
                end: i,
            });
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Scope {
    ExternC,
    Namespace(Option<String>),
    Other,
}

fn is_ident(t: &Token, s: &str) -> bool {
    matches!(&t.tok, Tok::Ident(x) if x == s)
}

fn is_punct(t: &Token, c: char) -> bool {
    t.tok == Tok::Punct(c)
}

/// Index of the token closing the bracket opened at `open`.
fn matching(toks: &[Token], open: usize, o: char, c: char) -> Option<usize> {
    let mut depth = 0usize;
    for (j, t) in toks.iter().enumerate().skip(open) {
        if is_punct(t, o) {
            depth += 1;
        } else if is_punct(t, c) {
            depth -= 1;
            if depth == 0 {
                return Some(j);
            }
        }
    }
    None
}

fn classify_brace(toks: &[Token], i: usize) -> Scope {
    if i >= 2
        && matches!(&toks[i - 1].tok, Tok::Str(s) if s == "\"C\"" || s == "\"C++\"")
        && is_ident(&toks[i - 2], "extern")
    {
        return Scope::ExternC;
    }
    // namespace a::b { ... } and namespace { ... }
    let mut j = i;
    let mut names = Vec::new();
    while j >= 1 {
        match &toks[j - 1].tok {
            Tok::Ident(x) if x == "namespace" => {
                names.reverse();
                return Scope::Namespace(if names.is_empty() {
                    None
                } else {
                    Some(names.join("::"))
                });
            }
            Tok::Ident(x) if x != "inline" => {
                names.push(x.clone());
                j -= 1;
                if j >= 2 && is_punct(&toks[j - 1], ':') && is_punct(&toks[j - 2], ':') {
                    j -= 2;
                    continue;
                }
                if j >= 1 && is_ident(&toks[j - 1], "namespace") {
                    continue;
                }
                return Scope::Other;
            }
            _ => return Scope::Other,
        }
    }
    Scope::Other
}

fn find_kernels(src: &str, file: &Path) -> Vec<Kernel> {
    let toks = tokenize(src);
    let mut scopes: Vec<Scope> = Vec::new();
    let mut stmt_start = 0usize;
    let mut found: Vec<Kernel> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i];
        if is_punct(t, '{') {
            scopes.push(classify_brace(&toks, i));
            stmt_start = i + 1;
        } else if is_punct(t, '}') {
            scopes.pop();
            stmt_start = i + 1;
        } else if is_punct(t, ';') {
            stmt_start = i + 1;
        } else if is_ident(t, "ffemu_global")
            && !scopes.iter().any(|s| matches!(s, Scope::Other))
            && let Some(k) = kernel_at(&toks, &scopes, stmt_start, i, file)
            && !found.iter().any(|f| f.name == k.name)
        {
            found.push(k);
        }
        i += 1;
    }
    found
}

/// The kernel whose declaration starts at `stmt_start` and carries the marker at `marker`, if it
/// is an `extern "C"` definition (declarations and templates are skipped).
fn kernel_at(
    toks: &[Token],
    scopes: &[Scope],
    stmt_start: usize,
    marker: usize,
    file: &Path,
) -> Option<Kernel> {
    let head = &toks[stmt_start..marker];
    if head.iter().any(|t| is_ident(t, "template")) {
        return None;
    }
    let extern_c = scopes.iter().any(|s| matches!(s, Scope::ExternC))
        || head
            .windows(2)
            .any(|w| is_ident(&w[0], "extern") && matches!(&w[1].tok, Tok::Str(s) if s == "\"C\""));
    // Find the declarator name: the first identifier followed by '(' that is not an attribute.
    let mut j = marker + 1;
    let mut name_at = None;
    while j + 1 < toks.len() {
        let t = &toks[j];
        if is_punct(t, ';') || is_punct(t, '{') {
            break;
        }
        if is_ident(t, "__attribute__") || is_ident(t, "__declspec") {
            j = matching(toks, j + 1, '(', ')')? + 1;
            continue;
        }
        if matches!(t.tok, Tok::Ident(_)) && is_punct(&toks[j + 1], '(') {
            name_at = Some(j);
            break;
        }
        j += 1;
    }
    let name_at = name_at?;
    let Tok::Ident(name) = &toks[name_at].tok else {
        return None;
    };
    let close = matching(toks, name_at + 1, '(', ')')?;
    let mut k = close + 1;
    while k < toks.len() && !is_punct(&toks[k], '{') && !is_punct(&toks[k], ';') {
        k += 1;
    }
    if k >= toks.len() || !is_punct(&toks[k], '{') {
        return None; // a declaration; the definition (if in this file) has its own marker
    }
    if !extern_c {
        println!(
            "cargo:warning=emu: __global__ {name} in {} is not extern \"C\"; it is not registered",
            file.display()
        );
        return None;
    }
    // __launch_bounds__(max_threads[, min_blocks[, max_cluster]]) anywhere in the declaration.
    // cuda_emu.h stringizes the arguments (g++ would try to parse them), so the marker carries
    // one string literal; macros in it expand when the wrapper evaluates it in the same TU.
    let mut max_threads = None;
    for p in stmt_start..name_at.saturating_sub(2) {
        if is_ident(&toks[p], "ffemu_launch_bounds")
            && is_punct(&toks[p + 1], '(')
            && let Tok::Str(lit) = &toks[p + 2].tok
        {
            let text = unquote(lit);
            let first = first_argument(&text).trim().to_string();
            if !first.is_empty() {
                max_threads = Some(first);
            }
        }
    }
    let mut qualified = String::new();
    for s in scopes {
        if let Scope::Namespace(Some(ns)) = s {
            qualified.push_str("::");
            qualified.push_str(ns);
        }
    }
    qualified.push_str("::");
    qualified.push_str(name);
    Some(Kernel {
        name: name.clone(),
        qualified,
        max_threads,
    })
}

/// The contents of a plain string literal token (the stringized launch bounds).
fn unquote(lit: &str) -> String {
    let inner = lit
        .strip_prefix('"')
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or(lit);
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The text before the first comma that is not nested in brackets.
fn first_argument(args: &str) -> &str {
    let mut depth = 0i32;
    for (i, c) in args.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => return &args[..i],
            _ => {}
        }
    }
    args
}

/// Dynamic shared memory must be declared as `extern __shared__ T ff_smem[]` (see cuda_emu.h):
/// the runtime provides that one symbol. Any other name would only fail at link time, far from
/// the cause, so it is reported here.
fn check_dynamic_shared_names(src: &str, file: &Path) {
    let toks = tokenize(src);
    for w in toks.windows(2) {
        if is_ident(&w[0], "extern") && is_ident(&w[1], "thread_local") {
            let start = w[1].end;
            let rest = &src[start..];
            let decl = &rest[..rest.find(';').unwrap_or(rest.len())];
            let before_bracket = decl.split('[').next().unwrap_or("");
            let name = before_bracket
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .rfind(|s| !s.is_empty());
            if name != Some("ff_smem") {
                panic!(
                    "emu: {}: dynamic shared memory must be declared as `extern __shared__ T ff_smem[];` \
                     (found `extern __shared__{decl}`)",
                    file.display()
                );
            }
        }
    }
}
