//! The `#[repr(C)]` types that cross the kernel boundary between kefu's eBPF probes, the tracer and the gateway's request marker (lands with the eBPF issue).
#![no_std]
