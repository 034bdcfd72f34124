//! Load generator for kefu: open loop (wrk2-style, coordinated-omission-correct) and closed loop
//! over keep-alive HTTP/1.1, plus WebSocket scenarios against kefu's real API.
//!
//! Architecture invariant: this crate knows kefu only through its public interface (HTTP,
//! WebSocket, the `kefu` command line); it links no gateway code, so it measures what a
//! client would see.

pub mod cli;
pub mod compare;
pub mod conn;
pub mod engine;
pub mod http1;
pub mod kefu;
pub mod scenario;
pub mod stats;
pub mod target;
pub mod ws;
