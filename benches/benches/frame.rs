//! Benchmarks for the frame code (placeholder until its module lands).
fn main() {}
