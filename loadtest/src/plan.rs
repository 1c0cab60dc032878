//! The plan of one agent: which users and sessions it runs, which conversations
//! they form and who sends in them.
//!
//! Users are numbered globally (`load-u<n>`). In a distributed run of `n` agents,
//! agent `i` gets a contiguous, disjoint range of users and its share of every kind
//! of conversation, and forms those conversations only from its own users, so no
//! agent ever needs another agent's deliveries to check its own.

use crate::scenario::{ConversationKind, Scenario};

/// One connection: a device of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// Global user number.
    pub user: usize,
    pub device: usize,
    /// Index into the scenario's target URLs.
    pub url: usize,
    /// Index into the scenario's source addresses, if it names any.
    pub source: Option<usize>,
    /// Conversations (indices into [`Plan::conversations`]) this session receives.
    pub conversations: Vec<usize>,
}

/// One conversation to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSpec {
    pub kind: ConversationKind,
    /// Index of its entry in the scenario's conversation mix.
    pub class: usize,
    /// Global user numbers; the first creates the conversation.
    pub members: Vec<usize>,
}

/// A sender: one member of one conversation, sending from one of its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderSlot {
    /// Index into [`Plan::sessions`].
    pub session: usize,
    pub conversation: usize,
}

/// Senders sharing one part of the rate.
#[derive(Debug, Clone, PartialEq)]
pub struct SendClass {
    /// Messages per second this agent offers for the class.
    pub rate: f64,
    pub slots: Vec<SenderSlot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub agent_index: usize,
    pub agent_count: usize,
    /// Global number of this agent's first user.
    pub first_user: usize,
    /// This agent's users.
    pub users: usize,
    pub devices: usize,
    /// Session `u * devices + d` is device `d` of the agent's `u`th user.
    pub sessions: Vec<SessionSpec>,
    pub conversations: Vec<ConversationSpec>,
    pub classes: Vec<SendClass>,
}

/// The target URL and source address (indices) of session number `session`, with
/// `urls` target URLs and `sources` source addresses. URLs take turns first, then
/// the source advances once per round of URLs, so that every (source, URL) pair
/// carries the same number of sessions even when the two counts share a factor:
/// the connections from one source address to one gateway address are what one
/// port range bounds.
pub fn endpoints(session: usize, urls: usize, sources: usize) -> (usize, Option<usize>) {
    let urls = urls.max(1);
    let source = (sources > 0).then(|| (session / urls) % sources);
    (session % urls, source)
}

/// `total` split over `parts`: part `index`'s share (the first ones take the rest).
pub fn share_of(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

impl Plan {
    pub fn new(
        scenario: &Scenario,
        agent_index: usize,
        agent_count: usize,
    ) -> anyhow::Result<Plan> {
        anyhow::ensure!(agent_count >= 1, "--agent-count must be at least 1");
        anyhow::ensure!(
            agent_index < agent_count,
            "--agent-index {agent_index} is not below --agent-count {agent_count}"
        );
        let total_users = scenario.users.count;
        let first_user: usize = (0..agent_index)
            .map(|i| share_of(total_users, agent_count, i))
            .sum();
        let users = share_of(total_users, agent_count, agent_index);
        let devices = scenario.users.devices;
        let urls = scenario.target.urls.len();
        let sources = scenario.target.source_addrs.len();

        let mut conversations = Vec::new();
        let mut next_user = 0;
        for (class, mix) in scenario.conversations.iter().enumerate() {
            let count = share_of(mix.count, agent_count, agent_index);
            let size = mix.members();
            for _ in 0..count {
                anyhow::ensure!(
                    next_user + size <= users,
                    "agent {agent_index} has {users} users, too few for its share of the \
                     conversations (raise users.count or lower the agent count)"
                );
                conversations.push(ConversationSpec {
                    kind: mix.kind,
                    class,
                    members: (first_user + next_user..first_user + next_user + size).collect(),
                });
                next_user += size;
            }
        }

        let mut sessions: Vec<SessionSpec> = (0..users * devices)
            .map(|s| {
                let (url, source) = endpoints(s, urls, sources);
                SessionSpec {
                    user: first_user + s / devices,
                    device: s % devices,
                    url,
                    source,
                    conversations: Vec::new(),
                }
            })
            .collect();
        let session_of = |user: usize, device: usize| (user - first_user) * devices + device;
        for (index, conversation) in conversations.iter().enumerate() {
            for &user in &conversation.members {
                for device in 0..devices {
                    sessions[session_of(user, device)].conversations.push(index);
                }
            }
        }

        // Every member sends; a member's devices take turns by conversation. Slots
        // are ordered member by member across the class's conversations, so that
        // consecutive sends of the schedule go to different conversations.
        let total_share: f64 = scenario
            .conversations
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| c.share)
            .sum();
        let mut classes = Vec::new();
        for (class, mix) in scenario.conversations.iter().enumerate() {
            let mut slots = Vec::new();
            for m in 0..mix.members() {
                for (index, conversation) in conversations.iter().enumerate() {
                    if conversation.class == class {
                        slots.push(SenderSlot {
                            session: session_of(conversation.members[m], (index + m) % devices),
                            conversation: index,
                        });
                    }
                }
            }
            let mine = share_of(mix.count, agent_count, agent_index);
            let rate = if total_share > 0.0 && mix.count > 0 {
                scenario.load.rate * mix.share / total_share * mine as f64 / mix.count as f64
            } else {
                0.0
            };
            classes.push(SendClass { rate, slots });
        }

        Ok(Plan {
            agent_index,
            agent_count,
            first_user,
            users,
            devices,
            sessions,
            conversations,
            classes,
        })
    }

    /// Sessions of the members of a conversation.
    pub fn member_sessions(&self, conversation: usize) -> impl Iterator<Item = usize> + '_ {
        let devices = self.devices;
        let first = self.first_user;
        self.conversations[conversation]
            .members
            .iter()
            .flat_map(move |&user| (0..devices).map(move |d| (user - first) * devices + d))
    }

    /// Messages per second this agent offers in all.
    pub fn rate(&self) -> f64 {
        // `+ 0.0`: an empty f64 sum is -0.0.
        self.classes.iter().map(|c| c.rate).sum::<f64>() + 0.0
    }

    /// The highest send rate of one user (every user is in at most one
    /// conversation; the server limits sends per user).
    pub fn max_rate_per_user(&self) -> f64 {
        self.classes
            .iter()
            .filter(|c| !c.slots.is_empty())
            .map(|c| c.rate / c.slots.len() as f64)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::parse(
            r#"
            name = "t"
            [users]
            count = 25
            devices = 2
            [[conversations]]
            kind = "direct"
            count = 3
            [[conversations]]
            kind = "group"
            count = 2
            size = 4
            share = 3
            [load]
            rate = 80
            "#,
        )
        .expect("valid")
    }

    #[test]
    fn sessions_spread_round_robin_over_urls_and_sources() {
        let mut s = scenario();
        s.target.urls = vec!["ws://a/v1/connect".into(), "ws://b/v1/connect".into()];
        s.target.source_addrs = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        let plan = Plan::new(&s, 0, 1).expect("plan");
        let pairs: Vec<(usize, Option<usize>)> =
            plan.sessions.iter().map(|s| (s.url, s.source)).collect();
        assert_eq!(
            pairs[..9],
            [
                (0, Some(0)),
                (1, Some(0)),
                (0, Some(1)),
                (1, Some(1)),
                (0, Some(2)),
                (1, Some(2)),
                (0, Some(3)),
                (1, Some(3)),
                (0, Some(0)),
            ]
        );
        // 50 sessions over 8 (url, source) pairs: each pair gets 6 or 7.
        let mut counts = std::collections::BTreeMap::new();
        for pair in &pairs {
            *counts.entry(*pair).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 8);
        assert!(counts.values().all(|&n| n == 6 || n == 7), "{counts:?}");

        // Without source addresses the system picks: no source index.
        let plan = Plan::new(&scenario(), 0, 1).expect("plan");
        assert!(plan.sessions.iter().all(|s| s.source.is_none()));
        assert_eq!(endpoints(5, 0, 3), (0, Some(2)));
    }

    #[test]
    fn one_agent_gets_everything() {
        let plan = Plan::new(&scenario(), 0, 1).expect("plan");
        assert_eq!((plan.first_user, plan.users), (0, 25));
        assert_eq!(plan.sessions.len(), 50);
        assert_eq!(plan.conversations.len(), 5);
        assert_eq!(plan.conversations[0].members, [0, 1]);
        assert_eq!(plan.conversations[3].members, [6, 7, 8, 9]);
        // Shares 1 : 3 of 80 msg/s.
        assert!((plan.classes[0].rate - 20.0).abs() < 1e-9);
        assert!((plan.classes[1].rate - 60.0).abs() < 1e-9);
        assert_eq!(plan.classes[0].slots.len(), 6);
        assert_eq!(plan.classes[1].slots.len(), 8);
        // Consecutive sends go to different conversations.
        let order: Vec<usize> = plan.classes[1]
            .slots
            .iter()
            .map(|s| s.conversation)
            .collect();
        assert_eq!(order, [3, 4, 3, 4, 3, 4, 3, 4]);
        // Both devices of both members of the first pair receive it.
        assert_eq!(plan.member_sessions(0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(plan.sessions[3].conversations, [0]);
        // Users beyond the conversations stay idle.
        assert!(plan.sessions[49].conversations.is_empty());
    }

    #[test]
    fn agents_get_disjoint_ranges_and_form_conversations_inside_them() {
        let s = scenario();
        let plans: Vec<Plan> = (0..2).map(|i| Plan::new(&s, i, 2).expect("plan")).collect();
        assert_eq!((plans[0].first_user, plans[0].users), (0, 13));
        assert_eq!((plans[1].first_user, plans[1].users), (13, 12));
        for plan in &plans {
            let range = plan.first_user..plan.first_user + plan.users;
            for c in &plan.conversations {
                assert!(c.members.iter().all(|u| range.contains(u)), "{c:?}");
            }
        }
        // 3 direct conversations split 2 + 1, 2 groups 1 + 1; rates follow.
        assert_eq!(plans[0].conversations.len(), 3);
        assert_eq!(plans[1].conversations.len(), 2);
        let total: f64 = plans.iter().map(Plan::rate).sum();
        assert!((total - 80.0).abs() < 1e-9);
    }

    #[test]
    fn too_many_agents_for_the_conversations_is_an_error() {
        let mut s = scenario();
        s.users.count = 14;
        assert!(Plan::new(&s, 0, 1).is_ok());
        // Agent 0 of two gets 7 users but needs 4 + 4.
        assert!(Plan::new(&s, 0, 2).is_err());
        assert!(Plan::new(&s, 2, 2).is_err());
    }
}
