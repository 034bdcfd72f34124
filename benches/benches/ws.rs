//! Benchmarks for the ws code (placeholder until its module lands).
fn main() {}
