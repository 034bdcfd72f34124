//! Tools the test suite needs beyond cargo itself, installed on first use.
//!
//! The eBPF probes (`ebpf/kefu-trace-ebpf`) are built by kefu-trace's build script for
//! `bpfel-unknown-none`, which needs:
//! - the `rust-src` component (the nested build uses `-Z build-std=core`);
//! - `bpf-linker`, linked against the libLLVM that ships inside rustc's own sysroot (a plain
//!   `cargo install bpf-linker` would look for a system LLVM of the wrong version). It goes into
//!   `target/tools/bin`, where kefu-trace's build script also looks for it.
//!
//! Everything here is idempotent: a second run only checks a stamp file and runs
//! `bpf-linker --version`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, project_root, run};

/// The bpf-linker release known to build against rustc 1.95's LLVM 22 (see shared/EBPF.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where installed tools live: `<workspace>/target/tools` (bin/, llvm-prefix/, stamps).
pub fn tools_dir() -> PathBuf {
    project_root().join("target").join("tools")
}

/// Install whatever `cargo test --workspace` needs that a fresh machine lacks.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

/// Environment the test run needs: the tools dir on PATH, so kefu-trace's build script finds
/// bpf-linker (it sets RUSTC_BOOTSTRAP=1 for its own nested build only, not for the workspace).
pub fn apply_test_env(cmd: &mut Command) -> anyhow::Result<()> {
    let bin = tools_dir().join("bin");
    let mut paths = vec![bin];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    let joined = std::env::join_paths(paths).context("joining PATH")?;
    cmd.env("PATH", joined);
    Ok(())
}

fn rustc_output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .output()
        .with_context(|| format!("running rustc {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("rustc {} failed with {}", args.join(" "), out.status);
    }
    String::from_utf8(out.stdout).context("rustc printed non-UTF-8")
}

fn sysroot() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(rustc_output(&["--print", "sysroot"])?.trim()))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let core_src = sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core_src.exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the rust-src component (the eBPF probes build `core` from source)"
    );
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
        .context("`rustup component add rust-src` failed; install rust-src for this toolchain")
}

/// The LLVM major version rustc was built with and the path of its libLLVM shared object.
fn rustc_llvm() -> anyhow::Result<(u32, PathBuf)> {
    let verbose = rustc_output(&["-vV"])?;
    let version = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc -vV` does not name its LLVM version")?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unexpected LLVM version `{version}`"))?;
    let lib_dir = sysroot()?.join("lib");
    // The real library is `libLLVM.so.<major>.<minor>-rust-...`; `libLLVM-<major>-rust-...so` next to
    // it is a tiny linker script, so pick by name pattern and size.
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in
        std::fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("libLLVM") || !name.contains(".so") {
            continue;
        }
        let len = entry.metadata()?.len();
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, entry.path()));
        }
    }
    let (_, lib) =
        best.with_context(|| format!("no libLLVM shared object in {}", lib_dir.display()))?;
    Ok((major, lib))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let tools = tools_dir();
    let bin = tools.join("bin").join("bpf-linker");
    let (major, llvm_lib) = rustc_llvm()?;
    let llvm_name = llvm_lib
        .file_name()
        .context("libLLVM path has no file name")?
        .to_string_lossy()
        .into_owned();
    let stamp_path = tools.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} against {llvm_name}\n");
    if bin.exists()
        && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
        && runs(&bin)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} into {} against rustc's LLVM {major} \
         (a few minutes: it compiles about 150 crates)",
        tools.display()
    );
    let prefix = tools.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // llvm-sys links `-lLLVM` from $LLVM_PREFIX/lib; the loader then wants the soname file.
    for name in ["libLLVM.so", llvm_name.as_str()] {
        symlink_fresh(&llvm_lib, &prefix_lib.join(name))?;
    }
    let mut cmd = cargo();
    cmd.env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&tools);
    run(&mut cmd).context("installing bpf-linker (see shared/EBPF.md for the recipe)")?;
    if !runs(&bin) {
        bail!("{} was installed but does not run", bin.display());
    }
    std::fs::write(&stamp_path, stamp)
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

fn runs(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn symlink_fresh(target: &Path, link: &Path) -> anyhow::Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
