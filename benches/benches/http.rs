//! Benchmarks for the http code (placeholder until its module lands).
fn main() {}
