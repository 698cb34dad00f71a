//! Embeds an rpath to the libtorch that torch-sys linked against, so binaries and tests load that libtorch and not
//! an older system copy (Debian ships libtorch 1.13 in /usr/lib), without LD_LIBRARY_PATH; and, when that libtorch
//! is a CUDA build, makes `libtorch_cuda.so` a needed library. Nothing references its symbols directly (its CUDA
//! kernels register themselves when it loads), so the linker's `--as-needed` would drop it, and a CUDA libtorch
//! would then report no GPU. The root package uses this same script.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // RUNPATH is searched before the loader cache and the system directories, which is what matters here.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!(
                "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state"
            );
        }
    }
}
