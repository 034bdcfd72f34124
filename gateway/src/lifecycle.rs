//! Conversation lifecycle: the state machine `queued → assigned → resolved → (reopened → queued) → closed` with the API's legal transitions (409 with the current state otherwise), driven together with the routing core, plus the auto-close timer for idle resolved conversations and audit descriptors for agent actions; no I/O, no clock.
//!
//! Two layers:
//! - [`check`]: the pure transition table. Given a state and a [`Command`], is it legal? The
//!   [`Conflict`] it returns carries the state for the 409 body `{"error", "state"}`.
//! - [`Desk`]: one tenant's conversations, its [`Router`] and its auto-close timers. Every
//!   operation checks first and mutates after (an `Err` changes nothing and emits nothing), then
//!   appends [`Event`]s in the order they happened: the caller gives each conversation event its
//!   seq and writes it to the log, and turns `QueuePosition` into a visitor notice.
//!
//! Rules beyond the table:
//! - Only the assigned agent may transfer (while assigned), resolve or write; the operator
//!   (`by = None`) may do anything an agent may. Otherwise [`DeskError::NotAssignedToYou`] (403).
//! - A visitor message to a resolved conversation reopens it (events `Reopened`, then `Queued`).
//!   A reopened conversation queues as a new arrival (a fresh order key): it is a new request
//!   and must not jump ahead of visitors who waited. A conversation re-queued because its agent
//!   went offline, or transferred to a group, keeps its key and so its place.
//! - A resolved conversation closes when `auto_close_idle_ms` pass with no reopen (0: never).
//!   Closed is final: the desk forgets the conversation (bounded memory), so later commands on
//!   it answer [`DeskError::UnknownConversation`]; a caller that keeps the state answers 409
//!   through [`check`] with `State::Closed`.
//!
//! - [`AutoClose`]: the auto-close timers alone, for an engine that keeps its own states and only
//!   needs "which resolved conversations are idle long enough now".
//!
//! Bounds: conversations tracked (queued, assigned and resolved) at most
//! `DeskLimits::conversations_max`; the auto-close set holds only resolved ones.

use std::collections::{BTreeSet, HashMap};

use crate::routing::{AgentId, ConvId, Effect, GroupId, RouteError, Router};

/// Where a conversation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Assigned,
    Resolved,
    Closed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Assigned => "assigned",
            State::Resolved => "resolved",
            State::Closed => "closed",
        }
    }
}

/// What someone asks of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Accept,
    TransferToAgent,
    TransferToGroup,
    Resolve,
    Reopen,
    VisitorMessage,
    AgentMessage,
    AutoClose,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Accept => "accept",
            Command::TransferToAgent => "transfer to an agent",
            Command::TransferToGroup => "transfer to a group",
            Command::Resolve => "resolve",
            Command::Reopen => "reopen",
            Command::VisitorMessage => "send a visitor message to",
            Command::AgentMessage => "send an agent message to",
            Command::AutoClose => "auto-close",
        }
    }
}

/// An illegal transition: HTTP 409 with `{"error": <Display>, "state": state.as_str()}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a {} conversation", command.as_str(), state.as_str())]
pub struct Conflict {
    pub state: State,
    pub command: Command,
}

impl Conflict {
    pub const HTTP_STATUS: u16 = 409;

    /// The 409 response body.
    pub fn json_body(&self) -> String {
        serde_json::json!({ "error": self.to_string(), "state": self.state.as_str() }).to_string()
    }
}

/// The transition table of the API. Returns the state after the command.
pub fn check(state: State, command: Command) -> Result<State, Conflict> {
    use Command as C;
    use State as S;
    let next = match (state, command) {
        (S::Queued, C::Accept) => S::Assigned,
        (S::Queued | S::Assigned, C::TransferToAgent) => S::Assigned,
        (S::Queued | S::Assigned, C::TransferToGroup) => S::Queued,
        (S::Assigned, C::Resolve) => S::Resolved,
        (S::Resolved, C::Reopen | C::VisitorMessage) => S::Queued,
        (s @ (S::Queued | S::Assigned), C::VisitorMessage) => s,
        (S::Assigned, C::AgentMessage) => S::Assigned,
        (S::Resolved, C::AutoClose) => S::Closed,
        _ => return Err(Conflict { state, command }),
    };
    Ok(next)
}

/// Who did something, for audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Agent(AgentId),
    /// The operator's token (no agent).
    Admin,
    Visitor,
    /// The gateway itself (auto-close, routing).
    System,
}

/// Agent actions recorded in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    Accept,
    TransferToAgent(AgentId),
    TransferToGroup(GroupId),
    Resolve,
    Reopen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferTarget {
    Agent(AgentId),
    Group(GroupId),
}

/// What happened, in order. Conversation events become log records with a seq; `QueuePosition`
/// is a notice to the waiting visitor; `AgentOffline` and `Audit` go to the log as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// (Re)entered its group's queue.
    Queued {
        conv: ConvId,
        group: GroupId,
    },
    QueuePosition {
        conv: ConvId,
        position: u32,
    },
    Assigned {
        conv: ConvId,
        agent: AgentId,
        group: GroupId,
    },
    /// Left its agent (the next event says where it went).
    Unassigned {
        conv: ConvId,
        agent: AgentId,
    },
    Transferred {
        conv: ConvId,
        from: Option<AgentId>,
        to: TransferTarget,
    },
    Resolved {
        conv: ConvId,
        by: Actor,
    },
    Reopened {
        conv: ConvId,
        by: Actor,
    },
    Closed {
        conv: ConvId,
    },
    AgentOffline {
        agent: AgentId,
    },
    /// An agent (or the operator) acted on a conversation at `at_ms`.
    Audit {
        by: Actor,
        action: AuditAction,
        conv: ConvId,
        at_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeskError {
    /// 409.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// 403: the conversation is assigned to another agent.
    #[error("conversation {conv:#x} is assigned to another agent")]
    NotAssignedToYou { conv: ConvId },
    /// 404.
    #[error("unknown conversation {conv:#x}")]
    UnknownConversation { conv: ConvId },
    /// 503: the desk tracks `conversations_max` conversations.
    #[error("{conversations_max} conversations are open, the conversations_max")]
    TooManyConversations { conversations_max: usize },
    /// From routing (capacity full, agent offline, queue full, ...): 409 or 503 by kind.
    #[error(transparent)]
    Route(#[from] RouteError),
}

impl DeskError {
    pub fn http_status(&self) -> u16 {
        match self {
            DeskError::Conflict(_) => 409,
            DeskError::NotAssignedToYou { .. } => 403,
            DeskError::UnknownConversation { .. } => 404,
            DeskError::TooManyConversations { .. } => 503,
            DeskError::Route(RouteError::QueueFull { .. })
            | DeskError::Route(RouteError::TooManyConversations { .. }) => 503,
            DeskError::Route(
                RouteError::UnknownAgent { .. }
                | RouteError::UnknownGroup { .. }
                | RouteError::UnknownConversation { .. },
            ) => 404,
            DeskError::Route(_) => 409,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeskLimits {
    /// Conversations tracked (not closed) at once.
    pub conversations_max: usize,
    /// A resolved conversation closes after this long without a reopen; 0: never.
    pub auto_close_idle_ms: u64,
}

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

#[derive(Debug, Clone, Copy)]
struct Conv {
    state: State,
    group: GroupId,
    agent: Option<AgentId>,
}

/// One tenant's conversations, routing and timers. See the module docs.
#[derive(Debug)]
pub struct Desk {
    limits: DeskLimits,
    router: Router,
    convs: HashMap<ConvId, Conv>,
    auto_close: AutoClose,
    next_order_key: u64,
    /// Scratch for router effects, reused.
    effects: Vec<Effect>,
}

impl Desk {
    /// `router` comes with its groups and agents added.
    pub fn new(router: Router, limits: DeskLimits) -> Self {
        assert!(limits.conversations_max >= 1);
        Self {
            limits,
            router,
            convs: HashMap::with_capacity(limits.conversations_max),
            auto_close: AutoClose::new(limits.auto_close_idle_ms),
            next_order_key: 1,
            effects: Vec::new(),
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn state(&self, conv: ConvId) -> Option<State> {
        self.convs.get(&conv).map(|c| c.state)
    }

    pub fn group(&self, conv: ConvId) -> Option<GroupId> {
        self.convs.get(&conv).map(|c| c.group)
    }

    pub fn agent(&self, conv: ConvId) -> Option<AgentId> {
        self.convs.get(&conv).and_then(|c| c.agent)
    }

    /// Conversations tracked (not closed).
    pub fn len(&self) -> usize {
        self.convs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.convs.is_empty()
    }

    fn conv(&self, conv: ConvId) -> Result<Conv, DeskError> {
        self.convs
            .get(&conv)
            .copied()
            .ok_or(DeskError::UnknownConversation { conv })
    }

    /// `by` may act on `c` as its assigned agent (the operator always may).
    fn check_assignee(conv: ConvId, c: &Conv, by: Option<AgentId>) -> Result<(), DeskError> {
        match by {
            Some(agent) if c.agent != Some(agent) => Err(DeskError::NotAssignedToYou { conv }),
            _ => Ok(()),
        }
    }

    fn actor(by: Option<AgentId>) -> Actor {
        by.map_or(Actor::Admin, Actor::Agent)
    }

    /// A new conversation waits in `group` (its first message classified it) and is offered to
    /// an agent at once if one is free.
    pub fn create(
        &mut self,
        conv: ConvId,
        group: GroupId,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        if self.convs.contains_key(&conv) {
            return Err(RouteError::ConversationExists { conv }.into());
        }
        if self.convs.len() >= self.limits.conversations_max {
            return Err(DeskError::TooManyConversations {
                conversations_max: self.limits.conversations_max,
            });
        }
        self.enqueue(conv, group, out)?;
        Ok(())
    }

    fn enqueue(
        &mut self,
        conv: ConvId,
        group: GroupId,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let result = self
            .router
            .enqueue(conv, group, self.next_order_key, &mut effects);
        if result.is_ok() {
            self.next_order_key += 1;
            self.convs.insert(
                conv,
                Conv {
                    state: State::Queued,
                    group,
                    agent: None,
                },
            );
            self.router.dispatch(&mut effects);
            self.apply(&effects, out);
        }
        self.effects = effects;
        Ok(result?)
    }

    /// Folds router effects into conversation states and appends them as events.
    fn apply(&mut self, effects: &[Effect], out: &mut Vec<Event>) {
        for &effect in effects {
            match effect {
                Effect::Queued { conv, group } => {
                    let c = self
                        .convs
                        .get_mut(&conv)
                        .expect("routed conversations are tracked");
                    c.state = State::Queued;
                    c.group = group;
                    c.agent = None;
                    out.push(Event::Queued { conv, group });
                }
                Effect::QueuePositionChanged { conv, position } => {
                    out.push(Event::QueuePosition { conv, position });
                }
                Effect::Assigned { conv, agent, group } => {
                    let c = self
                        .convs
                        .get_mut(&conv)
                        .expect("routed conversations are tracked");
                    c.state = State::Assigned;
                    c.agent = Some(agent);
                    c.group = group;
                    out.push(Event::Assigned { conv, agent, group });
                }
                Effect::Unassigned { conv, agent } => {
                    let c = self
                        .convs
                        .get_mut(&conv)
                        .expect("routed conversations are tracked");
                    assert_eq!(
                        c.agent,
                        Some(agent),
                        "router and desk agree on the assignee"
                    );
                    c.agent = None;
                    out.push(Event::Unassigned { conv, agent });
                }
                Effect::AgentOffline { agent } => out.push(Event::AgentOffline { agent }),
            }
        }
    }

    /// Runs a router operation with the scratch effect buffer, then dispatches freed capacity and
    /// applies the effects. On `Err` nothing changed (the router's own guarantee).
    fn route(
        &mut self,
        out: &mut Vec<Event>,
        op: impl FnOnce(&mut Router, &mut Vec<Effect>) -> Result<(), RouteError>,
    ) -> Result<(), DeskError> {
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let result = op(&mut self.router, &mut effects);
        if result.is_ok() {
            self.router.dispatch(&mut effects);
            self.apply(&effects, out);
        }
        self.effects = effects;
        Ok(result?)
    }

    /// An agent takes a waiting conversation of one of its groups.
    pub fn accept(
        &mut self,
        agent: AgentId,
        conv: ConvId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::Accept)?;
        let at = out.len();
        self.route(out, |r, e| r.accept(agent, conv, e))?;
        out.insert(
            at,
            Event::Audit {
                by: Actor::Agent(agent),
                action: AuditAction::Accept,
                conv,
                at_ms: now_ms,
            },
        );
        Ok(())
    }

    /// Hands the conversation to agent `to` (online, with room). `by`: the acting agent (must be
    /// the assignee while assigned) or `None` for the operator.
    pub fn transfer_to_agent(
        &mut self,
        by: Option<AgentId>,
        conv: ConvId,
        to: AgentId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::TransferToAgent)?;
        if c.state == State::Assigned {
            Self::check_assignee(conv, &c, by)?;
        }
        let at = out.len();
        self.route(out, |r, e| r.transfer_to_agent(conv, to, e))?;
        out.splice(
            at..at,
            [
                Event::Audit {
                    by: Self::actor(by),
                    action: AuditAction::TransferToAgent(to),
                    conv,
                    at_ms: now_ms,
                },
                Event::Transferred {
                    conv,
                    from: c.agent,
                    to: TransferTarget::Agent(to),
                },
            ],
        );
        Ok(())
    }

    /// Moves the conversation to `group`'s queue, keeping its place in line (works while the
    /// visitor is offline: nothing here needs the visitor).
    pub fn transfer_to_group(
        &mut self,
        by: Option<AgentId>,
        conv: ConvId,
        group: GroupId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::TransferToGroup)?;
        if c.state == State::Assigned {
            Self::check_assignee(conv, &c, by)?;
        }
        let at = out.len();
        self.route(out, |r, e| r.transfer_to_group(conv, group, e))?;
        out.splice(
            at..at,
            [
                Event::Audit {
                    by: Self::actor(by),
                    action: AuditAction::TransferToGroup(group),
                    conv,
                    at_ms: now_ms,
                },
                Event::Transferred {
                    conv,
                    from: c.agent,
                    to: TransferTarget::Group(group),
                },
            ],
        );
        Ok(())
    }

    /// The assigned agent (or the operator) resolves; the agent's capacity goes to the next
    /// waiting conversation, and the auto-close timer starts.
    pub fn resolve(
        &mut self,
        by: Option<AgentId>,
        conv: ConvId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::Resolve)?;
        Self::check_assignee(conv, &c, by)?;
        let actor = Self::actor(by);
        out.push(Event::Audit {
            by: actor,
            action: AuditAction::Resolve,
            conv,
            at_ms: now_ms,
        });
        let at = out.len();
        self.route(out, |r, e| r.resolve(conv, e))
            .expect("an assigned conversation is routed");
        // Unassigned comes from the router; Resolved follows it, then whatever dispatch did.
        let unassigned_end =
            at + usize::from(matches!(out.get(at), Some(Event::Unassigned { .. })));
        out.insert(unassigned_end, Event::Resolved { conv, by: actor });
        let c = self.convs.get_mut(&conv).expect("checked");
        c.state = State::Resolved;
        c.agent = None;
        self.auto_close.resolved(conv, now_ms);
        Ok(())
    }

    /// Back to the queue from resolved, as a new arrival. `by`: `Actor::Visitor` for a visitor
    /// message (see [`Desk::visitor_message`]), the agent or the operator for `/reopen`.
    pub fn reopen(
        &mut self,
        by: Actor,
        conv: ConvId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::Reopen)?;
        // Room was reserved when it was created; enqueue can only fail on a full group queue.
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let result = self
            .router
            .enqueue(conv, c.group, self.next_order_key, &mut effects);
        if result.is_ok() {
            self.next_order_key += 1;
            self.auto_close.cancel(conv);
            if matches!(by, Actor::Agent(_) | Actor::Admin) {
                out.push(Event::Audit {
                    by,
                    action: AuditAction::Reopen,
                    conv,
                    at_ms: now_ms,
                });
            }
            out.push(Event::Reopened { conv, by });
            self.router.dispatch(&mut effects);
            self.apply(&effects, out);
        }
        self.effects = effects;
        Ok(result?)
    }

    /// A visitor wrote: legal unless closed; reopens a resolved conversation.
    pub fn visitor_message(
        &mut self,
        conv: ConvId,
        now_ms: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::VisitorMessage)?;
        if c.state == State::Resolved {
            self.reopen(Actor::Visitor, conv, now_ms, out)?;
        }
        Ok(())
    }

    /// May agent `by` (or the operator) write to the conversation now?
    pub fn check_agent_message(&self, by: Option<AgentId>, conv: ConvId) -> Result<(), DeskError> {
        let c = self.conv(conv)?;
        check(c.state, Command::AgentMessage)?;
        Self::check_assignee(conv, &c, by)
    }

    pub fn agent_online(&mut self, agent: AgentId, out: &mut Vec<Event>) -> Result<(), DeskError> {
        self.route(out, |r, _| r.agent_online(agent))
    }

    /// The agent's conversations go back to their queues at their places, and to other agents.
    pub fn agent_offline(&mut self, agent: AgentId, out: &mut Vec<Event>) -> Result<(), DeskError> {
        self.route(out, |r, e| r.agent_offline(agent, e))
    }

    pub fn agent_socket_lost(&mut self, agent: AgentId, now_ms: u64) -> Result<(), DeskError> {
        Ok(self.router.agent_socket_lost(agent, now_ms)?)
    }

    pub fn agent_socket_restored(
        &mut self,
        agent: AgentId,
        out: &mut Vec<Event>,
    ) -> Result<(), DeskError> {
        self.route(out, |r, _| r.agent_socket_restored(agent))
    }

    /// Time-driven work at `now_ms`: agents whose socket grace ran out go offline, and resolved
    /// conversations idle for `auto_close_idle_ms` close.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Event>) {
        self.route(out, |r, e| {
            r.tick(now_ms, e);
            Ok(())
        })
        .expect("tick cannot fail");
        while let Some(conv) = self.auto_close.pop_due(now_ms) {
            let c = self
                .convs
                .remove(&conv)
                .expect("closing conversations are tracked");
            assert_eq!(check(c.state, Command::AutoClose), Ok(State::Closed));
            out.push(Event::Closed { conv });
        }
    }

    /// When `tick` next has work, if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let close = self.auto_close.next_deadline_ms();
        match (self.router.next_deadline_ms(), close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checks that the desk and its router agree; O(everything), for tests.
    pub fn assert_invariants(&self) {
        self.router.assert_invariants();
        let mut resolved = 0usize;
        for (&conv, c) in &self.convs {
            let placement = self.router.placement(conv);
            match c.state {
                State::Queued => {
                    assert!(
                        matches!(placement, Some(crate::routing::Placement::Queued { group, .. }) if group == c.group),
                        "{conv:#x} queued: {placement:?}"
                    );
                    assert_eq!(c.agent, None);
                }
                State::Assigned => {
                    let agent = c.agent.expect("assigned conversations have an agent");
                    assert_eq!(
                        placement,
                        Some(crate::routing::Placement::Assigned {
                            group: c.group,
                            agent
                        }),
                        "{conv:#x}"
                    );
                }
                State::Resolved => {
                    assert_eq!(placement, None, "{conv:#x} resolved but routed");
                    if self.limits.auto_close_idle_ms > 0 {
                        assert!(
                            self.auto_close.deadline_ms(conv).is_some(),
                            "{conv:#x} timer"
                        );
                        resolved += 1;
                    }
                }
                State::Closed => panic!("closed conversations are forgotten"),
            }
        }
        assert_eq!(resolved, self.auto_close.len());
        assert_eq!(
            self.router.conversations_len()
                + self
                    .convs
                    .values()
                    .filter(|c| c.state == State::Resolved)
                    .count(),
            self.convs.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::routing::{Placement, RouterLimits};

    #[test]
    fn transition_table_matches_the_api() {
        use Command as C;
        use State as S;
        let legal = [
            (S::Queued, C::Accept, S::Assigned),
            (S::Queued, C::TransferToAgent, S::Assigned),
            (S::Assigned, C::TransferToAgent, S::Assigned),
            (S::Queued, C::TransferToGroup, S::Queued),
            (S::Assigned, C::TransferToGroup, S::Queued),
            (S::Assigned, C::Resolve, S::Resolved),
            (S::Resolved, C::Reopen, S::Queued),
            (S::Resolved, C::VisitorMessage, S::Queued),
            (S::Queued, C::VisitorMessage, S::Queued),
            (S::Assigned, C::VisitorMessage, S::Assigned),
            (S::Assigned, C::AgentMessage, S::Assigned),
            (S::Resolved, C::AutoClose, S::Closed),
        ];
        let states = [S::Queued, S::Assigned, S::Resolved, S::Closed];
        let commands = [
            C::Accept,
            C::TransferToAgent,
            C::TransferToGroup,
            C::Resolve,
            C::Reopen,
            C::VisitorMessage,
            C::AgentMessage,
            C::AutoClose,
        ];
        for state in states {
            for command in commands {
                let expected = legal
                    .iter()
                    .find(|(s, c, _)| *s == state && *c == command)
                    .map(|&(_, _, next)| next);
                match (check(state, command), expected) {
                    (Ok(next), Some(want)) => assert_eq!(next, want),
                    (Err(conflict), None) => {
                        assert_eq!(conflict.state, state);
                        let body: serde_json::Value =
                            serde_json::from_str(&conflict.json_body()).unwrap();
                        assert_eq!(body["state"], state.as_str());
                        assert!(body["error"].as_str().unwrap().contains(state.as_str()));
                    }
                    (got, want) => panic!("{state:?} {command:?}: {got:?}, expected {want:?}"),
                }
            }
        }
        assert_eq!(
            check(S::Closed, C::VisitorMessage).unwrap_err().to_string(),
            "cannot send a visitor message to a closed conversation"
        );
    }

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

    /// Groups sales, support; alice (both, capacity 2), bob (support, 1), carol (sales, 1).
    fn demo_desk(auto_close_idle_ms: u64) -> (Desk, [GroupId; 2], [AgentId; 3]) {
        let mut router = Router::new(RouterLimits {
            socket_grace_ms: 1_000,
            ..RouterLimits::DEMO
        })
        .unwrap();
        let sales = router.add_group("sales").unwrap();
        let support = router.add_group("support").unwrap();
        let alice = router.add_agent("alice", &[sales, support], 2).unwrap();
        let bob = router.add_agent("bob", &[support], 1).unwrap();
        let carol = router.add_agent("carol", &[sales], 1).unwrap();
        let desk = Desk::new(
            router,
            DeskLimits {
                conversations_max: 64,
                auto_close_idle_ms,
            },
        );
        (desk, [sales, support], [alice, bob, carol])
    }

    #[test]
    fn a_conversation_lives_its_whole_life() {
        let (mut desk, [_, support], [alice, bob, _]) = demo_desk(5_000);
        let mut out = Vec::new();
        desk.create(1, support, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Event::Queued {
                    conv: 1,
                    group: support
                },
                Event::QueuePosition {
                    conv: 1,
                    position: 1
                }
            ]
        );
        out.clear();
        desk.agent_online(bob, &mut out).unwrap();
        assert_eq!(
            out,
            [Event::Assigned {
                conv: 1,
                agent: bob,
                group: support
            }]
        );
        // Only the assignee resolves; others get 403, illegal commands 409.
        out.clear();
        assert_eq!(
            desk.resolve(Some(alice), 1, 10, &mut out),
            Err(DeskError::NotAssignedToYou { conv: 1 })
        );
        assert_eq!(
            desk.accept(alice, 1, 10, &mut out),
            Err(DeskError::Conflict(Conflict {
                state: State::Assigned,
                command: Command::Accept
            }))
        );
        assert!(out.is_empty());
        assert!(desk.check_agent_message(Some(bob), 1).is_ok());
        assert!(desk.check_agent_message(Some(alice), 1).is_err());
        desk.resolve(Some(bob), 1, 1_000, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Event::Audit {
                    by: Actor::Agent(bob),
                    action: AuditAction::Resolve,
                    conv: 1,
                    at_ms: 1_000
                },
                Event::Unassigned {
                    conv: 1,
                    agent: bob
                },
                Event::Resolved {
                    conv: 1,
                    by: Actor::Agent(bob)
                },
            ]
        );
        assert_eq!(desk.next_deadline_ms(), Some(6_000));
        assert_eq!(
            desk.check_agent_message(Some(bob), 1)
                .unwrap_err()
                .http_status(),
            409
        );
        // The visitor writes: reopened, queued as new, assigned again.
        out.clear();
        desk.visitor_message(1, 2_000, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Event::Reopened {
                    conv: 1,
                    by: Actor::Visitor
                },
                Event::Queued {
                    conv: 1,
                    group: support
                },
                Event::QueuePosition {
                    conv: 1,
                    position: 1
                },
                Event::Assigned {
                    conv: 1,
                    agent: bob,
                    group: support
                },
            ]
        );
        assert_eq!(
            desk.next_deadline_ms(),
            None,
            "reopen stops the auto-close timer"
        );
        // Resolve again; idle past the limit: closed and forgotten.
        desk.resolve(None, 1, 3_000, &mut out).unwrap();
        out.clear();
        desk.tick(7_999, &mut out);
        assert!(out.is_empty());
        desk.tick(8_000, &mut out);
        assert_eq!(out, [Event::Closed { conv: 1 }]);
        assert_eq!(desk.state(1), None);
        assert_eq!(
            desk.visitor_message(1, 9_000, &mut out),
            Err(DeskError::UnknownConversation { conv: 1 })
        );
        desk.assert_invariants();
    }

    #[test]
    fn transfers_work_while_the_visitor_is_away_and_are_audited() {
        let (mut desk, [sales, support], [alice, bob, carol]) = demo_desk(0);
        let mut out = Vec::new();
        for agent in [alice, bob, carol] {
            desk.agent_online(agent, &mut out).unwrap();
        }
        desk.create(1, support, &mut out).unwrap();
        // Least loaded, round robin: alice (first member) takes it.
        assert_eq!(desk.agent(1), Some(alice));
        out.clear();
        assert_eq!(
            desk.transfer_to_group(Some(bob), 1, sales, 5, &mut out),
            Err(DeskError::NotAssignedToYou { conv: 1 })
        );
        desk.transfer_to_group(Some(alice), 1, sales, 5, &mut out)
            .unwrap();
        assert_eq!(
            out[..2],
            [
                Event::Audit {
                    by: Actor::Agent(alice),
                    action: AuditAction::TransferToGroup(sales),
                    conv: 1,
                    at_ms: 5
                },
                Event::Transferred {
                    conv: 1,
                    from: Some(alice),
                    to: TransferTarget::Group(sales)
                },
            ]
        );
        // Dispatch: alice has load 0 after the transfer, carol 0: ties go round robin.
        assert_eq!(desk.state(1), Some(State::Assigned));
        let holder = desk.agent(1).unwrap();
        out.clear();
        desk.transfer_to_agent(Some(holder), 1, bob, 6, &mut out)
            .unwrap();
        assert_eq!(desk.agent(1), Some(bob));
        assert!(out.contains(&Event::Transferred {
            conv: 1,
            from: Some(holder),
            to: TransferTarget::Agent(bob)
        }));
        // Nothing free for bob now (capacity 1).
        desk.create(2, support, &mut out).unwrap();
        assert_eq!(desk.agent(2), Some(alice));
        desk.create(3, support, &mut out).unwrap();
        desk.create(4, support, &mut out).unwrap();
        assert_eq!(desk.state(4), Some(State::Queued));
        out.clear();
        assert!(matches!(
            desk.transfer_to_agent(Some(bob), 4, bob, 7, &mut out),
            Err(DeskError::Route(RouteError::CapacityFull { .. }))
        ));
        assert!(out.is_empty());
        desk.assert_invariants();
    }

    #[test]
    fn offline_agent_requeues_in_original_order() {
        let (mut desk, [_, support], [alice, bob, _]) = demo_desk(0);
        let mut out = Vec::new();
        desk.agent_online(alice, &mut out).unwrap();
        desk.create(10, support, &mut out).unwrap();
        desk.create(11, support, &mut out).unwrap();
        desk.create(12, support, &mut out).unwrap();
        desk.create(13, support, &mut out).unwrap();
        assert_eq!(desk.router().queued(support).collect::<Vec<_>>(), [12, 13]);
        // alice's socket drops; past the grace period she goes offline and 10, 11 go back ahead
        // of 12, 13.
        desk.agent_socket_lost(alice, 100).unwrap();
        assert_eq!(desk.next_deadline_ms(), Some(1_100));
        out.clear();
        desk.tick(1_100, &mut out);
        assert!(out.contains(&Event::AgentOffline { agent: alice }));
        assert_eq!(
            desk.router().queued(support).collect::<Vec<_>>(),
            [10, 11, 12, 13]
        );
        desk.agent_online(bob, &mut out).unwrap();
        assert_eq!(desk.agent(10), Some(bob));
        assert_eq!(
            desk.router().placement(11),
            Some(Placement::Queued {
                group: support,
                position: 1
            })
        );
        desk.assert_invariants();
    }

    /// xorshift64*.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    struct SeedGuard(u64);

    impl Drop for SeedGuard {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "lifecycle simulation failed with seed {} (rerun: KEFU_LIFECYCLE_SEED={})",
                    self.0, self.0
                );
            }
        }
    }

    /// What a log reader rebuilds from the events alone.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Seen {
        state: State,
        agent: Option<AgentId>,
    }

    fn fold(seen: &mut BTreeMap<ConvId, Seen>, events: &[Event]) {
        for &event in events {
            match event {
                Event::Queued { conv, .. } => {
                    seen.insert(
                        conv,
                        Seen {
                            state: State::Queued,
                            agent: None,
                        },
                    );
                }
                Event::Assigned { conv, agent, .. } => {
                    seen.insert(
                        conv,
                        Seen {
                            state: State::Assigned,
                            agent: Some(agent),
                        },
                    );
                }
                Event::Unassigned { conv, agent } => {
                    let s = seen
                        .get_mut(&conv)
                        .expect("unassigned a known conversation");
                    assert_eq!(s.agent, Some(agent), "{event:?}");
                    s.agent = None;
                }
                Event::Resolved { conv, .. } => {
                    let s = seen.get_mut(&conv).expect("resolved a known conversation");
                    assert_eq!(s.state, State::Assigned, "{event:?}");
                    *s = Seen {
                        state: State::Resolved,
                        agent: None,
                    };
                }
                Event::Reopened { conv, .. } => {
                    assert_eq!(seen[&conv].state, State::Resolved, "{event:?}");
                }
                Event::Closed { conv } => {
                    assert_eq!(seen.remove(&conv).map(|s| s.state), Some(State::Resolved));
                }
                Event::QueuePosition { conv, .. } => {
                    assert_eq!(seen[&conv].state, State::Queued, "{event:?}");
                }
                Event::Transferred { .. } | Event::AgentOffline { .. } | Event::Audit { .. } => {}
            }
        }
    }

    fn simulate(seed: u64, steps: usize) -> [usize; 4] {
        let _guard = SeedGuard(seed);
        let mut rng = Rng(seed | 1);
        let (mut desk, groups, agents) = demo_desk(200);
        let capacity = |a: AgentId| if a == agents[0] { 2 } else { 1 };
        // Ordered maps: iteration order must depend on the seed alone.
        let mut seen: BTreeMap<ConvId, Seen> = BTreeMap::new();
        // Creation order of each conversation's current queue entry (reopen makes a new one).
        let mut order: HashMap<ConvId, u64> = HashMap::new();
        let mut counts = [0usize; 4]; // [assigned, resolved, closed, requeued by offline]
        let (mut next_conv, mut now_ms, mut creations) = (1u64, 0u64, 0u64);
        let mut out = Vec::new();
        for _ in 0..steps {
            out.clear();
            now_ms += rng.below(50) as u64;
            // Half the time target a conversation that is assigned, so resolve, transfer and
            // reopen succeed often enough to matter.
            let assigned: Vec<ConvId> = seen
                .iter()
                .filter(|(_, s)| s.state == State::Assigned)
                .map(|(&c, _)| c)
                .collect();
            let conv = if !assigned.is_empty() && rng.below(2) == 0 {
                assigned[rng.below(assigned.len())]
            } else {
                1 + rng.below(next_conv as usize) as u64
            };
            let agent = agents[rng.below(agents.len())];
            let by = if rng.below(8) == 0 {
                None
            } else {
                Some(desk.agent(conv).unwrap_or(agent))
            };
            let group = groups[rng.below(groups.len())];
            let before = desk.state(conv);
            let result = match rng.below(13) {
                0 | 1 => {
                    let id = next_conv;
                    next_conv += 1;
                    creations += 1;
                    order.insert(id, creations);
                    desk.create(id, group, &mut out)
                }
                2 => desk.agent_online(agent, &mut out),
                3 => desk.agent_offline(agent, &mut out),
                4 => desk.accept(agent, conv, now_ms, &mut out),
                5 => desk.transfer_to_agent(by, conv, agent, now_ms, &mut out),
                6 => desk.transfer_to_group(by, conv, group, now_ms, &mut out),
                7 | 8 => desk.resolve(by, conv, now_ms, &mut out),
                9 => {
                    if before == Some(State::Resolved) {
                        creations += 1;
                        order.insert(conv, creations);
                    }
                    desk.visitor_message(conv, now_ms, &mut out)
                }
                10 => desk.agent_socket_lost(agent, now_ms),
                11 => desk.agent_socket_restored(agent, &mut out),
                _ => {
                    desk.tick(now_ms, &mut out);
                    Ok(())
                }
            };
            match &result {
                Ok(()) => fold(&mut seen, &out),
                Err(e) => {
                    assert!(out.is_empty(), "failed {e:?} left events {out:?}");
                    assert_eq!(desk.state(conv), before, "failed {e:?} changed the state");
                }
            }
            for event in &out {
                match event {
                    Event::Assigned { .. } => counts[0] += 1,
                    Event::Resolved { .. } => counts[1] += 1,
                    Event::Closed { .. } => counts[2] += 1,
                    Event::AgentOffline { .. } => counts[3] += 1,
                    _ => {}
                }
            }
            desk.assert_invariants();
            // The events told the whole story: a reader folding them has the desk's states.
            assert_eq!(seen.len(), desk.len());
            for (&c, s) in &seen {
                assert_eq!(Some(s.state), desk.state(c), "conversation {c}");
                assert_eq!(s.agent, desk.agent(c), "conversation {c}");
            }
            // An assigned conversation has exactly one agent, and no agent is over capacity.
            for &a in &agents {
                let held = desk.router().agent_conversations(a);
                assert!(held.len() <= capacity(a), "{a:?} holds {held:?}");
                for &c in held {
                    assert_eq!(desk.agent(c), Some(a));
                }
            }
            let assigned = seen.values().filter(|s| s.state == State::Assigned).count();
            let held: usize = agents
                .iter()
                .map(|&a| desk.router().agent_conversations(a).len())
                .sum();
            assert_eq!(
                assigned, held,
                "each assigned conversation is held exactly once"
            );
            // Queues keep creation (or reopen) order, whatever re-queued them.
            for &g in &groups {
                let keys: Vec<u64> = desk.router().queued(g).map(|c| order[&c]).collect();
                assert!(
                    keys.windows(2).all(|w| w[0] < w[1]),
                    "{g:?} out of order: {keys:?}"
                );
            }
            // Nothing resolved (or in socket grace) outlives its deadline once ticked.
            if rng.below(4) == 0 {
                out.clear();
                desk.tick(now_ms, &mut out);
                fold(&mut seen, &out);
                assert!(
                    desk.next_deadline_ms().is_none_or(|d| d > now_ms),
                    "deadline passed after tick at {now_ms}"
                );
            }
        }
        counts
    }

    #[test]
    fn randomized_lifecycle_and_routing_keep_invariants() {
        if let Some(seed) = std::env::var("KEFU_LIFECYCLE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            simulate(seed, 5_000);
            return;
        }
        let mut totals = [0usize; 4];
        for seed in 1..=24u64 {
            let counts = simulate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 600);
            for (t, c) in totals.iter_mut().zip(counts) {
                *t += c;
            }
        }
        println!("events [assigned, resolved, closed, agent offline]: {totals:?}");
        assert!(
            totals.iter().all(|&t| t >= 200),
            "operation mix too narrow: {totals:?}"
        );
    }
}
