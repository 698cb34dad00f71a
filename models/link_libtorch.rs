// Links the libtorch that torch-sys found: embeds an rpath to it, so binaries and tests load that libtorch and not
// an older system copy (Debian ships libtorch 1.13 in /usr/lib), without LD_LIBRARY_PATH; and, when that libtorch
// is a CUDA build, makes `libtorch_cuda.so` a needed library. Nothing references its symbols directly (its CUDA
// kernels register themselves when it loads), so the linker's `--as-needed` would drop it, and a CUDA libtorch
// would then report no GPU. Link arguments do not reach dependants, so every package whose binaries or tests
// load libtorch uses this script (the root package and launch directly, the trainer through its build.rs).
use std::path::PathBuf;

#[allow(dead_code)]
fn main() {
    link_libtorch();
}

/// Emits the link arguments; returns libtorch's library directory when torch-sys found one.
pub fn link_libtorch() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let dir = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?);
    // RUNPATH is searched before the loader cache and the system directories, which is what matters here.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
    Some(dir)
}
