//! The generator allocates nothing per request: a run of 10x more requests over the same
//! connections must not allocate 10x more. Counted with a global allocator wrapper, so this
//! test binary holds only this test (other tests' threads would add noise).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kefu_loadtest::engine::{self, EngineConfig, Mode};
use kefu_loadtest::http1::build_request;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A keep-alive server that answers every request from fixed buffers (no allocation per
/// request on its side either).
fn server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn allocations_for(addr: SocketAddr, requests: u64) -> (u64, u64) {
    let req = build_request("GET", &addr.to_string(), "/", &[], b"");
    let mut cfg = EngineConfig::new(addr, vec![req]);
    cfg.connections = 4;
    cfg.threads = 1;
    cfg.mode = Mode::Closed;
    cfg.duration = Duration::from_secs(60);
    cfg.requests_max = requests;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let r = engine::run(&cfg).unwrap();
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(r.ok, requests, "{:?}", r.errors);
    (after - before, r.ok)
}

#[test]
fn no_allocation_per_request() {
    let addr = server();
    // Warm up once (first-use allocations of the runtime and the server's threads).
    allocations_for(addr, 100);
    let (small, _) = allocations_for(addr, 500);
    let (large, _) = allocations_for(addr, 5_000);
    // 4,500 more requests may cost a handful of allocations (buffer growth, timer slots), not
    // one each.
    let extra = large.saturating_sub(small);
    eprintln!("allocations: 500 requests {small}, 5000 requests {large}");
    assert!(
        extra < 45,
        "{extra} more allocations for 4500 more requests"
    );
}
