//! kefu's wire formats, without I/O and without a runtime, so every decoder can be fuzzed and benchmarked alone.
//!
//! Architecture invariant: this crate performs no I/O, knows no async runtime, and never
//! panics, loops forever or allocates without bound on any input. Every decoder answers
//! "need more bytes" or a specific invalid reason.

pub mod binproto;
pub mod frame;
pub mod http;
pub mod model;
pub mod ws;
