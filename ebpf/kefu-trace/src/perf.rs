//! A uprobe perf event with a USDT semaphore (`ref_ctr_offset`), which aya's `UProbe::attach`
//! cannot express: the kernel increments the semaphore in every process the probe is installed
//! in (including processes that start later) and decrements it when the event is closed, even
//! if the tracer is killed. The loaded BPF program is attached with `PERF_EVENT_IOC_SET_BPF`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, bail};

const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `PERF_ATTR_SIZE_VER5`: covers every field used here; newer kernels accept it.
const PERF_ATTR_SIZE: u32 = 112;

/// `struct perf_event_attr` up to VER5, laid out by hand (libc's copy varies between versions).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
}
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE as usize);

/// Which processes the probe fires for.
#[derive(Clone, Copy, Debug)]
pub enum Scope {
    /// Only this process (all of its threads: uprobe filters are per address space).
    Pid(u32),
    /// Every process that maps the binary, now or later.
    AllProcesses,
}

/// An attached uprobe; dropping it disables and closes the event, which detaches the program
/// and decrements the semaphore.
#[derive(Debug)]
pub struct UprobeEvent {
    fd: OwnedFd,
}

fn read_sysfs_u32(path: &str) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing {path}: `{}`", text.trim()))
}

/// The bit where `ref_ctr_offset` starts in `config` (`config:32-63` on every kernel so far).
fn ref_ctr_shift() -> anyhow::Result<u32> {
    let path = "/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset";
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}: this kernel has no uprobe semaphore support"))?;
    let bits = text
        .trim()
        .strip_prefix("config:")
        .with_context(|| format!("unexpected {path}: `{}`", text.trim()))?;
    let start = bits.split('-').next().unwrap_or(bits);
    start
        .parse()
        .with_context(|| format!("unexpected {path}: `{}`", text.trim()))
}

impl UprobeEvent {
    /// Create a uprobe at `offset` in `binary` with the semaphore at `ref_ctr_offset`, and attach
    /// the loaded BPF program `prog_fd` to it.
    pub fn attach(
        binary: &Path,
        offset: u64,
        ref_ctr_offset: u64,
        scope: Scope,
        prog_fd: BorrowedFd<'_>,
    ) -> anyhow::Result<Self> {
        let pmu_type = read_sysfs_u32("/sys/bus/event_source/devices/uprobe/type")?;
        let shift = ref_ctr_shift()?;
        if ref_ctr_offset >> (64 - shift) != 0 {
            bail!("semaphore offset {ref_ctr_offset:#x} does not fit the kernel's field");
        }
        let path = CString::new(binary.as_os_str().as_encoded_bytes())
            .context("binary path contains a NUL byte")?;
        let attr = PerfEventAttr {
            type_: pmu_type,
            size: PERF_ATTR_SIZE,
            config: ref_ctr_offset << shift,
            sample_period: 1,
            wakeup_events: 1,
            // bit 0: start disabled, enable once the program is attached.
            flags: 1,
            config1: path.as_ptr() as u64,
            config2: offset,
            ..Default::default()
        };
        let (pid, cpu) = match scope {
            Scope::Pid(pid) => (pid as libc::pid_t, -1),
            // A system-wide uprobe event is opened on one CPU but fires on all of them.
            Scope::AllProcesses => (-1, 0),
        };
        // SAFETY: `attr` is a valid, fully initialised perf_event_attr of the size it declares;
        // `path` outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                pid,
                cpu,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            bail!(
                "perf_event_open(uprobe {}:{offset:#x}, semaphore {ref_ctr_offset:#x}, {scope:?}): {err}",
                binary.display()
            );
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // SAFETY: ioctls on our own perf fd with the argument types the kernel documents.
        unsafe {
            if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog_fd.as_raw_fd()) != 0 {
                bail!(
                    "PERF_EVENT_IOC_SET_BPF: {}",
                    std::io::Error::last_os_error()
                );
            }
            if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0 {
                bail!("PERF_EVENT_IOC_ENABLE: {}", std::io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }
}

impl Drop for UprobeEvent {
    fn drop(&mut self) {
        // SAFETY: our own fd; closing it (after this) unregisters the uprobe and its semaphore.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), PERF_EVENT_IOC_DISABLE, 0) };
    }
}
