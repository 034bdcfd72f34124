//! Durable mmap-backed append-only segment log per shard; records are `kefu_protocol::frame` frames. Knows nothing about the network.
