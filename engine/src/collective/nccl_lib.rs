//! Finds and opens NCCL the way users install it. cudarc's own loader only tries names like `libnccl.so` and
//! `libnccl.so.12`, while the PyPI wheel (`nvidia-nccl-*`, what torch depends on) and most clusters ship
//! `libnccl.so.2`; so radit opens the library itself, in this order, and says which one it loaded:
//!
//! 1. `RADIT_NCCL_LIB`, a path (when set, nothing else is tried: an explicit choice that fails is an error);
//! 2. the `libnccl.so*` already mapped into this process (libtorch_cuda links NCCL, and the loader resolved it);
//! 3. the first `libnccl.so.2` in a directory of `LD_LIBRARY_PATH` (a site's `module load nccl`): the file the
//!    loader resolves for libtorch too, since `LD_LIBRARY_PATH` comes before the wheel's RUNPATH;
//! 4. the nvidia-nccl wheel beside the loaded libtorch (`site-packages/nvidia/nccl/lib/libnccl.so.2`);
//! 5. `libnccl.so.2`, then `libnccl.so`, through the dynamic loader (the system's library cache).
//!
//! Steps 2 and 3 keep one NCCL per process: collectives and libtorch's own NCCL calls use the same file.
//! The few NCCL functions radit calls are resolved once into [`NcclLibrary`]; cudarc still provides the types.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{ncclComm_t, ncclUniqueId};

/// An explicit path to the NCCL library.
pub const NCCL_LIB_VAR: &str = "RADIT_NCCL_LIB";

/// `ncclResult_t`, `ncclDataType_t` and `ncclRedOp_t` are C enums (int-sized); kept as integers so that a value
/// this build does not know cannot be undefined behaviour.
pub type NcclResult = u32;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> NcclResult;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> NcclResult;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> NcclResult;
type GetErrorString = unsafe extern "C" fn(NcclResult) -> *const c_char;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    u32,
    u32,
    ncclComm_t,
    *mut c_void,
) -> NcclResult;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    u32,
    ncclComm_t,
    *mut c_void,
) -> NcclResult;
type ReduceScatter = AllReduce;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    u32,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> NcclResult;

/// The opened library and the functions radit calls.
pub struct NcclLibrary {
    /// The file the dynamic loader mapped (resolved, so a bare name shows where it was found).
    pub path: PathBuf,
    /// How it was found (`RADIT_NCCL_LIB`, `the nvidia-nccl wheel beside libtorch`, `the dynamic loader`).
    pub found_by: &'static str,
    /// `ncclGetVersion`, e.g. 22703 for 2.27.3.
    pub version: i32,
    pub get_unique_id: GetUniqueId,
    pub comm_init_rank: CommInitRank,
    pub comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    pub all_reduce: AllReduce,
    pub all_gather: AllGather,
    pub reduce_scatter: ReduceScatter,
    pub broadcast: Broadcast,
    // Kept open for the life of the process: the function pointers above point into it.
    _lib: libloading::Library,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NCCL {} at {} (found by {})",
            self.version_string(),
            self.path.display(),
            self.found_by
        )
    }
}

impl NcclLibrary {
    /// `2.27.3` from NCCL's integer version.
    pub fn version_string(&self) -> String {
        let v = self.version;
        let (major, minor, patch) = if v >= 10_000 {
            (v / 10_000, (v % 10_000) / 100, v % 100)
        } else {
            (v / 1000, (v % 1000) / 100, v % 100)
        };
        format!("{major}.{minor}.{patch}")
    }

    /// NCCL's description of a result code.
    pub fn error_string(&self, code: NcclResult) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        format!("{s} (NCCL error {code})")
    }

    /// `Ok` for ncclSuccess, else NCCL's description.
    pub fn check(&self, code: NcclResult) -> Result<(), String> {
        if code == 0 {
            Ok(())
        } else {
            Err(self.error_string(code))
        }
    }
}

/// One place to look for the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// A path, or a bare name for the dynamic loader to search.
    pub target: PathBuf,
    pub found_by: &'static str,
}

/// Where to look, in order (`var` reads the environment; `torch_lib` is the directory of the loaded libtorch;
/// `loaded` the NCCL file already mapped into the process, if any).
pub fn candidates(
    var: impl Fn(&str) -> Option<String>,
    torch_lib: Option<&Path>,
    loaded: Option<PathBuf>,
) -> Vec<Candidate> {
    if let Some(p) = var(NCCL_LIB_VAR).filter(|p| !p.trim().is_empty()) {
        return vec![Candidate {
            target: PathBuf::from(p),
            found_by: NCCL_LIB_VAR,
        }];
    }
    let mut out = Vec::new();
    if let Some(p) = loaded {
        out.push(Candidate {
            target: p,
            found_by: "the NCCL already loaded in this process",
        });
    }
    let search = var("LD_LIBRARY_PATH").unwrap_or_default();
    if let Some(first) = std::env::split_paths(&search)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join("libnccl.so.2"))
        .find(|f| f.exists())
    {
        out.push(Candidate {
            target: first,
            found_by: "LD_LIBRARY_PATH (the NCCL libtorch resolves)",
        });
    }
    if let Some(site) = torch_lib.and_then(|d| d.parent()).and_then(|t| t.parent()) {
        for dir in ["nvidia/nccl/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"] {
            out.push(Candidate {
                target: site.join(dir).join("libnccl.so.2"),
                found_by: "the nvidia-nccl wheel beside libtorch",
            });
        }
    }
    for name in ["libnccl.so.2", "libnccl.so"] {
        out.push(Candidate {
            target: PathBuf::from(name),
            found_by: "the dynamic loader",
        });
    }
    out
}

/// Why no NCCL could be opened: every place tried, with what it said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot load NCCL; tried {}", .tried.join("; "))]
pub struct NcclNotFound {
    pub tried: Vec<String>,
}

fn symbol<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, String> {
    // SAFETY: the type `T` is the C signature of the named NCCL function (nccl.h).
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(name)))
}

fn open(c: &Candidate) -> Result<NcclLibrary, String> {
    let is_path = c.target.components().count() > 1;
    if is_path && !c.target.exists() {
        return Err(format!("{} (no such file)", c.target.display()));
    }
    // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(&c.target) }
        .map_err(|e| format!("{}: {e}", c.target.display()))?;
    let get_version: GetVersion = symbol(&lib, b"ncclGetVersion\0")?;
    let mut version: c_int = 0;
    // SAFETY: a valid out-pointer.
    let code = unsafe { get_version(&mut version) };
    if code != 0 {
        return Err(format!(
            "{}: ncclGetVersion failed ({code})",
            c.target.display()
        ));
    }
    let all_gather: AllGather = symbol(&lib, b"ncclAllGather\0")?;
    let path = crate::libraries::mapped_file_of(all_gather as *const c_void)
        .unwrap_or_else(|| c.target.clone());
    Ok(NcclLibrary {
        path,
        found_by: c.found_by,
        version,
        get_unique_id: symbol(&lib, b"ncclGetUniqueId\0")?,
        comm_init_rank: symbol(&lib, b"ncclCommInitRank\0")?,
        comm_destroy: symbol(&lib, b"ncclCommDestroy\0")?,
        get_error_string: symbol(&lib, b"ncclGetErrorString\0")?,
        all_reduce: symbol(&lib, b"ncclAllReduce\0")?,
        all_gather,
        reduce_scatter: symbol(&lib, b"ncclReduceScatter\0")?,
        broadcast: symbol(&lib, b"ncclBroadcast\0")?,
        _lib: lib,
    })
}

/// Opens the first candidate that loads.
pub fn load_from(candidates: &[Candidate]) -> Result<NcclLibrary, NcclNotFound> {
    let mut tried = Vec::new();
    for c in candidates {
        match open(c) {
            Ok(lib) => return Ok(lib),
            Err(e) => tried.push(format!("{} ({e})", c.found_by)),
        }
    }
    Err(NcclNotFound { tried })
}

/// The process's NCCL, opened on first use from this process's environment and libtorch.
pub fn nccl() -> Result<&'static NcclLibrary, NcclNotFound> {
    static LIB: OnceLock<Result<NcclLibrary, NcclNotFound>> = OnceLock::new();
    LIB.get_or_init(|| {
        let torch_lib = crate::libraries::libtorch_lib_dir();
        let loaded = crate::libraries::loaded_library("libnccl.so");
        let found = load_from(&candidates(
            |k| std::env::var(k).ok(),
            torch_lib.as_deref(),
            loaded,
        ));
        match &found {
            Ok(lib) => tracing::info!(nccl = ?lib, "loaded NCCL"),
            Err(e) => tracing::debug!(error = %e, "no NCCL"),
        }
        found
    })
    .as_ref()
    .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_testkit::env;

    #[test]
    fn an_explicit_path_is_the_only_candidate_and_the_wheel_comes_before_the_loader() {
        let torch = Path::new("/venv/lib/python3.11/site-packages/torch/lib");
        let c = candidates(
            env(&[(NCCL_LIB_VAR, "/opt/nccl/libnccl.so.2")]),
            Some(torch),
            Some("/elsewhere/libnccl.so.2".into()),
        );
        assert_eq!(
            c,
            vec![Candidate {
                target: "/opt/nccl/libnccl.so.2".into(),
                found_by: NCCL_LIB_VAR
            }]
        );
        let c = candidates(env(&[]), Some(torch), None);
        assert_eq!(
            c[0].target,
            Path::new("/venv/lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2")
        );
        let names: Vec<_> = c.iter().map(|c| c.target.display().to_string()).collect();
        assert_eq!(names[names.len() - 2..], ["libnccl.so.2", "libnccl.so"]);
        assert_eq!(candidates(env(&[]), None, None).len(), 2);
    }

    #[test]
    fn a_missing_explicit_library_is_an_error_naming_it() {
        let e = load_from(&candidates(
            env(&[(NCCL_LIB_VAR, "/nonexistent/libnccl.so.2")]),
            None,
            None,
        ))
        .unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("RADIT_NCCL_LIB") && shown.contains("/nonexistent/libnccl.so.2"),
            "{shown}"
        );
    }

    /// torch's wheel depends on nvidia-nccl, so the NCCL beside the loaded libtorch opens here, GPU or not (NCCL
    /// needs a GPU only to create a communicator).
    #[test]
    fn the_wheel_s_nccl_beside_the_loaded_libtorch_opens_and_says_its_version() {
        let torch_lib = crate::libraries::libtorch_lib_dir();
        let lib = load_from(&candidates(env(&[]), torch_lib.as_deref(), None)).expect("NCCL loads");
        assert_eq!(lib.found_by, "the nvidia-nccl wheel beside libtorch");
        assert!(lib.path.ends_with("libnccl.so.2"), "{lib:?}");
        assert!(lib.version >= 21_800, "{lib:?}");
        assert!(
            lib.error_string(4).contains("invalid argument"),
            "{}",
            lib.error_string(4)
        );
        assert!(lib.check(0).is_ok());
        // The same file through an explicit path.
        let again = load_from(&candidates(
            env(&[(NCCL_LIB_VAR, lib.path.to_str().unwrap())]),
            None,
            None,
        ))
        .unwrap();
        assert_eq!((again.found_by, again.version), (NCCL_LIB_VAR, lib.version));
    }

    /// A site module on LD_LIBRARY_PATH (here a fake library file) comes before the wheel, and the NCCL already
    /// loaded in the process comes before both: one NCCL per process.
    #[test]
    fn the_nccl_libtorch_resolves_comes_before_the_wheel() {
        let module = tempfile::tempdir().unwrap();
        let fake = module.path().join("libnccl.so.2");
        std::fs::write(&fake, b"not really NCCL").unwrap();
        let search = format!("/nonexistent/lib::{}", module.path().display());
        let torch = Path::new("/venv/lib/python3.12/site-packages/torch/lib");
        let c = candidates(env(&[("LD_LIBRARY_PATH", &search)]), Some(torch), None);
        assert_eq!(c[0].target, fake);
        assert_eq!(
            c[0].found_by,
            "LD_LIBRARY_PATH (the NCCL libtorch resolves)"
        );
        assert!(c[1].found_by.contains("wheel"), "{c:?}");
        let c = candidates(
            env(&[("LD_LIBRARY_PATH", &search)]),
            Some(torch),
            Some("/opt/loaded/libnccl.so.2".into()),
        );
        assert_eq!(c[0].target, Path::new("/opt/loaded/libnccl.so.2"));
        assert_eq!(c[1].target, fake);
        // The fake does not open: the error names it and the loader goes on to the next candidate.
        let e = load_from(&c[1..2]).unwrap_err().to_string();
        assert!(
            e.contains("LD_LIBRARY_PATH") && e.contains("libnccl.so.2"),
            "{e}"
        );
    }
}
