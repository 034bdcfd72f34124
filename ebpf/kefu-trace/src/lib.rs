//! The userspace side of kefu request tracing: loads the eBPF probes and reads their events (lands with the eBPF issue).
