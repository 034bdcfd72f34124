//! Builds the kernel-side probes (`ebpf/kefu-trace-ebpf`) for `bpfel-unknown-none` with
//! aya-build and leaves the object in `OUT_DIR/kefu-trace-ebpf`, which the tracer embeds.
//!
//! The probes need `bpf-linker` (installed by `cargo xtask test` into `target/tools/bin`) and the
//! `rust-src` component. Without bpf-linker the build does not fail: it warns, embeds an empty
//! object, and the tracer says at runtime that the probes were not built. That keeps
//! `cargo clippy --workspace` and plain `cargo build` working on a machine without it.

use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf_dir = manifest_dir.join("../kefu-trace-ebpf");
    let common_dir = manifest_dir.join("../kefu-trace-common");
    let tools_bin = manifest_dir.join("../../target/tools/bin");
    let object = out_dir.join("kefu-trace-ebpf");

    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=KEFU_TRACE_SKIP_PROBES");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        tools_bin.join("bpf-linker").display()
    );

    let skip = std::env::var_os("KEFU_TRACE_SKIP_PROBES").is_some_and(|v| v == "1");
    let linker = find_bpf_linker(&tools_bin);
    let reason = if skip {
        Some("KEFU_TRACE_SKIP_PROBES=1".to_string())
    } else if linker.is_none() {
        Some(
            "bpf-linker is not on PATH nor in target/tools/bin (`cargo xtask test` installs it)"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(reason) = reason {
        println!(
            "cargo:warning=kefu-trace: eBPF probes not built: {reason}; the tracer will report this at runtime"
        );
        std::fs::write(&object, b"").expect("writing the empty probe object");
        // A path that never exists makes cargo rerun this script on every build while the
        // probes are missing, so they get built as soon as bpf-linker appears (even if its
        // file is older than this script's last run, e.g. restored from a cache).
        println!(
            "cargo:rerun-if-changed={}",
            out_dir.join("rerun-until-probes-are-built").display()
        );
        return;
    }
    let linker_dir = linker
        .as_deref()
        .and_then(Path::parent)
        .expect("bpf-linker has a directory");

    // The nested cargo runs for bpfel-unknown-none with `-Z build-std=core`: RUSTC_BOOTSTRAP lets
    // the stable toolchain accept it, and only this nested build sees it. The package is excluded
    // from the workspace, so the nested cargo must run from its own directory.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_dir.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe {
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
        std::env::set_var(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries are valid"),
        );
    }
    std::env::set_current_dir(&ebpf_dir).expect("entering ebpf/kefu-trace-ebpf");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_string());
    let package = aya_build::Package {
        name: "kefu-trace-ebpf",
        root_dir: ebpf_dir.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)) {
        panic!("building the eBPF probes failed: {e:#}");
    }
    assert!(
        object.exists(),
        "aya-build did not produce {}",
        object.display()
    );
}

fn find_bpf_linker(tools_bin: &Path) -> Option<PathBuf> {
    let local = tools_bin.join("bpf-linker");
    if local.is_file() {
        return Some(local);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}
