//! The built binary links what a GPU run needs: with a CUDA libtorch, `libtorch_cuda.so` must be in the ELF
//! `NEEDED` list (the linker's `--as-needed` drops it otherwise, and libtorch then reports no GPU), and the rpath
//! points at the libtorch it was built against.

use std::path::{Path, PathBuf};

fn dynamic_section(bin: &Path) -> (Vec<String>, Vec<String>) {
    let bytes = std::fs::read(bin).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).expect("an ELF binary");
    let needed = elf.libraries.iter().map(|s| s.to_string()).collect();
    let mut paths: Vec<String> = elf.runpaths.iter().map(|s| s.to_string()).collect();
    paths.extend(elf.rpaths.iter().map(|s| s.to_string()));
    (needed, paths)
}

#[test]
fn the_binary_needs_libtorch_cuda_whenever_its_libtorch_is_a_cuda_build() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_radit"));
    let (needed, paths) = dynamic_section(&bin);
    assert!(needed.iter().any(|n| n == "libtorch_cpu.so"), "{needed:?}");
    let torch_dirs: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| p.split(':'))
        .map(PathBuf::from)
        .filter(|d| d.join("libtorch_cpu.so").exists())
        .collect();
    assert!(
        !torch_dirs.is_empty(),
        "no rpath entry holds the libtorch the binary was built against: {paths:?}"
    );
    let cuda_build = torch_dirs
        .iter()
        .any(|d| d.join("libtorch_cuda.so").exists());
    if cuda_build {
        assert!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            "a CUDA libtorch is linked but libtorch_cuda.so is not NEEDED: {needed:?}"
        );
    }
    // The project's pinned wheel is a CUDA build: on the machines CI runs on, the check above is not vacuous.
    assert!(
        cuda_build,
        "expected the pip CUDA wheel of PyTorch in {torch_dirs:?}"
    );
}
