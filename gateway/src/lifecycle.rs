//! Auto-close of idle resolved conversations: the timers alone, with no I/O and no clock (the
//! caller passes `now_ms`). The engine keeps the conversation states itself (checked by
//! `kefu_protocol::model::apply_event`) and asks this module only "which resolved conversations
//! have been idle long enough now".
//!
//! Bounds: one entry per resolved conversation, so the caller's conversation limit bounds it.

use std::collections::{BTreeSet, HashMap};

use crate::routing::ConvId;

/// The auto-close timers of resolved conversations: each closes `idle_ms` after it was resolved
/// unless it is reopened first. Usable alone by an engine that keeps its own states: call
/// [`AutoClose::resolved`] on resolve, [`AutoClose::cancel`] on reopen (or any other way out of
/// resolved), and [`AutoClose::pop_due`] from the shard's timer, which also schedules itself with
/// [`AutoClose::next_deadline_ms`]. Holds one entry per resolved conversation, so its size is
/// bounded by the caller's conversation limit.
#[derive(Debug, Default)]
pub struct AutoClose {
    idle_ms: u64,
    deadlines: BTreeSet<(u64, ConvId)>,
    by_conv: HashMap<ConvId, u64>,
}

impl AutoClose {
    /// `idle_ms` = 0: never close.
    pub fn new(idle_ms: u64) -> Self {
        Self {
            idle_ms,
            ..Self::default()
        }
    }

    /// `conv` was resolved at `now_ms`: (re)starts its timer. Returns when it will close.
    pub fn resolved(&mut self, conv: ConvId, now_ms: u64) -> Option<u64> {
        self.cancel(conv);
        if self.idle_ms == 0 {
            return None;
        }
        let deadline = now_ms.saturating_add(self.idle_ms);
        self.deadlines.insert((deadline, conv));
        self.by_conv.insert(conv, deadline);
        Some(deadline)
    }

    /// `conv` left the resolved state (reopened, closed by hand): no timer any more.
    pub fn cancel(&mut self, conv: ConvId) {
        if let Some(deadline) = self.by_conv.remove(&conv) {
            self.deadlines.remove(&(deadline, conv));
        }
    }

    /// The next conversation whose idle time is up at `now_ms` (earliest first); its timer is
    /// removed. Call until `None`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<ConvId> {
        let &(deadline, conv) = self.deadlines.first()?;
        if deadline > now_ms {
            return None;
        }
        self.deadlines.pop_first();
        self.by_conv.remove(&conv);
        Some(conv)
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    pub fn deadline_ms(&self, conv: ConvId) -> Option<u64> {
        self.by_conv.get(&conv).copied()
    }

    pub fn len(&self) -> usize {
        self.by_conv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_conv.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_close_timers() {
        let mut t = AutoClose::new(100);
        assert_eq!(t.resolved(1, 0), Some(100));
        assert_eq!(t.resolved(2, 50), Some(150));
        assert_eq!(t.resolved(3, 10), Some(110));
        assert_eq!(t.next_deadline_ms(), Some(100));
        t.cancel(3); // reopened
        assert_eq!(
            t.resolved(1, 60),
            Some(160),
            "resolved again: timer restarts"
        );
        assert_eq!(t.pop_due(149), None);
        assert_eq!(t.pop_due(160), Some(2));
        assert_eq!(t.pop_due(160), Some(1));
        assert_eq!(t.pop_due(1_000), None);
        assert!(t.is_empty());
        let mut never = AutoClose::new(0);
        assert_eq!(never.resolved(1, 0), None);
        assert_eq!(never.pop_due(u64::MAX), None);
    }
}
