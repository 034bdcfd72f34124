//! The kefu gateway: thread-per-core io_uring server that carries conversations end to end.
pub mod access;
pub mod auth;
pub mod binary;
pub mod config;
pub mod conn;
pub mod demo;
pub mod engine;
pub mod http;
pub mod intent;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod shard;
pub mod stream;
pub mod tenant;
pub mod tls;
pub mod ws;
