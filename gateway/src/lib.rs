//! The kefu gateway: thread-per-core io_uring server that carries conversations end to end.
pub mod auth;
pub mod config;
pub mod demo;
pub mod engine;
pub mod intent;
pub mod routing;
pub mod tenant;
