//! The userspace side of kefu request tracing: loads the eBPF probes, attaches them to a running
//! gateway, and turns their events into per-request traces (stages joined with the kernel's
//! io_uring and TCP events of the same connection) for the terminal, JSON lines and trace viewers.
//!
//! Architecture invariant: this crate knows the gateway only through `kefu-trace-common` (the
//! marker symbol, the semaphore and the record layout); it never links the gateway.

pub mod btf;
pub mod elf;
pub mod join;
pub mod output;
pub mod perf;
pub mod probes;
pub mod procfs;
