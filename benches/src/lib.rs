//! Shared inputs for kefu benchmarks; the benchmarks themselves live in `benches/benches/`.
