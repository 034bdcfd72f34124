//! Benchmarks for the storage code (placeholder until its module lands).
fn main() {}
