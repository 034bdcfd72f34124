//! Routing core: skill-group queues and agent assignment (least loaded first, round robin on ties) as pure data that returns explicit effects; no I/O, no runtime, no clock.
//!
//! The gateway owns one [`Router`] per tenant (or shard), feeds it what happened (a conversation
//! queued, an agent went online, an agent accepted, a socket dropped at `now_ms`), and turns the
//! [`Effect`]s appended to its buffer into events and messages. After any operation the caller runs
//! [`Router::dispatch`] so freed capacity and new arrivals meet.
//!
//! Order: each queue is sorted by the caller's `order_key` (the conversation's original enqueue
//! order, e.g. its creation sequence), then by conversation id. A conversation that returns to a
//! queue (its agent went offline, or it was transferred) keeps its key, so it goes back to where it
//! stood, ahead of newer arrivals. Dispatch serves the oldest waiting conversation among all groups
//! that have an eligible agent, so a shared agent does not starve one of its groups.
//!
//! Bounds, set at construction ([`RouterLimits`]): groups, agents, groups per agent, capacity per
//! agent, conversations tracked (queued plus assigned), and queue length per group for admissions.
//! Re-queueing from an agent that went offline is never refused (those conversations were already
//! admitted), so a queue may exceed `queue_len_max` by the capacity of its agents; the total stays
//! under `conversations_max`. All tables are sized at construction: operations allocate nothing
//! beyond what they append to the caller's effect buffer.
//!
//! Every operation checks first and mutates after: on `Err` nothing changed and no effect was
//! appended.

use std::collections::{HashMap, VecDeque};

/// A conversation id: the raw `u64` of `kefu_protocol::model::ConversationId`.
pub type ConvId = u64;

/// A skill group, by index in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(u16);

/// An agent, by index in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(u32);

impl GroupId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl AgentId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Bounds fixed at construction. See the module docs for how they combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterLimits {
    pub groups_max: usize,
    pub agents_max: usize,
    pub agent_groups_max: usize,
    pub agent_capacity_max: u32,
    /// Waiting conversations per group above which `enqueue` and `transfer_to_group` refuse.
    pub queue_len_max: usize,
    /// Conversations tracked at once, queued plus assigned.
    pub conversations_max: usize,
    pub name_bytes_max: usize,
    /// How long an online agent whose last socket dropped keeps its conversations before `tick`
    /// takes it offline. While lost it is offered nothing new.
    pub socket_grace_ms: u64,
}

impl RouterLimits {
    /// Limits for tests and the demo tenant.
    pub const DEMO: RouterLimits = RouterLimits {
        groups_max: 64,
        agents_max: 1024,
        agent_groups_max: 16,
        agent_capacity_max: 64,
        queue_len_max: 1000,
        conversations_max: 16 * 1024,
        name_bytes_max: 64,
        socket_grace_ms: 30_000,
    };
}

/// What an operation did, for the gateway to turn into events and messages. Effects of one call
/// come in the order they happened; position changes come last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The conversation (re)entered `group`'s queue. Its position follows as a
    /// `QueuePositionChanged` in the same batch.
    Queued { conv: ConvId, group: GroupId },
    /// A waiting conversation's 1-based queue position, sent when first known and whenever it
    /// changes (never twice with the same value).
    QueuePositionChanged { conv: ConvId, position: u32 },
    /// The conversation now belongs to `agent`; `group` is the conversation's group.
    Assigned {
        conv: ConvId,
        agent: AgentId,
        group: GroupId,
    },
    /// The conversation left `agent` (re-queued, transferred or resolved).
    Unassigned { conv: ConvId, agent: AgentId },
    /// The agent went offline (asked, or its socket grace period ran out in `tick`).
    AgentOffline { agent: AgentId },
}

/// Where a conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Queued { group: GroupId, position: u32 },
    Assigned { group: GroupId, agent: AgentId },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown agent {agent:?}")]
    UnknownAgent { agent: AgentId },
    #[error("unknown group {group:?}")]
    UnknownGroup { group: GroupId },
    #[error("unknown conversation {conv:#x}")]
    UnknownConversation { conv: ConvId },
    #[error("conversation {conv:#x} is already routed")]
    ConversationExists { conv: ConvId },
    #[error("agent {agent:?} is at its capacity of {capacity} conversations")]
    CapacityFull { agent: AgentId, capacity: u32 },
    #[error("agent {agent:?} is not in group {group:?}")]
    NotInGroup { agent: AgentId, group: GroupId },
    #[error("group {group:?} has {queue_len_max} conversations waiting, its queue_len_max")]
    QueueFull {
        group: GroupId,
        queue_len_max: usize,
    },
    #[error("{conversations_max} conversations are routed, the conversations_max")]
    TooManyConversations { conversations_max: usize },
    #[error("agent {agent:?} is offline")]
    AgentOffline { agent: AgentId },
    #[error("conversation {conv:#x} is not waiting in a queue")]
    NotQueued { conv: ConvId },
    #[error("conversation {conv:#x} is already assigned to agent {agent:?}")]
    AlreadyAssignedTo { conv: ConvId, agent: AgentId },
    #[error("conversation {conv:#x} is already waiting in group {group:?}")]
    AlreadyQueuedIn { conv: ConvId, group: GroupId },
    #[error("router limit `{limit}` is out of range")]
    InvalidLimit { limit: &'static str },
    #[error("more than groups_max = {groups_max} groups")]
    TooManyGroups { groups_max: usize },
    #[error("more than agents_max = {agents_max} agents")]
    TooManyAgents { agents_max: usize },
    #[error("agent {name:?} is in more than agent_groups_max = {agent_groups_max} groups")]
    TooManyAgentGroups {
        name: String,
        agent_groups_max: usize,
    },
    #[error("agent {name:?} lists group {group:?} twice")]
    DuplicateAgentGroup { name: String, group: GroupId },
    #[error("agent {name:?}: capacity {capacity} is not in 1..={capacity_max}")]
    InvalidCapacity {
        name: String,
        capacity: u32,
        capacity_max: u32,
    },
    #[error("name {name:?} is empty or longer than name_bytes_max = {name_bytes_max}")]
    InvalidName { name: String, name_bytes_max: usize },
    #[error("name {name:?} is already used")]
    DuplicateName { name: String },
}

/// A queue slot. `announced` is the position last reported for it (0: none yet), kept next to
/// the entry so position updates need no lookup.
#[derive(Debug, Clone, Copy)]
struct QueueEntry {
    order_key: u64,
    conv: ConvId,
    announced: u32,
}

impl QueueEntry {
    fn key(&self) -> (u64, ConvId) {
        (self.order_key, self.conv)
    }
}

#[derive(Debug)]
struct Group {
    name: Box<str>,
    queue: VecDeque<QueueEntry>,
    members: Vec<AgentId>,
    /// Index into `members` where the next tie-break scan starts.
    round_robin_next: usize,
    /// Queue index from which announced positions may be stale; `usize::MAX` when none are.
    dirty_from: usize,
}

#[derive(Debug)]
struct Agent {
    name: Box<str>,
    groups: Vec<GroupId>,
    capacity: u32,
    online: bool,
    socket_lost_at_ms: Option<u64>,
    /// Unordered; at most `capacity` long, so linear search is cheap.
    assigned: Vec<ConvId>,
}

impl Agent {
    fn load(&self) -> u32 {
        self.assigned.len() as u32
    }

    fn has_room(&self) -> bool {
        self.load() < self.capacity
    }

    /// May be offered conversations by `dispatch`.
    fn eligible(&self) -> bool {
        self.online && self.socket_lost_at_ms.is_none() && self.has_room()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Queued,
    Assigned(AgentId),
}

#[derive(Debug, Clone, Copy)]
struct Conv {
    group: GroupId,
    order_key: u64,
    place: Place,
}

/// Conversation maps (the router's, the engine's) are sized for this many conversations at
/// start, or for the configured maximum if lower, so they do not rehash on the way there: a
/// doubling copies the whole map inside one command. Above it they grow as usual, so a huge
/// configured maximum does not reserve memory it may never use.
pub const PRESIZED_CONVERSATIONS_MAX: usize = 1 << 20;

/// Queues, agents and who has which conversation. See the module docs.
#[derive(Debug)]
pub struct Router {
    limits: RouterLimits,
    groups: Vec<Group>,
    agents: Vec<Agent>,
    group_ids: HashMap<Box<str>, GroupId>,
    agent_ids: HashMap<Box<str>, AgentId>,
    convs: HashMap<ConvId, Conv>,
    /// Groups whose `dirty_from` is set, each once.
    dirty_groups: Vec<GroupId>,
    /// Scratch for `dispatch`: groups with no eligible agent in this round.
    blocked: Vec<bool>,
    /// Online agents with `socket_lost_at_ms` set, so `tick` is free when there are none.
    agents_lost: usize,
}

impl Router {
    pub fn new(limits: RouterLimits) -> Result<Self, RouteError> {
        let checks: [(&'static str, bool); 7] = [
            (
                "groups_max",
                (1..=usize::from(u16::MAX)).contains(&limits.groups_max),
            ),
            (
                "agents_max",
                (1..=u32::MAX as usize).contains(&limits.agents_max),
            ),
            ("agent_groups_max", limits.agent_groups_max >= 1),
            ("agent_capacity_max", limits.agent_capacity_max >= 1),
            (
                "queue_len_max",
                (1..=(u32::MAX / 4) as usize).contains(&limits.queue_len_max),
            ),
            (
                "conversations_max",
                (1..=(u32::MAX / 4) as usize).contains(&limits.conversations_max),
            ),
            ("name_bytes_max", limits.name_bytes_max >= 1),
        ];
        if let Some((limit, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(RouteError::InvalidLimit { limit });
        }
        Ok(Self {
            limits,
            groups: Vec::with_capacity(limits.groups_max),
            agents: Vec::with_capacity(limits.agents_max),
            group_ids: HashMap::with_capacity(limits.groups_max),
            agent_ids: HashMap::with_capacity(limits.agents_max),
            convs: HashMap::with_capacity(limits.conversations_max.min(PRESIZED_CONVERSATIONS_MAX)),
            dirty_groups: Vec::with_capacity(limits.groups_max),
            blocked: Vec::with_capacity(limits.groups_max),
            agents_lost: 0,
        })
    }

    pub fn limits(&self) -> &RouterLimits {
        &self.limits
    }

    fn check_name(&self, name: &str) -> Result<(), RouteError> {
        if name.is_empty() || name.len() > self.limits.name_bytes_max {
            return Err(RouteError::InvalidName {
                name: name.to_owned(),
                name_bytes_max: self.limits.name_bytes_max,
            });
        }
        if self.group_ids.contains_key(name) || self.agent_ids.contains_key(name) {
            return Err(RouteError::DuplicateName {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Adds a skill group (setup time: its queue is allocated here).
    /// Group and agent names share one namespace, so a log line's name is unambiguous.
    pub fn add_group(&mut self, name: &str) -> Result<GroupId, RouteError> {
        if self.groups.len() >= self.limits.groups_max {
            return Err(RouteError::TooManyGroups {
                groups_max: self.limits.groups_max,
            });
        }
        self.check_name(name)?;
        let id = GroupId(self.groups.len() as u16);
        self.groups.push(Group {
            name: name.into(),
            queue: VecDeque::with_capacity(self.limits.queue_len_max),
            members: Vec::new(),
            round_robin_next: 0,
            dirty_from: usize::MAX,
        });
        self.group_ids.insert(name.into(), id);
        self.blocked.push(false);
        Ok(id)
    }

    /// Adds an agent, offline, serving `groups` with room for `capacity` conversations at once.
    /// An agent with no group receives conversations only by transfer.
    pub fn add_agent(
        &mut self,
        name: &str,
        groups: &[GroupId],
        capacity: u32,
    ) -> Result<AgentId, RouteError> {
        if self.agents.len() >= self.limits.agents_max {
            return Err(RouteError::TooManyAgents {
                agents_max: self.limits.agents_max,
            });
        }
        self.check_name(name)?;
        if !(1..=self.limits.agent_capacity_max).contains(&capacity) {
            return Err(RouteError::InvalidCapacity {
                name: name.to_owned(),
                capacity,
                capacity_max: self.limits.agent_capacity_max,
            });
        }
        if groups.len() > self.limits.agent_groups_max {
            return Err(RouteError::TooManyAgentGroups {
                name: name.to_owned(),
                agent_groups_max: self.limits.agent_groups_max,
            });
        }
        for (i, &group) in groups.iter().enumerate() {
            self.group(group)?;
            if groups[..i].contains(&group) {
                return Err(RouteError::DuplicateAgentGroup {
                    name: name.to_owned(),
                    group,
                });
            }
        }
        let id = AgentId(self.agents.len() as u32);
        for &group in groups {
            self.groups[group.index()].members.push(id);
        }
        self.agents.push(Agent {
            name: name.into(),
            groups: groups.to_vec(),
            capacity,
            online: false,
            socket_lost_at_ms: None,
            assigned: Vec::with_capacity(capacity as usize),
        });
        self.agent_ids.insert(name.into(), id);
        Ok(id)
    }

    fn group(&self, group: GroupId) -> Result<&Group, RouteError> {
        self.groups
            .get(group.index())
            .ok_or(RouteError::UnknownGroup { group })
    }

    fn agent(&self, agent: AgentId) -> Result<&Agent, RouteError> {
        self.agents
            .get(agent.index())
            .ok_or(RouteError::UnknownAgent { agent })
    }

    fn conv(&self, conv: ConvId) -> Result<Conv, RouteError> {
        self.convs
            .get(&conv)
            .copied()
            .ok_or(RouteError::UnknownConversation { conv })
    }

    /// Puts a new conversation in `group`'s queue at the place its `order_key` gives it.
    pub fn enqueue(
        &mut self,
        conv: ConvId,
        group: GroupId,
        order_key: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), RouteError> {
        self.check_queue_room(group)?;
        if self.convs.contains_key(&conv) {
            return Err(RouteError::ConversationExists { conv });
        }
        if self.convs.len() >= self.limits.conversations_max {
            return Err(RouteError::TooManyConversations {
                conversations_max: self.limits.conversations_max,
            });
        }
        self.convs.insert(
            conv,
            Conv {
                group,
                order_key,
                place: Place::Queued,
            },
        );
        self.queue_insert(group, order_key, conv);
        out.push(Effect::Queued { conv, group });
        self.flush_positions(out);
        Ok(())
    }

    fn check_queue_room(&self, group: GroupId) -> Result<(), RouteError> {
        if self.group(group)?.queue.len() >= self.limits.queue_len_max {
            return Err(RouteError::QueueFull {
                group,
                queue_len_max: self.limits.queue_len_max,
            });
        }
        Ok(())
    }

    /// The agent is available. Idempotent; also ends a socket grace period.
    pub fn agent_online(&mut self, agent: AgentId) -> Result<(), RouteError> {
        self.agent(agent)?;
        self.clear_socket_lost(agent);
        self.agents[agent.index()].online = true;
        Ok(())
    }

    /// The agent leaves: its conversations go back to their groups' queues at their original
    /// places. Idempotent (no effects when already offline).
    pub fn agent_offline(
        &mut self,
        agent: AgentId,
        out: &mut Vec<Effect>,
    ) -> Result<(), RouteError> {
        if !self.agent(agent)?.online {
            return Ok(());
        }
        self.take_offline(agent, out);
        self.flush_positions(out);
        Ok(())
    }

    fn take_offline(&mut self, agent: AgentId, out: &mut Vec<Effect>) {
        self.clear_socket_lost(agent);
        // Taken out and put back so its capacity is reused: no allocation.
        let mut assigned = std::mem::take(&mut self.agents[agent.index()].assigned);
        let convs = &self.convs;
        assigned.sort_unstable_by_key(|c| (convs[c].order_key, *c));
        for &conv in &assigned {
            let entry = self
                .convs
                .get_mut(&conv)
                .expect("assigned conversation is tracked");
            assert_eq!(entry.place, Place::Assigned(agent));
            entry.place = Place::Queued;
            let (group, order_key) = (entry.group, entry.order_key);
            self.queue_insert(group, order_key, conv);
            out.push(Effect::Unassigned { conv, agent });
            out.push(Effect::Queued { conv, group });
        }
        assigned.clear();
        let state = &mut self.agents[agent.index()];
        state.assigned = assigned;
        state.online = false;
        out.push(Effect::AgentOffline { agent });
    }

    /// The agent's last socket dropped at `now_ms`. It keeps its conversations but is offered
    /// nothing new; `tick` takes it offline once `socket_grace_ms` passes without
    /// `agent_socket_restored` or `agent_online`. No-op for an offline agent.
    pub fn agent_socket_lost(&mut self, agent: AgentId, now_ms: u64) -> Result<(), RouteError> {
        let state = &self.agent(agent)?;
        if !state.online || state.socket_lost_at_ms.is_some() {
            return Ok(());
        }
        self.agents[agent.index()].socket_lost_at_ms = Some(now_ms);
        self.agents_lost += 1;
        Ok(())
    }

    /// A socket of the agent is back within the grace period.
    pub fn agent_socket_restored(&mut self, agent: AgentId) -> Result<(), RouteError> {
        self.agent(agent)?;
        self.clear_socket_lost(agent);
        Ok(())
    }

    fn clear_socket_lost(&mut self, agent: AgentId) {
        if self.agents[agent.index()]
            .socket_lost_at_ms
            .take()
            .is_some()
        {
            self.agents_lost -= 1;
        }
    }

    /// Takes offline every agent whose socket grace period has run out by `now_ms`.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        if self.agents_lost == 0 {
            return;
        }
        let grace_ms = self.limits.socket_grace_ms;
        for index in 0..self.agents.len() {
            let expired = self.agents[index]
                .socket_lost_at_ms
                .is_some_and(|lost_ms| now_ms.saturating_sub(lost_ms) >= grace_ms);
            if expired {
                self.take_offline(AgentId(index as u32), out);
            }
        }
        self.flush_positions(out);
    }

    /// When `tick` next has work: the earliest grace deadline, if any agent is in grace.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.agents_lost == 0 {
            return None;
        }
        self.agents
            .iter()
            .filter_map(|a| a.socket_lost_at_ms)
            .map(|lost_ms| lost_ms.saturating_add(self.limits.socket_grace_ms))
            .min()
    }

    /// The agent takes a specific waiting conversation of one of its groups.
    pub fn accept(
        &mut self,
        agent: AgentId,
        conv: ConvId,
        out: &mut Vec<Effect>,
    ) -> Result<(), RouteError> {
        let state = self.agent(agent)?;
        let entry = self.conv(conv)?;
        if entry.place != Place::Queued {
            return Err(RouteError::NotQueued { conv });
        }
        if !state.online {
            return Err(RouteError::AgentOffline { agent });
        }
        if !state.groups.contains(&entry.group) {
            return Err(RouteError::NotInGroup {
                agent,
                group: entry.group,
            });
        }
        self.check_room(agent)?;
        self.queue_remove(entry.group, entry.order_key, conv);
        self.assign(conv, agent, out);
        self.flush_positions(out);
        Ok(())
    }

    fn check_room(&self, agent: AgentId) -> Result<(), RouteError> {
        let state = self.agent(agent)?;
        if !state.has_room() {
            return Err(RouteError::CapacityFull {
                agent,
                capacity: state.capacity,
            });
        }
        Ok(())
    }

    /// Hands a conversation (waiting or assigned) to an online agent with room. Membership in the
    /// conversation's group is not required (a specialist may help); the conversation keeps its
    /// group and returns to that queue if the agent goes offline.
    pub fn transfer_to_agent(
        &mut self,
        conv: ConvId,
        agent: AgentId,
        out: &mut Vec<Effect>,
    ) -> Result<(), RouteError> {
        let state = self.agent(agent)?;
        let entry = self.conv(conv)?;
        if entry.place == Place::Assigned(agent) {
            return Err(RouteError::AlreadyAssignedTo { conv, agent });
        }
        if !state.online {
            return Err(RouteError::AgentOffline { agent });
        }
        self.check_room(agent)?;
        self.detach(conv, entry, out);
        self.assign(conv, agent, out);
        self.flush_positions(out);
        Ok(())
    }

    /// Moves a conversation (waiting or assigned) to `group`'s queue, keeping its order key, so it
    /// does not lose the time it already waited. Works whatever the state of the agents involved.
    pub fn transfer_to_group(
        &mut self,
        conv: ConvId,
        group: GroupId,
        out: &mut Vec<Effect>,
    ) -> Result<(), RouteError> {
        self.group(group)?;
        let entry = self.conv(conv)?;
        if entry.place == Place::Queued && entry.group == group {
            return Err(RouteError::AlreadyQueuedIn { conv, group });
        }
        self.check_queue_room(group)?;
        self.detach(conv, entry, out);
        let tracked = self.convs.get_mut(&conv).expect("checked above");
        tracked.group = group;
        tracked.place = Place::Queued;
        self.queue_insert(group, entry.order_key, conv);
        out.push(Effect::Queued { conv, group });
        self.flush_positions(out);
        Ok(())
    }

    /// The conversation leaves routing (resolved, or closed while waiting): frees its agent's
    /// capacity or its queue slot. A reopened conversation comes back through `enqueue`.
    pub fn resolve(&mut self, conv: ConvId, out: &mut Vec<Effect>) -> Result<(), RouteError> {
        let entry = self.conv(conv)?;
        self.detach(conv, entry, out);
        self.convs.remove(&conv);
        self.flush_positions(out);
        Ok(())
    }

    /// Removes the conversation from its queue or its agent; the caller then places it.
    fn detach(&mut self, conv: ConvId, entry: Conv, out: &mut Vec<Effect>) {
        match entry.place {
            Place::Queued => self.queue_remove(entry.group, entry.order_key, conv),
            Place::Assigned(agent) => {
                let assigned = &mut self.agents[agent.index()].assigned;
                let at = assigned
                    .iter()
                    .position(|&c| c == conv)
                    .expect("assigned conversation is in its agent's list");
                assigned.swap_remove(at);
                out.push(Effect::Unassigned { conv, agent });
            }
        }
    }

    fn assign(&mut self, conv: ConvId, agent: AgentId, out: &mut Vec<Effect>) {
        let state = &mut self.agents[agent.index()];
        assert!(state.has_room(), "capacity checked before assigning");
        state.assigned.push(conv);
        let entry = self
            .convs
            .get_mut(&conv)
            .expect("assigned conversation is tracked");
        entry.place = Place::Assigned(agent);
        out.push(Effect::Assigned {
            conv,
            agent,
            group: entry.group,
        });
    }

    /// Assigns waiting conversations to eligible agents (online, socket up, below capacity): the
    /// oldest waiting conversation among groups that have one goes first, to the least-loaded
    /// eligible agent of its group, ties broken round robin. Then reports changed positions.
    pub fn dispatch(&mut self, out: &mut Vec<Effect>) {
        self.blocked.fill(false);
        // Each round assigns one conversation or blocks one group: at most
        // (waiting conversations + groups) rounds.
        loop {
            let mut oldest: Option<(GroupId, (u64, ConvId))> = None;
            for (index, group) in self.groups.iter().enumerate() {
                if self.blocked[index] {
                    continue;
                }
                if let Some(head) = group.queue.front()
                    && oldest.is_none_or(|(_, key)| head.key() < key)
                {
                    oldest = Some((GroupId(index as u16), head.key()));
                }
            }
            let Some((group, (_, conv))) = oldest else {
                break;
            };
            match self.pick_agent(group) {
                Some(agent) => {
                    let state = &mut self.groups[group.index()];
                    let head = state.queue.pop_front().expect("group has a head");
                    assert_eq!(head.conv, conv);
                    self.mark_dirty(group, 0);
                    self.assign(conv, agent, out);
                }
                None => self.blocked[group.index()] = true,
            }
        }
        self.flush_positions(out);
    }

    /// The least-loaded eligible member of `group`; among equals, the first at or after the
    /// group's round-robin cursor, which then moves past it.
    fn pick_agent(&mut self, group: GroupId) -> Option<AgentId> {
        let state = &self.groups[group.index()];
        let members_len = state.members.len();
        let mut best: Option<(u32, usize)> = None;
        for offset in 0..members_len {
            let slot = (state.round_robin_next + offset) % members_len;
            let agent = &self.agents[state.members[slot].index()];
            if agent.eligible() && best.is_none_or(|(load, _)| agent.load() < load) {
                best = Some((agent.load(), slot));
            }
        }
        let (_, slot) = best?;
        let state = &mut self.groups[group.index()];
        state.round_robin_next = (slot + 1) % members_len;
        Some(state.members[slot])
    }

    fn queue_insert(&mut self, group: GroupId, order_key: u64, conv: ConvId) {
        let queue = &mut self.groups[group.index()].queue;
        let at = match queue.binary_search_by(|e| e.key().cmp(&(order_key, conv))) {
            Ok(_) => panic!("conversation {conv:#x} queued twice in group {group:?}"),
            Err(at) => at,
        };
        queue.insert(
            at,
            QueueEntry {
                order_key,
                conv,
                announced: 0,
            },
        );
        self.mark_dirty(group, at);
    }

    fn queue_remove(&mut self, group: GroupId, order_key: u64, conv: ConvId) {
        let queue = &mut self.groups[group.index()].queue;
        let at = queue
            .binary_search_by(|e| e.key().cmp(&(order_key, conv)))
            .unwrap_or_else(|_| panic!("conversation {conv:#x} missing from group {group:?}"));
        queue.remove(at);
        self.mark_dirty(group, at);
    }

    fn mark_dirty(&mut self, group: GroupId, from: usize) {
        let state = &mut self.groups[group.index()];
        if state.dirty_from == usize::MAX {
            self.dirty_groups.push(group);
        }
        state.dirty_from = state.dirty_from.min(from);
    }

    /// Reports every waiting conversation whose position differs from the one last reported.
    /// Inserting or removing at index i only moves entries at i and after, so the scan starts
    /// there.
    fn flush_positions(&mut self, out: &mut Vec<Effect>) {
        for group in self.dirty_groups.drain(..) {
            let state = &mut self.groups[group.index()];
            let from = std::mem::replace(&mut state.dirty_from, usize::MAX);
            if from >= state.queue.len() {
                continue;
            }
            for (offset, entry) in state.queue.range_mut(from..).enumerate() {
                let position = (from + offset + 1) as u32;
                if entry.announced != position {
                    entry.announced = position;
                    out.push(Effect::QueuePositionChanged {
                        conv: entry.conv,
                        position,
                    });
                }
            }
        }
    }

    /// 1-based queue position of a waiting conversation.
    pub fn position(&self, conv: ConvId) -> Option<u32> {
        match self.placement(conv)? {
            Placement::Queued { position, .. } => Some(position),
            Placement::Assigned { .. } => None,
        }
    }

    pub fn placement(&self, conv: ConvId) -> Option<Placement> {
        let entry = self.convs.get(&conv)?;
        Some(match entry.place {
            Place::Queued => {
                let queue = &self.groups[entry.group.index()].queue;
                let at = queue
                    .binary_search_by(|e| e.key().cmp(&(entry.order_key, conv)))
                    .expect("queued conversation is in its group's queue");
                Placement::Queued {
                    group: entry.group,
                    position: (at + 1) as u32,
                }
            }
            Place::Assigned(agent) => Placement::Assigned {
                group: entry.group,
                agent,
            },
        })
    }

    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.group_ids.get(name).copied()
    }

    pub fn agent_id(&self, name: &str) -> Option<AgentId> {
        self.agent_ids.get(name).copied()
    }

    pub fn group_name(&self, group: GroupId) -> Option<&str> {
        self.groups.get(group.index()).map(|g| &*g.name)
    }

    pub fn agent_name(&self, agent: AgentId) -> Option<&str> {
        self.agents.get(agent.index()).map(|a| &*a.name)
    }

    pub fn is_online(&self, agent: AgentId) -> bool {
        self.agents.get(agent.index()).is_some_and(|a| a.online)
    }

    /// Conversations the agent has now, in no particular order.
    pub fn agent_conversations(&self, agent: AgentId) -> &[ConvId] {
        self.agents
            .get(agent.index())
            .map_or(&[], |a| &a.assigned[..])
    }

    /// Waiting conversations of the group, first in line first.
    pub fn queued(&self, group: GroupId) -> impl Iterator<Item = ConvId> + '_ {
        self.groups
            .get(group.index())
            .into_iter()
            .flat_map(|g| g.queue.iter().map(|e| e.conv))
    }

    /// Conversations tracked (queued plus assigned).
    pub fn conversations_len(&self) -> usize {
        self.convs.len()
    }

    /// Checks every structural invariant; O(everything), for tests and debug tooling. Panics with
    /// the broken invariant.
    pub fn assert_invariants(&self) {
        let mut seen: usize = 0;
        for (index, group) in self.groups.iter().enumerate() {
            let id = GroupId(index as u16);
            assert_eq!(group.dirty_from, usize::MAX, "positions flushed");
            for (at, entry) in group.queue.iter().enumerate() {
                if at > 0 {
                    assert!(
                        group.queue[at - 1].key() < entry.key(),
                        "queue {id:?} sorted by order key"
                    );
                }
                let conv = self
                    .convs
                    .get(&entry.conv)
                    .expect("queued conversation tracked");
                assert_eq!(
                    (conv.place, conv.group, conv.order_key),
                    (Place::Queued, id, entry.order_key)
                );
                assert_eq!(
                    entry.announced as usize,
                    at + 1,
                    "position of {:#x} announced",
                    entry.conv
                );
                seen += 1;
            }
            for &member in &group.members {
                assert!(self.agents[member.index()].groups.contains(&id));
            }
        }
        let mut lost = 0;
        for (index, agent) in self.agents.iter().enumerate() {
            let id = AgentId(index as u32);
            assert!(agent.load() <= agent.capacity, "agent {id:?} over capacity");
            assert!(
                agent.online || agent.assigned.is_empty(),
                "offline agent {id:?} holds conversations"
            );
            assert!(agent.online || agent.socket_lost_at_ms.is_none());
            lost += usize::from(agent.socket_lost_at_ms.is_some());
            for (at, &conv) in agent.assigned.iter().enumerate() {
                assert!(!agent.assigned[..at].contains(&conv));
                let entry = self
                    .convs
                    .get(&conv)
                    .expect("assigned conversation tracked");
                assert_eq!(entry.place, Place::Assigned(id));
                seen += 1;
            }
            for &group in &agent.groups {
                assert!(self.groups[group.index()].members.contains(&id));
            }
        }
        assert_eq!(lost, self.agents_lost);
        assert_eq!(
            seen,
            self.convs.len(),
            "every conversation in exactly one place"
        );
        assert!(self.convs.len() <= self.limits.conversations_max);
        assert!(self.dirty_groups.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RouterLimits {
        RouterLimits {
            groups_max: 4,
            agents_max: 8,
            agent_groups_max: 4,
            agent_capacity_max: 8,
            queue_len_max: 8,
            conversations_max: 32,
            name_bytes_max: 16,
            socket_grace_ms: 1000,
        }
    }

    fn positions(effects: &[Effect]) -> Vec<(ConvId, u32)> {
        effects
            .iter()
            .filter_map(|e| match *e {
                Effect::QueuePositionChanged { conv, position } => Some((conv, position)),
                _ => None,
            })
            .collect()
    }

    fn assignments(effects: &[Effect]) -> Vec<(ConvId, AgentId)> {
        effects
            .iter()
            .filter_map(|e| match *e {
                Effect::Assigned { conv, agent, .. } => Some((conv, agent)),
                _ => None,
            })
            .collect()
    }

    /// One group "support" and agents a, b, c in it with the given capacities, all online.
    fn setup(capacities: &[u32]) -> (Router, GroupId, Vec<AgentId>) {
        let mut router = Router::new(limits()).unwrap();
        let group = router.add_group("support").unwrap();
        let agents = capacities
            .iter()
            .enumerate()
            .map(|(i, &capacity)| {
                let name = ["a", "b", "c", "d"][i];
                let agent = router.add_agent(name, &[group], capacity).unwrap();
                router.agent_online(agent).unwrap();
                agent
            })
            .collect();
        (router, group, agents)
    }

    #[test]
    fn least_loaded_agent_wins() {
        let (mut router, group, agents) = setup(&[4, 4, 4]);
        let mut out = Vec::new();
        // a gets two conversations, b one, c none.
        router.enqueue(1, group, 1, &mut out).unwrap();
        router.enqueue(2, group, 2, &mut out).unwrap();
        router.enqueue(3, group, 3, &mut out).unwrap();
        router.accept(agents[0], 1, &mut out).unwrap();
        router.accept(agents[0], 2, &mut out).unwrap();
        router.accept(agents[1], 3, &mut out).unwrap();
        router.enqueue(4, group, 4, &mut out).unwrap();
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(4, agents[2])]);
        // Now loads are 2, 1, 1: the next goes to b or c, never a.
        router.enqueue(5, group, 5, &mut out).unwrap();
        out.clear();
        router.dispatch(&mut out);
        let [(5, agent)] = assignments(&out)[..] else {
            panic!("{out:?}")
        };
        assert_ne!(agent, agents[0]);
        router.assert_invariants();
    }

    #[test]
    fn ties_rotate_round_robin_across_dispatches() {
        let (mut router, group, agents) = setup(&[4, 4, 4]);
        let mut out = Vec::new();
        let mut picked = Vec::new();
        for conv in 1..=7 {
            router.enqueue(conv, group, conv, &mut out).unwrap();
            out.clear();
            router.dispatch(&mut out);
            let [(c, agent)] = assignments(&out)[..] else {
                panic!("{out:?}")
            };
            assert_eq!(c, conv);
            picked.push(agent);
            // Resolving keeps every load at zero, so each dispatch is a pure tie.
            router.resolve(conv, &mut out).unwrap();
        }
        let [a, b, c] = agents[..] else {
            unreachable!()
        };
        assert_eq!(picked, [a, b, c, a, b, c, a]);
        // One dispatch with several conversations spreads them the same way.
        for conv in 10..13 {
            router.enqueue(conv, group, conv, &mut out).unwrap();
        }
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(10, b), (11, c), (12, a)]);
        router.assert_invariants();
    }

    #[test]
    fn capacity_is_respected() {
        let (mut router, group, agents) = setup(&[1, 2]);
        let mut out = Vec::new();
        for conv in 1..=5 {
            router.enqueue(conv, group, conv, &mut out).unwrap();
        }
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out).len(), 3);
        assert_eq!(router.agent_conversations(agents[0]).len(), 1);
        assert_eq!(router.agent_conversations(agents[1]).len(), 2);
        assert_eq!(router.position(4), Some(1));
        assert_eq!(router.position(5), Some(2));
        out.clear();
        assert_eq!(
            router.accept(agents[0], 4, &mut out),
            Err(RouteError::CapacityFull {
                agent: agents[0],
                capacity: 1
            })
        );
        assert_eq!(
            router.transfer_to_agent(4, agents[1], &mut out),
            Err(RouteError::CapacityFull {
                agent: agents[1],
                capacity: 2
            })
        );
        assert!(out.is_empty(), "failed operations have no effects");
        // Freeing one slot lets exactly one more through.
        let first = router.agent_conversations(agents[0])[0];
        router.resolve(first, &mut out).unwrap();
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(4, agents[0])]);
        assert_eq!(positions(&out), [(5, 1)]);
        router.assert_invariants();
    }

    #[test]
    fn offline_requeues_in_original_order_ahead_of_newer_arrivals() {
        let (mut router, group, agents) = setup(&[3]);
        let agent = agents[0];
        let mut out = Vec::new();
        for conv in [10, 20, 30] {
            router.enqueue(conv, group, conv, &mut out).unwrap();
        }
        router.dispatch(&mut out);
        // Newer arrivals wait while the agent is full.
        router.enqueue(40, group, 40, &mut out).unwrap();
        router.enqueue(50, group, 50, &mut out).unwrap();
        out.clear();
        router.agent_offline(agent, &mut out).unwrap();
        let queue: Vec<ConvId> = router.queued(group).collect();
        assert_eq!(queue, [10, 20, 30, 40, 50]);
        assert!(router.agent_conversations(agent).is_empty());
        // Effects: each conversation unassigned and queued, in original order, then positions.
        assert_eq!(
            out[..7],
            [
                Effect::Unassigned { conv: 10, agent },
                Effect::Queued { conv: 10, group },
                Effect::Unassigned { conv: 20, agent },
                Effect::Queued { conv: 20, group },
                Effect::Unassigned { conv: 30, agent },
                Effect::Queued { conv: 30, group },
                Effect::AgentOffline { agent },
            ]
        );
        assert_eq!(
            positions(&out),
            [(10, 1), (20, 2), (30, 3), (40, 4), (50, 5)]
        );
        // Offline twice is a no-op.
        out.clear();
        router.agent_offline(agent, &mut out).unwrap();
        assert!(out.is_empty());
        // Back online: the old conversations come back first.
        router.agent_online(agent).unwrap();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(10, agent), (20, agent), (30, agent)]);
        assert_eq!(positions(&out), [(40, 1), (50, 2)]);
        router.assert_invariants();
    }

    #[test]
    fn positions_are_announced_only_when_they_change() {
        let (mut router, group, agents) = setup(&[1]);
        router.agent_offline(agents[0], &mut Vec::new()).unwrap();
        let mut out = Vec::new();
        router.enqueue(1, group, 100, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Effect::Queued { conv: 1, group },
                Effect::QueuePositionChanged {
                    conv: 1,
                    position: 1
                }
            ]
        );
        out.clear();
        router.enqueue(2, group, 200, &mut out).unwrap();
        assert_eq!(positions(&out), [(2, 2)], "conv 1 did not move");
        out.clear();
        // An older order key (a transfer keeps its key) goes in front: only those behind move.
        router.enqueue(3, group, 150, &mut out).unwrap();
        assert_eq!(positions(&out), [(3, 2), (2, 3)]);
        out.clear();
        // Dispatch with nobody online changes nothing and says nothing.
        router.dispatch(&mut out);
        assert!(out.is_empty());
        // Removing the last one moves nobody.
        router.resolve(2, &mut out).unwrap();
        assert!(out.is_empty());
        // Removing the first moves everyone behind it.
        router.resolve(1, &mut out).unwrap();
        assert_eq!(positions(&out), [(3, 1)]);
        assert_eq!(router.position(3), Some(1));
        assert_eq!(router.position(1), None);
        router.assert_invariants();
    }

    #[test]
    fn transfer_to_group_while_agents_are_offline() {
        let mut router = Router::new(limits()).unwrap();
        let sales = router.add_group("sales").unwrap();
        let support = router.add_group("support").unwrap();
        let seller = router.add_agent("seller", &[sales], 2).unwrap();
        let helper = router.add_agent("helper", &[support], 2).unwrap();
        let mut out = Vec::new();
        router.agent_online(seller).unwrap();
        router.enqueue(7, sales, 1, &mut out).unwrap();
        router.dispatch(&mut out);
        // The seller hands the conversation to support, where nobody is online.
        out.clear();
        router.transfer_to_group(7, support, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Effect::Unassigned {
                    conv: 7,
                    agent: seller
                },
                Effect::Queued {
                    conv: 7,
                    group: support
                },
                Effect::QueuePositionChanged {
                    conv: 7,
                    position: 1
                },
            ]
        );
        out.clear();
        router.dispatch(&mut out);
        assert!(out.is_empty(), "nobody in support is online");
        assert_eq!(
            router.placement(7),
            Some(Placement::Queued {
                group: support,
                position: 1
            })
        );
        // The seller goes offline; the conversation stays with support.
        router.agent_offline(seller, &mut out).unwrap();
        assert_eq!(out, [Effect::AgentOffline { agent: seller }]);
        assert_eq!(
            router.transfer_to_group(7, support, &mut out),
            Err(RouteError::AlreadyQueuedIn {
                conv: 7,
                group: support
            })
        );
        router.agent_online(helper).unwrap();
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(
            out,
            [Effect::Assigned {
                conv: 7,
                agent: helper,
                group: support
            }]
        );
        // An offline agent cannot be a transfer target; a group always can.
        assert_eq!(
            router.transfer_to_agent(7, seller, &mut out),
            Err(RouteError::AgentOffline { agent: seller })
        );
        router.transfer_to_group(7, sales, &mut out).unwrap();
        assert_eq!(router.position(7), Some(1));
        router.assert_invariants();
    }

    #[test]
    fn transfer_to_agent_outside_the_group_keeps_the_group() {
        let mut router = Router::new(limits()).unwrap();
        let sales = router.add_group("sales").unwrap();
        let support = router.add_group("support").unwrap();
        let seller = router.add_agent("seller", &[sales], 2).unwrap();
        let expert = router.add_agent("expert", &[support], 2).unwrap();
        let mut out = Vec::new();
        router.agent_online(expert).unwrap();
        router.enqueue(1, sales, 1, &mut out).unwrap();
        router.enqueue(2, sales, 2, &mut out).unwrap();
        out.clear();
        router.transfer_to_agent(1, expert, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Effect::Assigned {
                    conv: 1,
                    agent: expert,
                    group: sales
                },
                Effect::QueuePositionChanged {
                    conv: 2,
                    position: 1
                },
            ]
        );
        assert_eq!(
            router.accept(expert, 2, &mut out),
            Err(RouteError::NotInGroup {
                agent: expert,
                group: sales
            })
        );
        assert_eq!(
            router.transfer_to_agent(1, expert, &mut out),
            Err(RouteError::AlreadyAssignedTo {
                conv: 1,
                agent: expert
            })
        );
        router.agent_online(seller).unwrap();
        out.clear();
        router.transfer_to_agent(1, seller, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Effect::Unassigned {
                    conv: 1,
                    agent: expert
                },
                Effect::Assigned {
                    conv: 1,
                    agent: seller,
                    group: sales
                },
            ]
        );
        // Back to the expert, who then leaves: the conversation returns to sales, ahead of 2.
        router.transfer_to_agent(1, expert, &mut out).unwrap();
        router.agent_offline(expert, &mut out).unwrap();
        assert_eq!(router.queued(sales).collect::<Vec<_>>(), [1, 2]);
        router.assert_invariants();
    }

    #[test]
    fn socket_grace_period() {
        let (mut router, group, agents) = setup(&[2, 2]);
        let [a, b] = agents[..] else { unreachable!() };
        let mut out = Vec::new();
        router.enqueue(1, group, 1, &mut out).unwrap();
        router.dispatch(&mut out);
        assert_eq!(
            router.placement(1),
            Some(Placement::Assigned { group, agent: a })
        );
        router.agent_socket_lost(a, 5_000).unwrap();
        assert_eq!(router.next_deadline_ms(), Some(6_000));
        // While lost, a keeps conversation 1 but new work goes to b only, even once b is the more
        // loaded of the two.
        router.enqueue(2, group, 2, &mut out).unwrap();
        router.enqueue(3, group, 3, &mut out).unwrap();
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(2, b), (3, b)]);
        out.clear();
        router.tick(5_999, &mut out);
        assert!(out.is_empty());
        // Restored in time: nothing happens, and a is eligible again.
        router.agent_socket_restored(a).unwrap();
        assert_eq!(router.next_deadline_ms(), None);
        router.tick(10_000, &mut out);
        assert!(out.is_empty());
        // Lost again and not restored: offline at the deadline, conversation re-queued.
        router.agent_socket_lost(a, 20_000).unwrap();
        router.agent_socket_lost(a, 20_500).unwrap(); // the first loss time counts
        router.tick(21_000, &mut out);
        assert_eq!(
            out,
            [
                Effect::Unassigned { conv: 1, agent: a },
                Effect::Queued { conv: 1, group },
                Effect::AgentOffline { agent: a },
                Effect::QueuePositionChanged {
                    conv: 1,
                    position: 1
                },
            ]
        );
        assert!(!router.is_online(a));
        assert_eq!(router.next_deadline_ms(), None);
        // An offline agent's socket loss is ignored.
        router.agent_socket_lost(a, 30_000).unwrap();
        assert_eq!(router.next_deadline_ms(), None);
        router.assert_invariants();
    }

    #[test]
    fn oldest_conversation_across_groups_goes_first() {
        let mut router = Router::new(limits()).unwrap();
        let sales = router.add_group("sales").unwrap();
        let support = router.add_group("support").unwrap();
        let shared = router.add_agent("shared", &[sales, support], 2).unwrap();
        let mut out = Vec::new();
        router.enqueue(1, sales, 30, &mut out).unwrap();
        router.enqueue(2, support, 10, &mut out).unwrap();
        router.enqueue(3, support, 20, &mut out).unwrap();
        router.agent_online(shared).unwrap();
        out.clear();
        router.dispatch(&mut out);
        assert_eq!(assignments(&out), [(2, shared), (3, shared)]);
        assert_eq!(router.position(1), Some(1));
    }

    #[test]
    fn errors_and_limits() {
        let (mut router, group, agents) = setup(&[1]);
        let mut out = Vec::new();
        let ghost_group = GroupId(9);
        let ghost_agent = AgentId(9);
        assert_eq!(
            router.enqueue(1, ghost_group, 1, &mut out),
            Err(RouteError::UnknownGroup { group: ghost_group })
        );
        assert_eq!(
            router.agent_online(ghost_agent),
            Err(RouteError::UnknownAgent { agent: ghost_agent })
        );
        assert_eq!(
            router.resolve(1, &mut out),
            Err(RouteError::UnknownConversation { conv: 1 })
        );
        router.enqueue(1, group, 1, &mut out).unwrap();
        assert_eq!(
            router.enqueue(1, group, 2, &mut out.clone()),
            Err(RouteError::ConversationExists { conv: 1 })
        );
        for conv in 2..=8 {
            router.enqueue(conv, group, conv, &mut out).unwrap();
        }
        assert_eq!(
            router.enqueue(9, group, 9, &mut out),
            Err(RouteError::QueueFull {
                group,
                queue_len_max: 8
            })
        );
        router.dispatch(&mut out);
        assert_eq!(
            router.accept(agents[0], 1, &mut out),
            Err(RouteError::NotQueued { conv: 1 })
        );
        // The queue is full again; re-queueing from an agent that goes offline goes past
        // queue_len_max rather than dropping an admitted conversation.
        router.enqueue(9, group, 9, &mut out).unwrap();
        assert_eq!(router.queued(group).count(), 8);
        router.agent_offline(agents[0], &mut out).unwrap();
        assert_eq!(
            router.queued(group).collect::<Vec<_>>(),
            (1..=9).collect::<Vec<_>>()
        );
        assert_eq!(
            router.accept(agents[0], 2, &mut out),
            Err(RouteError::AgentOffline { agent: agents[0] })
        );
        router.assert_invariants();

        // conversations_max counts queued plus assigned.
        let mut small = Router::new(RouterLimits {
            conversations_max: 2,
            ..limits()
        })
        .unwrap();
        let g = small.add_group("g").unwrap();
        small.enqueue(1, g, 1, &mut out).unwrap();
        small.enqueue(2, g, 2, &mut out).unwrap();
        assert_eq!(
            small.enqueue(3, g, 3, &mut out),
            Err(RouteError::TooManyConversations {
                conversations_max: 2
            })
        );

        // Setup errors.
        assert_eq!(
            Router::new(RouterLimits {
                queue_len_max: 0,
                ..limits()
            })
            .unwrap_err(),
            RouteError::InvalidLimit {
                limit: "queue_len_max"
            }
        );
        let mut r = Router::new(RouterLimits {
            groups_max: 1,
            agents_max: 1,
            ..limits()
        })
        .unwrap();
        let g = r.add_group("g").unwrap();
        assert_eq!(
            r.add_group("h"),
            Err(RouteError::TooManyGroups { groups_max: 1 })
        );
        assert!(matches!(
            r.add_agent("g", &[g], 1),
            Err(RouteError::DuplicateName { .. })
        ));
        assert!(matches!(
            r.add_agent("", &[g], 1),
            Err(RouteError::InvalidName { .. })
        ));
        assert!(matches!(
            r.add_agent(&"x".repeat(17), &[g], 1),
            Err(RouteError::InvalidName { .. })
        ));
        assert!(matches!(
            r.add_agent("x", &[g], 0),
            Err(RouteError::InvalidCapacity { .. })
        ));
        assert!(matches!(
            r.add_agent("x", &[g], 9),
            Err(RouteError::InvalidCapacity { .. })
        ));
        assert!(matches!(
            r.add_agent("x", &[g, g], 1),
            Err(RouteError::DuplicateAgentGroup { .. })
        ));
        assert!(matches!(
            r.add_agent("x", &[GroupId(3)], 1),
            Err(RouteError::UnknownGroup { .. })
        ));
        assert!(matches!(
            r.add_agent("x", &[g; 5], 1),
            Err(RouteError::TooManyAgentGroups { .. })
        ));
        let x = r.add_agent("x", &[g], 1).unwrap();
        assert_eq!(
            (
                r.agent_id("x"),
                r.group_id("g"),
                r.agent_name(x),
                r.group_name(g)
            ),
            (Some(x), Some(g), Some("x"), Some("g"))
        );
        assert_eq!(
            r.add_agent("y", &[], 1),
            Err(RouteError::TooManyAgents { agents_max: 1 })
        );
    }

    /// xorshift64*: small, seedable, good enough to pick operations.
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

    /// Prints the seed if the test panics while it is alive.
    struct SeedGuard(u64);

    impl Drop for SeedGuard {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "routing simulation failed with seed {} (rerun: KEFU_ROUTING_SEED={})",
                    self.0, self.0
                );
            }
        }
    }

    /// What the gateway knows from effects alone.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Seen {
        Queued { group: GroupId, position: u32 },
        Assigned { agent: AgentId },
        Detached,
    }

    fn apply(seen: &mut HashMap<ConvId, Seen>, effects: &[Effect]) {
        for &effect in effects {
            match effect {
                Effect::Queued { conv, group } => {
                    seen.insert(conv, Seen::Queued { group, position: 0 });
                }
                Effect::QueuePositionChanged { conv, position } => {
                    let Some(Seen::Queued { position: old, .. }) = seen.get_mut(&conv) else {
                        panic!("position for a conversation not known queued: {effect:?}");
                    };
                    assert_ne!(
                        *old, position,
                        "position announced without a change: {effect:?}"
                    );
                    *old = position;
                }
                Effect::Assigned { conv, agent, .. } => {
                    seen.insert(conv, Seen::Assigned { agent });
                }
                Effect::Unassigned { conv, agent } => {
                    assert_eq!(
                        seen.get(&conv),
                        Some(&Seen::Assigned { agent }),
                        "{effect:?}"
                    );
                    seen.insert(conv, Seen::Detached);
                }
                Effect::AgentOffline { .. } => {}
            }
        }
    }

    /// Runs `steps` random operations; returns how many effects of each kind were seen
    /// ([queued, position, assigned, unassigned, offline]) so the caller can check coverage.
    fn simulate(seed: u64, steps: usize) -> [usize; 5] {
        let _guard = SeedGuard(seed);
        let mut rng = Rng(seed | 1);
        let limits = RouterLimits {
            socket_grace_ms: 50,
            ..limits()
        };
        let mut router = Router::new(limits).unwrap();
        let groups: Vec<GroupId> = ["g0", "g1", "g2"]
            .iter()
            .map(|n| router.add_group(n).unwrap())
            .collect();
        let mut agents = Vec::new();
        for name in ["a0", "a1", "a2", "a3", "a4"] {
            let mut member_of: Vec<GroupId> = groups
                .iter()
                .copied()
                .filter(|_| rng.below(2) == 0)
                .collect();
            if member_of.is_empty() && rng.below(4) != 0 {
                member_of.push(groups[rng.below(groups.len())]);
            }
            let capacity = 1 + rng.below(3) as u32;
            agents.push(router.add_agent(name, &member_of, capacity).unwrap());
        }
        let mut seen: HashMap<ConvId, Seen> = HashMap::new();
        let mut kinds = [0usize; 5];
        let mut out = Vec::new();
        let (mut next_conv, mut next_order_key, mut now_ms) = (1u64, 1u64, 0u64);
        for _ in 0..steps {
            out.clear();
            now_ms += rng.below(20) as u64;
            let conv = if next_conv > 1 {
                1 + rng.below(next_conv as usize) as u64
            } else {
                1
            };
            let agent = agents[rng.below(agents.len())];
            let group = groups[rng.below(groups.len())];
            let mut resolved = None;
            let result = match rng.below(12) {
                0..=2 => {
                    // Sometimes re-enqueue a known id (reopen after resolve, or a duplicate).
                    let id = if rng.below(4) == 0 { conv } else { next_conv };
                    next_conv = next_conv.max(id + 1);
                    next_order_key += 1;
                    router.enqueue(id, group, next_order_key, &mut out)
                }
                3 => router.agent_online(agent),
                4 => router.agent_offline(agent, &mut out),
                5 => router.accept(agent, conv, &mut out),
                6 => router.transfer_to_agent(conv, agent, &mut out),
                7 => router.transfer_to_group(conv, group, &mut out),
                8 => {
                    resolved = Some(conv);
                    router.resolve(conv, &mut out)
                }
                9 => {
                    if rng.below(2) == 0 {
                        router.agent_socket_lost(agent, now_ms)
                    } else {
                        router.agent_socket_restored(agent)
                    }
                }
                10 => {
                    router.tick(now_ms, &mut out);
                    Ok(())
                }
                _ => {
                    router.dispatch(&mut out);
                    // Work conservation: nobody eligible is left idle next to a waiting conversation.
                    for &g in &groups {
                        if router.queued(g).next().is_some() {
                            for &a in &agents {
                                let s = &router.agents[a.index()];
                                assert!(
                                    !(s.groups.contains(&g) && s.eligible()),
                                    "{a:?} idle while {g:?} waits"
                                );
                            }
                        }
                    }
                    Ok(())
                }
            };
            match result {
                Ok(()) => {
                    for effect in &out {
                        kinds[match effect {
                            Effect::Queued { .. } => 0,
                            Effect::QueuePositionChanged { .. } => 1,
                            Effect::Assigned { .. } => 2,
                            Effect::Unassigned { .. } => 3,
                            Effect::AgentOffline { .. } => 4,
                        }] += 1;
                    }
                    apply(&mut seen, &out);
                    if let Some(conv) = resolved {
                        seen.remove(&conv);
                    }
                }
                Err(e) => assert!(
                    out.is_empty(),
                    "failed operation {e:?} left effects {out:?}"
                ),
            }
            router.assert_invariants();
            // The effect stream told the whole story.
            assert_eq!(seen.len(), router.conversations_len());
            for (&conv, &view) in &seen {
                let expected = match router.placement(conv).expect("seen conversation routed") {
                    Placement::Queued { group, position } => Seen::Queued { group, position },
                    Placement::Assigned { agent, .. } => Seen::Assigned { agent },
                };
                assert_eq!(view, expected, "conversation {conv:#x}");
            }
        }
        kinds
    }

    #[test]
    fn randomized_operations_keep_invariants() {
        if let Some(seed) = std::env::var("KEFU_ROUTING_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            simulate(seed, 5_000);
            return;
        }
        let mut kinds = [0usize; 5];
        for seed in 1..=64u64 {
            let counts = simulate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1_000);
            for (total, count) in kinds.iter_mut().zip(counts) {
                *total += count;
            }
        }
        println!("effects [queued, position, assigned, unassigned, offline]: {kinds:?}");
        // The operation mix must reach every kind of effect, or the invariants prove little.
        assert!(kinds.iter().all(|&k| k >= 1000), "{kinds:?}");
    }
}
