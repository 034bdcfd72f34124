//! The kefu gateway: thread-per-core io_uring server that carries conversations end to end.
pub mod access;
pub mod attachments;
pub mod auth;
pub mod binary;
pub mod config;
pub mod conn;
pub mod demo;
pub mod engine;
pub mod http;
pub mod intent;
pub mod lifecycle;
pub mod metrics;
pub mod migrate;
pub mod ratelimit;
pub mod recycle;
pub mod replies;
pub mod routing;
pub mod server;
pub mod shard;
pub mod stream;
pub mod tenant;
pub mod tls;
pub mod wake;
pub mod ws;

/// Size of the future a five-argument `fn` returns (an `async fn` or one returning `impl
/// Future`): what a spawned task of it holds. For the size tests of idle connections.
#[cfg(test)]
pub(crate) fn future_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
    std::mem::size_of::<R>()
}
