//! Several nodes over a model broker: what the broker's threads and Redis pub/sub do for a
//! cluster, without threads or Redis. Each node's shards hold a real [`BrokerHandle`]
//! ([`crate::broker::model`]); the model reads what they post, follows their interest as the
//! subscriber thread does (a count per Redis channel, `Ready` once subscribed), carries DMs
//! and publications to the other nodes that follow them, and answers a DM's sender from the
//! number of nodes that received it.
//!
//! Faults, at random: a node's subscriber connection drops (what was on its socket is lost;
//! `Ready` waits until it is back; then `Resubscribed` to every shard), its publisher's drops
//! (DMs for other nodes answer `unavailable`, copies are dropped), or both (a partition).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::broker::{self, BrokerHandle, BrokerMsg, BrokerReq, ModelLink};
use crate::hub::{ConnId, Directory, ReplyTo};
use crate::mail::ShardMsg;
use crate::store::{StoreMsg, StoreReq};

use super::Rng;

/// Publications a node's broker queue holds (small, so a full queue happens).
const BROKER_QUEUE: usize = 64;

/// One node's end of the model broker.
pub(super) struct NodeBroker {
    /// What the node's shards hold.
    pub(super) handle: BrokerHandle,
    link: ModelLink,
    /// The node's directory (a DM goes to the recipient's home shard).
    directory: Arc<Directory>,
    /// Redis channel → shards of the node that follow it (the subscriber's count).
    interest: BTreeMap<String, u32>,
    publisher_up: bool,
    subscriber_up: bool,
    /// `Ready` owed once the subscriber is back.
    late_ready: Vec<(u16, u64)>,
    /// Messages on the subscriber's socket, to a shard of this node: lost when it drops.
    wire: VecDeque<(u16, BrokerMsg)>,
    /// What the broker's threads post to this node's shards (never lost).
    posts: VecDeque<(u16, BrokerMsg)>,
}

/// The model broker of a cluster world.
pub(super) struct ModelBroker {
    pub(super) nodes: Vec<NodeBroker>,
    shards_per_node: usize,
    /// Copies lost on a dropped subscription, or not sent (the publisher down).
    pub(super) lost: u64,
    /// Faults played.
    pub(super) faults: u64,
    /// Messages carried to another node's shards.
    pub(super) carried: u64,
    /// The shared store's answers, to shards of the world, in order (they wait for room in
    /// the mailboxes).
    pub(super) store_out: VecDeque<(usize, StoreMsg)>,
    /// DMs answered `unavailable` (queued while the publisher was up, taken once it was
    /// down).
    pub(super) unavailable: u64,
}

impl ModelBroker {
    /// A model for `nodes` nodes of `shards_per_node` shards; `directory(n)` is node `n`'s.
    pub(super) fn new(
        nodes: usize,
        shards_per_node: usize,
        directory: impl Fn(usize) -> Arc<Directory>,
    ) -> ModelBroker {
        let nodes = (0..nodes)
            .map(|n| {
                let (handle, link) = broker::model(&format!("node{n}"), BROKER_QUEUE);
                NodeBroker {
                    handle,
                    link,
                    directory: directory(n),
                    interest: BTreeMap::new(),
                    publisher_up: true,
                    subscriber_up: true,
                    late_ready: Vec::new(),
                    wire: VecDeque::new(),
                    posts: VecDeque::new(),
                }
            })
            .collect();
        ModelBroker {
            nodes,
            shards_per_node,
            lost: 0,
            faults: 0,
            carried: 0,
            unavailable: 0,
            store_out: VecDeque::new(),
        }
    }

    /// One turn of node `n`'s broker threads: its interest changes, then its publications.
    pub(super) fn turn(&mut self, n: usize) {
        while let Some(change) = self.nodes[n].link.next_interest() {
            let broker::Change { name, on, ready } = change;
            let node = &mut self.nodes[n];
            let count = node.interest.entry(name.clone()).or_insert(0);
            if on {
                *count += 1;
            } else {
                assert!(*count > 0, "node {n}: interest in {name} ended twice");
                *count -= 1;
                if *count == 0 {
                    node.interest.remove(&name);
                }
            }
            if let Some((shard, token)) = ready {
                if node.subscriber_up {
                    node.posts.push_back((shard, BrokerMsg::Ready { token }));
                } else {
                    node.late_ready.push((shard, token));
                }
            }
        }
        while let Some(req) = self.nodes[n].link.next_request() {
            self.publish(n, req);
        }
    }

    /// A publication of node `n`, as Redis would carry it.
    fn publish(&mut self, n: usize, req: BrokerReq) {
        let up = self.nodes[n].publisher_up;
        match req {
            BrokerReq::User {
                user,
                payload,
                reply,
            } => {
                let mut received = 0;
                if up {
                    let name = broker::user_channel(&user);
                    for m in self.followers(n, &name) {
                        let home = self.nodes[m].directory.place(&user).home;
                        let msg = BrokerMsg::User {
                            user: user.clone(),
                            payload: payload.clone(),
                        };
                        self.nodes[m].wire.push_back((home, msg));
                        received += 1;
                    }
                } else {
                    self.lost += 1;
                }
                if let Some(reply) = reply {
                    let shard = reply.conn.shard;
                    let msg = if up {
                        BrokerMsg::Routed {
                            reply,
                            online: received > 0,
                        }
                    } else {
                        self.unavailable += 1;
                        BrokerMsg::Unavailable { reply }
                    };
                    self.nodes[n].posts.push_back((shard, msg));
                }
            }
            BrokerReq::Channel { channel, payload } => {
                if !up {
                    self.lost += 1;
                    return;
                }
                let to = self.followers(n, &broker::channel_channel(&channel));
                self.wire_every_shard(to, || BrokerMsg::Channel {
                    channel: channel.clone(),
                    payload: payload.clone(),
                });
            }
            BrokerReq::Broadcast { payload } => {
                let to = self.followers(n, broker::ALL);
                self.wire_every_shard(to, || BrokerMsg::Broadcast {
                    payload: payload.clone(),
                });
            }
            BrokerReq::Disconnect { user, code, reason } => {
                let to = self.followers(n, &broker::user_channel(&user));
                self.wire_every_shard(to, || BrokerMsg::Disconnect {
                    user: user.clone(),
                    code,
                    reason: reason.clone(),
                });
            }
            BrokerReq::Members { ticket, .. } => {
                let members = up.then(Vec::new);
                let msg = BrokerMsg::Members { ticket, members };
                self.nodes[n].posts.push_back((ticket.shard, msg));
            }
            BrokerReq::Count {
                kind,
                name,
                conn,
                local,
            } => {
                let msg = BrokerMsg::Counted {
                    kind,
                    conn,
                    name,
                    total: local,
                };
                self.nodes[n].posts.push_back((conn.shard, msg));
            }
            BrokerReq::Presence { .. } | BrokerReq::Resync { .. } => {}
        }
    }

    /// Puts a copy on the wire to every shard of each node in `to` (a channel's, a
    /// broadcast's or a disconnect's copy goes to every shard of a node that follows it).
    fn wire_every_shard(&mut self, to: Vec<usize>, msg: impl Fn() -> BrokerMsg) {
        for m in to {
            for s in 0..self.shards_per_node as u16 {
                self.nodes[m].wire.push_back((s, msg()));
            }
        }
    }

    /// The other nodes whose subscriber is up and follows Redis channel `name` (every node
    /// follows [`broker::ALL`]).
    fn followers(&self, n: usize, name: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&m| {
                let node = &self.nodes[m];
                m != n
                    && node.subscriber_up
                    && (name == broker::ALL || node.interest.contains_key(name))
            })
            .collect()
    }

    /// A random fault, or the end of one: a node's subscriber or publisher connection drops
    /// or comes back.
    pub(super) fn fault(&mut self, rng: &mut Rng) {
        let n = rng.below(self.nodes.len() as u64) as usize;
        self.faults += 1;
        if rng.chance(50) {
            let up = !self.nodes[n].subscriber_up;
            self.set_subscriber(n, up);
        } else {
            let up = !self.nodes[n].publisher_up;
            self.set_publisher(n, up);
        }
    }

    fn set_subscriber(&mut self, n: usize, up: bool) {
        let shards = self.shards_per_node as u16;
        let node = &mut self.nodes[n];
        if node.subscriber_up == up {
            return;
        }
        node.subscriber_up = up;
        node.link.set_subscriber(up);
        if !up {
            // What was on the socket is gone with it.
            self.lost += node.wire.len() as u64;
            node.wire.clear();
            return;
        }
        for s in 0..shards {
            node.posts.push_back((s, BrokerMsg::Resubscribed));
        }
        for (shard, token) in std::mem::take(&mut node.late_ready) {
            node.posts.push_back((shard, BrokerMsg::Ready { token }));
        }
    }

    fn set_publisher(&mut self, n: usize, up: bool) {
        let node = &mut self.nodes[n];
        node.publisher_up = up;
        node.link.set_publisher(up);
    }

    /// Every connection back up (the drain at the end of a run).
    pub(super) fn heal(&mut self) {
        for n in 0..self.nodes.len() {
            self.set_subscriber(n, true);
            self.set_publisher(n, true);
        }
    }

    /// Hands what the broker's threads hold to the mailboxes (`mailboxes[n * shards + s]`),
    /// in order, each queue stopping at the first full mailbox.
    pub(super) fn deliver(&mut self, mailboxes: &mut [VecDeque<ShardMsg>], capacity: usize) {
        let spn = self.shards_per_node;
        while let Some((g, _)) = self.store_out.front() {
            let mb = &mut mailboxes[*g];
            if mb.len() >= capacity {
                break;
            }
            let (_, msg) = self.store_out.pop_front().expect("looked at");
            mb.push_back(ShardMsg::StoreBatch(vec![msg]));
        }
        for (n, node) in self.nodes.iter_mut().enumerate() {
            for (wire, q) in [(false, &mut node.posts), (true, &mut node.wire)] {
                while let Some((s, _)) = q.front() {
                    let mb = &mut mailboxes[n * spn + *s as usize];
                    if mb.len() >= capacity {
                        break;
                    }
                    let (_, msg) = q.pop_front().expect("looked at");
                    mb.push_back(ShardMsg::Broker(Box::new(msg)));
                    self.carried += u64::from(wire);
                }
            }
        }
    }

    /// Nothing left to carry or to answer.
    pub(super) fn idle(&self) -> bool {
        self.nodes
            .iter()
            .all(|node| node.wire.is_empty() && node.posts.is_empty() && node.late_ready.is_empty())
            && self.store_out.is_empty()
    }

    /// At the end, with every connection gone: no node follows anything any more (an
    /// interest never ended is a subscription that leaks).
    pub(super) fn check_end(&self) {
        for (n, node) in self.nodes.iter().enumerate() {
            assert!(
                node.interest.is_empty(),
                "node {n}: interest left after every connection closed: {:?}",
                node.interest
            );
        }
    }
}

/// The shared store of a cluster world stands for Redis: one store for every node, its
/// requests and answers naming shards by their place in the whole world (`node * shards +
/// shard`), stored events published to the nodes that follow the stream — the origin too —
/// as `broker-sub` delivers them, and lost with a dropped subscription like any copy.
impl ModelBroker {
    /// `conn` of node `n`, named for the shared store.
    fn global(&self, n: usize, c: ConnId) -> ConnId {
        ConnId {
            shard: (n * self.shards_per_node) as u16 + c.shard,
            ..c
        }
    }

    /// A shared store's `conn`, named for its node: (node, local id).
    fn local(&self, c: ConnId) -> (usize, ConnId) {
        let spn = self.shards_per_node as u16;
        let local = ConnId {
            shard: c.shard % spn,
            ..c
        };
        ((c.shard / spn) as usize, local)
    }

    /// A store request of node `n`'s shards, for the shared store (`back`: the other way,
    /// for a request the store's queue refused).
    pub(super) fn store_request(&self, n: usize, req: &mut StoreReq, back: bool) {
        let spn = self.shards_per_node as u16;
        let map = |c: &mut ConnId| {
            *c = if back {
                self.local(*c).1
            } else {
                self.global(n, *c)
            }
        };
        match req {
            StoreReq::SendDm { reply, sender, .. } => {
                if let Some(r) = reply {
                    map(&mut r.conn);
                }
                if let Some(c) = sender {
                    map(c);
                }
            }
            StoreReq::Publish { reply, .. } => {
                if let Some(r) = reply {
                    map(&mut r.conn);
                }
            }
            StoreReq::Open { conn, .. }
            | StoreReq::Page { conn, .. }
            | StoreReq::OpenChannel { conn, .. }
            | StoreReq::History { conn, .. }
            | StoreReq::Unread { conn, .. } => map(conn),
            StoreReq::CatchUp { shard, .. } => {
                *shard = if back {
                    *shard % spn
                } else {
                    n as u16 * spn + *shard
                }
            }
            StoreReq::Confirm { .. } | StoreReq::Shutdown => {}
        }
    }

    /// What the shared store told shard `g` of the world: answers go to that shard with
    /// their ids made local (returned: (world shard, message)); stored events are published
    /// through the model instead.
    pub(super) fn store_answers(
        &mut self,
        g: usize,
        msgs: Vec<StoreMsg>,
    ) -> Vec<(usize, StoreMsg)> {
        let spn = self.shards_per_node;
        let mut out = Vec::new();
        for m in msgs {
            match m {
                StoreMsg::Deliver {
                    user,
                    payload,
                    offset,
                    exclude,
                    ack,
                } => {
                    if let Some((reply, offset, epoch)) = ack {
                        let g = reply.conn.shard as usize;
                        let (_, conn) = self.local(reply.conn);
                        let reply = ReplyTo { conn, ..reply };
                        let msg = StoreMsg::Ack {
                            reply,
                            channel: None,
                            offset,
                            epoch,
                            queued: Some(false),
                        };
                        out.push((g, msg));
                    }
                    let name = broker::user_channel(&user);
                    let exclude = exclude.map(|c| self.local(c));
                    for m in self.stored_followers(&name) {
                        let home = self.nodes[m].directory.place(&user).home;
                        let msg = BrokerMsg::Stored {
                            user: user.clone(),
                            payload: payload.clone(),
                            offset,
                            exclude: exclude.filter(|(n, _)| *n == m).map(|(_, c)| c),
                        };
                        self.nodes[m].wire.push_back((home, msg));
                    }
                }
                StoreMsg::ChannelDeliver {
                    channel,
                    payload,
                    offset,
                } => {
                    // Sent to every shard of the world: published once.
                    if g != 0 {
                        continue;
                    }
                    let to = self.stored_followers(&broker::channel_channel(&channel));
                    self.wire_every_shard(to, || BrokerMsg::ChannelStored {
                        channel: channel.clone(),
                        payload: payload.clone(),
                        offset,
                    });
                }
                StoreMsg::CaughtUp {
                    stream,
                    epoch,
                    shared,
                    page,
                    excludes,
                } => {
                    let n = g / spn;
                    let excludes = excludes
                        .into_iter()
                        .map(|(o, c)| (o, self.local(c)))
                        .filter(|(_, (m, _))| *m == n)
                        .map(|(o, (_, c))| (o, c))
                        .collect();
                    let msg = StoreMsg::CaughtUp {
                        stream,
                        epoch,
                        shared,
                        page,
                        excludes,
                    };
                    out.push((g, msg));
                }
                mut m => {
                    match &mut m {
                        StoreMsg::Ack { reply, .. } | StoreMsg::Refused { reply, .. } => {
                            reply.conn = self.local(reply.conn).1
                        }
                        StoreMsg::Opened(o) => o.conn = self.local(o.conn).1,
                        StoreMsg::History(h) => h.conn = self.local(h.conn).1,
                        StoreMsg::ChannelOpened(o) => o.conn = self.local(o.conn).1,
                        StoreMsg::Unread { conn, .. } | StoreMsg::Page { conn, .. } => {
                            *conn = self.local(*conn).1
                        }
                        StoreMsg::Deliver { .. }
                        | StoreMsg::ChannelDeliver { .. }
                        | StoreMsg::CaughtUp { .. } => unreachable!("matched above"),
                    }
                    out.push((g, m));
                }
            }
        }
        out
    }

    /// Every node whose subscriber follows Redis channel `name` now (a stored event goes to
    /// the origin too); counts a copy lost for each that follows it with its subscriber down.
    fn stored_followers(&mut self, name: &str) -> Vec<usize> {
        let mut to = Vec::new();
        for (m, node) in self.nodes.iter().enumerate() {
            if node.interest.contains_key(name) {
                if node.subscriber_up {
                    to.push(m);
                } else {
                    self.lost += 1;
                }
            }
        }
        to
    }
}
