//! Futures in reused memory.
//!
//! A connection runs the work of a burst of traffic (HTTP requests, a WebSocket step, a binary
//! frame) in a future of its own, so the future an idle connection parks in stays small. Boxed,
//! that was one allocation per burst: per request when requests come one at a time.
//! [`Recycled`] puts such a future in a block from a per-thread free list instead, and gives
//! the block back when the future is dropped: in steady state no allocation.
//!
//! Bounds: at most [`BLOCKS_PER_LAYOUT_MAX`] free blocks per layout and [`LAYOUTS_MAX`]
//! layouts per thread (a future of another layout is allocated and freed as a `Box` would
//! be), so a thread holds at most `LAYOUTS_MAX * BLOCKS_PER_LAYOUT_MAX` blocks.

use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Free blocks kept per layout: the bursts of that many connections at once run without
/// allocating. The futures using this are 1.4-2 KB, so at most ~0.5 MB per layout per shard.
pub const BLOCKS_PER_LAYOUT_MAX: usize = 256;
/// Distinct layouts kept per thread (a handful of future types use this).
pub const LAYOUTS_MAX: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<(Layout, Vec<NonNull<u8>>)>> = const { RefCell::new(Vec::new()) };
}

fn take_block(layout: Layout) -> Option<NonNull<u8>> {
    FREE.try_with(|free| {
        let mut free = free.borrow_mut();
        free.iter_mut()
            .find(|(l, _)| *l == layout)
            .and_then(|(_, blocks)| blocks.pop())
    })
    .ok()
    .flatten()
}

/// Keeps `block` for a later future of `layout`; frees it when the list is full.
fn give_block(layout: Layout, block: NonNull<u8>) {
    let kept = FREE
        .try_with(|free| {
            let mut free = free.borrow_mut();
            let i = match free.iter().position(|(l, _)| *l == layout) {
                Some(i) => i,
                None if free.len() < LAYOUTS_MAX => {
                    free.push((layout, Vec::with_capacity(16)));
                    free.len() - 1
                }
                None => return false,
            };
            let blocks = &mut free[i].1;
            if blocks.len() >= BLOCKS_PER_LAYOUT_MAX {
                return false;
            }
            blocks.push(block);
            true
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: `block` came from `std::alloc::alloc(layout)` (see `Recycled::new`) and no
        // future lives in it any more.
        unsafe { std::alloc::dealloc(block.as_ptr(), layout) };
    }
}

/// A pinned future in a recycled block; awaiting it polls the future in place.
pub struct Recycled<F: Future> {
    ptr: NonNull<F>,
    _owns: PhantomData<F>,
}

impl<F: Future> Recycled<F> {
    pub fn new(future: F) -> Self {
        let layout = Layout::new::<F>();
        let ptr = if layout.size() == 0 {
            NonNull::<F>::dangling()
        } else {
            let block = take_block(layout).unwrap_or_else(|| {
                // SAFETY: the layout has a non-zero size.
                let raw = unsafe { std::alloc::alloc(layout) };
                NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
            });
            block.cast::<F>()
        };
        // SAFETY: `ptr` is valid for writes of an `F` and aligned for it (a block of F's
        // layout, or dangling for a zero-sized F).
        unsafe { ptr.as_ptr().write(future) };
        Self {
            ptr,
            _owns: PhantomData,
        }
    }
}

// The future lives behind the pointer and never moves with the `Recycled`.
impl<F: Future> Unpin for Recycled<F> {}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives at `ptr` until `drop` and is never moved out of it, so
        // pinning it there is sound even though `Recycled` itself is `Unpin`.
        let future = unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) };
        future.poll(cx)
    }
}

impl<F: Future> Drop for Recycled<F> {
    fn drop(&mut self) {
        // SAFETY: the future was written in `new` and is dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        let layout = Layout::new::<F>();
        if layout.size() != 0 {
            give_block(layout, self.ptr.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn a_future_runs_in_place_drops_once_and_its_block_is_reused() {
        let drops = Rc::new(Cell::new(0));
        struct Guard(Rc<Cell<u32>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let make = |n: u64| {
            let guard = Guard(drops.clone());
            async move {
                let _guard = guard;
                let big = [n; 32];
                std::future::ready(()).await;
                big.iter().sum::<u64>()
            }
        };
        let mut first = Recycled::new(make(1));
        let first_at = first.ptr.as_ptr() as usize;
        assert_eq!(poll_once(&mut first), Poll::Ready(32));
        drop(first);
        assert_eq!(drops.get(), 1);
        // The next future of the same type takes the same block.
        let second = Recycled::new(make(2));
        assert_eq!(second.ptr.as_ptr() as usize, first_at);
        // Dropped before completion, it still drops its state once.
        drop(second);
        assert_eq!(drops.get(), 2);
        let mut third = Recycled::new(make(3));
        assert_eq!(poll_once(&mut third), Poll::Ready(96));
    }

    #[test]
    fn free_blocks_are_bounded_per_layout() {
        fn layout_of<F: Future>(_: &Recycled<F>) -> Layout {
            Layout::new::<F>()
        }
        let futures: Vec<_> = (0..BLOCKS_PER_LAYOUT_MAX + 10)
            .map(|i| Recycled::new(async move { [i as u8; 48] }))
            .collect();
        let layout = layout_of(&futures[0]);
        drop(futures);
        let kept = FREE.with(|f| {
            f.borrow()
                .iter()
                .find(|(l, _)| *l == layout)
                .map_or(0, |(_, blocks)| blocks.len())
        });
        assert_eq!(kept, BLOCKS_PER_LAYOUT_MAX);
    }
}
