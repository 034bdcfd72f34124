//! What the tracer learns about the traced process from `/proc`: its binary, its listening
//! ports (for the TCP probes' filter), processes running a given binary, and reads/writes of the
//! `.probes` variables in its memory.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// `/proc/PID/exe`: the kernel resolves it to the running binary even if the file on disk was
/// replaced since, so uprobes and ELF reads through it hit the right inode.
pub fn exe_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// True if a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Pids of processes whose binary is the same file (device and inode) as `binary`.
pub fn pids_running(binary: &Path) -> Vec<u32> {
    let Ok(want) = std::fs::metadata(binary) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(meta) = std::fs::metadata(exe_path(pid))
            && meta.dev() == want.dev()
            && meta.ino() == want.ino()
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// Local ports of the TCP sockets of `pid` that are listening (state `0A` in /proc/net/tcp*).
pub fn listen_ports(pid: u32) -> Vec<u16> {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path())
                && let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        ports.extend(parse_listeners(&text, &inodes));
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Parse a /proc/net/tcp table: listening sockets whose inode is in `inodes`.
fn parse_listeners(text: &str, inodes: &HashSet<u64>) -> Vec<u16> {
    let mut ports = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 || fields[3] != "0A" {
            continue;
        }
        let Ok(inode) = fields[9].parse::<u64>() else {
            continue;
        };
        if !inodes.contains(&inode) {
            continue;
        }
        if let Some(port) = fields[1]
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
        {
            ports.push(port);
        }
    }
    ports
}

/// The virtual address in `pid` of the byte at `file_offset` of its main binary.
fn address_of(pid: u32, file_offset: u64) -> anyhow::Result<u64> {
    let exe = std::fs::metadata(exe_path(pid)).with_context(|| format!("process {pid} is gone"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[4].parse::<u64>().ok() != Some(exe.ino()) {
            continue;
        }
        let Some((start, end)) = fields[0].split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(fields[2], 16),
        ) else {
            continue;
        };
        if file_offset >= offset && file_offset < offset + (end - start) {
            return Ok(start + (file_offset - offset));
        }
    }
    bail!("offset {file_offset:#x} of the binary is not mapped in process {pid}")
}

/// Read `N` bytes at a file offset of `pid`'s binary, from its memory.
pub fn read_mem<const N: usize>(pid: u32, file_offset: u64) -> anyhow::Result<[u8; N]> {
    let addr = address_of(pid, file_offset)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut buf = [0u8; N];
    mem.read_exact_at(&mut buf, addr)
        .with_context(|| format!("reading {N} bytes at {addr:#x} of process {pid}"))?;
    Ok(buf)
}

/// Write bytes at a file offset of `pid`'s binary, into its memory (a plain store; the gateway
/// only ever loads these variables).
pub fn write_mem(pid: u32, file_offset: u64, bytes: &[u8]) -> anyhow::Result<()> {
    let addr = address_of(pid, file_offset)?;
    let mem = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem for writing"))?;
    mem.write_all_at(bytes, addr).with_context(|| {
        format!(
            "writing {} bytes at {addr:#x} of process {pid}",
            bytes.len()
        )
    })
}

/// Mount tracefs at /sys/kernel/tracing if nothing is mounted there (fresh VMs often lack it,
/// and tracepoint attachment needs the event ids it publishes).
pub fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_of_our_inodes_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n\
   1: 0100007F:1BA6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n";
        let inodes: HashSet<u64> = [111].into_iter().collect();
        assert_eq!(parse_listeners(text, &inodes), vec![8080]);
    }

    #[test]
    fn reads_our_own_semaphore_through_proc_mem() {
        let exe = std::env::current_exe().unwrap();
        let hooks = crate::elf::find_hooks(&exe).unwrap();
        let me = std::process::id();
        let bytes: [u8; 2] = read_mem(me, hooks.semaphore_offset).unwrap();
        assert_eq!(u16::from_le_bytes(bytes), 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listen_ports(me).contains(&port));
    }
}
