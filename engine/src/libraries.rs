//! Which shared libraries this process has loaded (libtorch, NCCL, the CUDA driver), read from the loader's maps:
//! what the runtime report and the NCCL loader both ask.

use std::path::{Path, PathBuf};

/// Whether the CUDA driver library can be loaded. cudarc panics rather than erroring when it cannot, so every
/// use of cudarc's driver asks this first; checking opens the library, so it is done once.
pub fn cuda_driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to dlopen the driver library by its usual names.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// The directory of the loaded libtorch (`.../torch/lib`), where the wheels beside it are found from.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    loaded_library("libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The file the dynamic loader mapped for a library whose file name starts with `name`.
pub fn loaded_library(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(name)))
        .map(PathBuf::from)
}

/// The file mapped at `addr` in this process (e.g. the library a function pointer points into).
pub fn mapped_file_of(addr: *const std::ffi::c_void) -> Option<PathBuf> {
    let addr = addr as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        let path = f.nth(4)?;
        ((start..end).contains(&addr) && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}
