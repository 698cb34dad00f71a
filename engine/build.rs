//! The trainer's build script: libtorch's link arguments (link_libtorch.rs, shared with the packages whose binaries
//! load libtorch), and `csrc/cuda.cpp` (the CUDA caching allocator's counters, the TF32 switches), compiled when the
//! libtorch is a CUDA build and CUDA's headers are found (`CUDA_HOME`, the nvidia wheels beside torch,
//! /usr/local/cuda); `cfg(radit_cuda)` says it was.
use std::path::{Path, PathBuf};

mod link {
    include!("../models/link_libtorch.rs");
}

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rustc-check-cfg=cfg(radit_cuda)");
    let Some(lib) = link::link_libtorch() else {
        return;
    };
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    let Some(cuda_include) = cuda_include(&lib) else {
        println!(
            "cargo:warning=CUDA headers not found (CUDA_HOME, nvidia-cuda-runtime + nvidia-cuda-crt wheels): \
             the engine benchmark reports driver memory instead of the caching allocator's peak"
        );
        return;
    };
    let source = Path::new("csrc/cuda.cpp");
    println!("cargo:rerun-if-changed={}", source.display());
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file(source)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .include(lib.join("../include"))
        .include(cuda_include)
        // libtorch's headers warn under C++17 (torch-sys compiles its shim with -w too).
        .flag("-w")
        .compile("radit_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=radit_cuda");
}

/// A directory with both the CUDA runtime headers and the `crt/` headers they include.
fn cuda_include(torch_lib: &Path) -> Option<PathBuf> {
    let site = torch_lib.parent()?.parent()?;
    let mut dirs: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .collect();
    dirs.extend([
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cuda_runtime/include"),
        PathBuf::from("/usr/local/cuda/include"),
    ]);
    dirs.into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists())
}
