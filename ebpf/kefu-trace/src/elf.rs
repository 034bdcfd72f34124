//! Finds the request marker, the semaphore and the sampling knob in a gateway binary: their
//! file offsets (what uprobes and `ref_ctr_offset` want) and what the bytes there look like.

use std::path::Path;

use anyhow::{Context, bail};
use kefu_trace_common::{MARKER_SYMBOL, SAMPLE_EVERY_SYMBOL, SEMAPHORE_SYMBOL};
use object::{Object, ObjectSection, ObjectSymbol};

/// Where the tracing hooks live in one binary, as file offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub marker_offset: u64,
    pub semaphore_offset: u64,
    pub sample_every_offset: Option<u64>,
    /// True if the marker starts with the 5-byte NOP the fast uprobe path needs.
    pub marker_nop_led: bool,
}

/// The 5-byte NOP (`nopl 0x0(%rax,%rax,1)`) the marker starts with.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Read the hooks' file offsets from the ELF file at `path`.
pub fn find_hooks(path: &Path) -> anyhow::Result<Hooks> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    hooks_in(&data).with_context(|| format!("looking for kefu's trace hooks in {}", path.display()))
}

pub fn hooks_in(data: &[u8]) -> anyhow::Result<Hooks> {
    let file = object::File::parse(data).context("not an ELF file")?;
    let marker = file_offset(&file, MARKER_SYMBOL)?.with_context(|| {
        format!("no `{MARKER_SYMBOL}` symbol: is this a kefu binary built with kefu-trace-common (and not stripped)?")
    })?;
    let semaphore = file_offset(&file, SEMAPHORE_SYMBOL)?
        .with_context(|| format!("no `{SEMAPHORE_SYMBOL}` symbol"))?;
    let sample_every = file_offset(&file, SAMPLE_EVERY_SYMBOL)?;
    let marker_nop_led = data
        .get(marker as usize..marker as usize + NOP5.len())
        .is_some_and(|b| b == NOP5);
    Ok(Hooks {
        marker_offset: marker,
        semaphore_offset: semaphore,
        sample_every_offset: sample_every,
        marker_nop_led,
    })
}

/// File offset of a defined symbol: `st_value - sh_addr + sh_offset` of its section.
fn file_offset(file: &object::File<'_>, name: &str) -> anyhow::Result<Option<u64>> {
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        if sym.name() != Ok(name) || sym.is_undefined() {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let section = file.section_by_index(index).context("symbol's section")?;
        let Some((section_offset, _)) = section.file_range() else {
            bail!(
                "`{name}` is in a section without file data ({:?}); the semaphore must be in `.probes`",
                section.name()
            );
        };
        let addr = sym.address();
        let Some(rel) = addr.checked_sub(section.address()) else {
            bail!("`{name}` lies before its section");
        };
        return Ok(Some(section_offset + rel));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_hooks_in_this_test_binary() {
        // This test binary links kefu-trace-common, so the marker and semaphore are in it.
        kefu_trace_common::emit(&kefu_trace_common::RequestRecord::default());
        let exe = std::env::current_exe().unwrap();
        let hooks = find_hooks(&exe).unwrap();
        assert!(hooks.marker_nop_led, "{hooks:?}");
        assert_ne!(hooks.semaphore_offset, hooks.marker_offset);
        assert!(hooks.sample_every_offset.is_some());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(hooks_in(b"not an elf").is_err());
    }
}
