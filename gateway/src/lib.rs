//! The kefu gateway: thread-per-core io_uring server that carries conversations end to end (lands with the gateway-core issue).
pub mod auth;
pub mod intent;
pub mod routing;
pub mod tenant;
