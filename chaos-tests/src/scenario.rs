//! Scenarios: a fault schedule built from the seed before the run starts,
//! so `--seed S --scenario NAME` replays it. Targets such as "the leader"
//! are resolved when the step runs, and the report records what they
//! resolved to.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Which node a step acts on.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Who {
    /// The node leading the data files' group when the step runs.
    Leader,
    /// The k-th node (mod the node count) that does not lead it.
    Follower(u8),
    /// Node index k.
    Node(u8),
    /// Whichever node the previous step acted on.
    Last,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// Cuts a node off from every other node and every client.
    Isolate {
        who: Who,
    },
    /// Cuts a node off from the other nodes; clients still reach it.
    SplitNode {
        who: Who,
    },
    /// Cuts a node off from the other nodes, and client 0 off from every
    /// node but that one: a client on the minority side.
    ClientWithMinority {
        who: Who,
    },
    /// Cuts the other two nodes off from each other; `who` still reaches
    /// both (a bridge between the two sides).
    Bridge {
        who: Who,
    },
    /// Drops packets from `from` to `to` only.
    OneWay {
        from: Who,
        to: Who,
    },
    Kill {
        who: Who,
    },
    Start {
        who: Who,
    },
    Pause {
        who: Who,
    },
    Resume {
        who: Who,
    },
    /// SIGTERM, then a start once it has exited.
    Restart {
        who: Who,
    },
    /// Every node drops this share of the packets it receives.
    Loss {
        probability: f64,
    },
    FillDisk {
        who: Who,
    },
    FreeDisk {
        who: Who,
    },
    /// Delays every byte between `who` and the other nodes by `ms`.
    Slow {
        who: Who,
        ms: u64,
    },
    /// Removes every network fault.
    Heal,
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub at_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Part of the short set that CI runs.
    pub short: bool,
    /// A deliberately broken build: the checkers must find a violation.
    pub broken: Option<&'static str>,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "leader-isolation",
        about: "the data group's leader is cut off from nodes and clients, then healed",
        short: true,
        broken: None,
    },
    Scenario {
        name: "minority-partition",
        about: "one node is cut off from the other two (clients still reach it)",
        short: true,
        broken: None,
    },
    Scenario {
        name: "client-in-minority",
        about: "the leader and client 0 on one side, the other two nodes on the other",
        short: true,
        broken: None,
    },
    Scenario {
        name: "bridge",
        about: "the two followers cannot reach each other; the leader still reaches both",
        short: true,
        broken: None,
    },
    Scenario {
        name: "one-way",
        about: "packets from the leader to one follower are dropped, the other way passes",
        short: true,
        broken: None,
    },
    Scenario {
        name: "kill",
        about: "SIGKILL of a random node every few seconds, restarted soon after",
        short: true,
        broken: None,
    },
    Scenario {
        name: "paused-leader",
        about: "the leader is stopped with SIGSTOP, then continued",
        short: true,
        broken: None,
    },
    Scenario {
        name: "rolling-restart",
        about: "every node in turn is stopped with SIGTERM and started again",
        short: true,
        broken: None,
    },
    Scenario {
        name: "disk-full",
        about: "a node's data file system is filled to the last byte, then freed",
        short: true,
        broken: None,
    },
    Scenario {
        name: "random-loss",
        about: "every node drops 15% of the packets it receives",
        short: true,
        broken: None,
    },
    Scenario {
        name: "slow-link",
        about: "200 ms added to every byte between the leader and the other nodes",
        short: false,
        broken: None,
    },
    Scenario {
        name: "mixed",
        about: "a random mix of all the faults above, one at a time (for soak runs)",
        short: false,
        broken: None,
    },
    Scenario {
        name: "broken-stale-reads",
        about: "client-in-minority against nodes that answer reads without confirming leadership \
                (failpoint stale-reads): the checker must report a violation",
        short: true,
        broken: Some("stale-reads=return"),
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The schedule of `name` over `secs` seconds of faults.
pub fn schedule(name: &str, seed: u64, secs: u64, nodes: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    let end = secs * 1000;
    let mut steps = Vec::new();
    let mut t = 1000;
    let node = |rng: &mut StdRng| Who::Node(rng.random_range(0..nodes) as u8);
    let push = |steps: &mut Vec<Step>, at: u64, fault: Fault| steps.push(Step { at_ms: at, fault });
    match name {
        "leader-isolation" => {
            while t + 6000 <= end {
                push(&mut steps, t, Fault::Isolate { who: Who::Leader });
                push(&mut steps, t + rng.random_range(4000..6000), Fault::Heal);
                t += 9000;
            }
        }
        "minority-partition" => {
            while t + 6000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::SplitNode {
                        who: node(&mut rng),
                    },
                );
                push(&mut steps, t + rng.random_range(4000..6000), Fault::Heal);
                t += 9000;
            }
        }
        "client-in-minority" | "broken-stale-reads" => {
            while t + 7000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::ClientWithMinority { who: Who::Leader },
                );
                push(&mut steps, t + rng.random_range(6000..7000), Fault::Heal);
                t += 10000;
            }
        }
        "bridge" => {
            while t + 6000 <= end {
                let who = if rng.random_bool(0.5) {
                    Who::Leader
                } else {
                    node(&mut rng)
                };
                push(&mut steps, t, Fault::Bridge { who });
                push(&mut steps, t + rng.random_range(4000..6000), Fault::Heal);
                t += 9000;
            }
        }
        "one-way" => {
            while t + 6000 <= end {
                let to = Who::Follower(rng.random_range(0..2));
                push(
                    &mut steps,
                    t,
                    Fault::OneWay {
                        from: Who::Leader,
                        to,
                    },
                );
                push(&mut steps, t + rng.random_range(4000..6000), Fault::Heal);
                t += 9000;
            }
        }
        "kill" => {
            while t + 3000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::Kill {
                        who: node(&mut rng),
                    },
                );
                push(
                    &mut steps,
                    t + rng.random_range(1500..3000),
                    Fault::Start { who: Who::Last },
                );
                t += rng.random_range(4000..6000);
            }
        }
        "paused-leader" => {
            while t + 7000 <= end {
                push(&mut steps, t, Fault::Pause { who: Who::Leader });
                push(
                    &mut steps,
                    t + rng.random_range(4000..7000),
                    Fault::Resume { who: Who::Last },
                );
                t += 10000;
            }
        }
        "rolling-restart" => {
            let mut k = 0;
            while t + 4000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::Restart {
                        who: Who::Node((k % nodes) as u8),
                    },
                );
                k += 1;
                t += 6000;
            }
        }
        "disk-full" => {
            while t + 8000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::FillDisk {
                        who: node(&mut rng),
                    },
                );
                push(
                    &mut steps,
                    t + rng.random_range(6000..8000),
                    Fault::FreeDisk { who: Who::Last },
                );
                t += 11000;
            }
        }
        "random-loss" => {
            push(&mut steps, t, Fault::Loss { probability: 0.15 });
            push(
                &mut steps,
                end.saturating_sub(1000).max(t + 1000),
                Fault::Heal,
            );
        }
        "slow-link" => {
            while t + 8000 <= end {
                push(
                    &mut steps,
                    t,
                    Fault::Slow {
                        who: Who::Leader,
                        ms: 200,
                    },
                );
                push(&mut steps, t + rng.random_range(6000..8000), Fault::Heal);
                t += 11000;
            }
        }
        _ => {
            // mixed: one fault at a time, each healed before the next.
            while t + 8000 <= end {
                let who = if rng.random_bool(0.5) {
                    Who::Leader
                } else {
                    node(&mut rng)
                };
                let hold = rng.random_range(3000..7000);
                let (on, off) = match rng.random_range(0..10) {
                    0 => (Fault::Isolate { who }, Fault::Heal),
                    1 => (Fault::SplitNode { who }, Fault::Heal),
                    2 => (Fault::ClientWithMinority { who }, Fault::Heal),
                    3 => (
                        Fault::OneWay {
                            from: who,
                            to: Who::Follower(rng.random_range(0..2)),
                        },
                        Fault::Heal,
                    ),
                    4 => (Fault::Kill { who }, Fault::Start { who: Who::Last }),
                    5 => (Fault::Pause { who }, Fault::Resume { who: Who::Last }),
                    6 => (Fault::FillDisk { who }, Fault::FreeDisk { who: Who::Last }),
                    7 => (Fault::Loss { probability: 0.1 }, Fault::Heal),
                    8 => (Fault::Bridge { who }, Fault::Heal),
                    _ => (Fault::Slow { who, ms: 100 }, Fault::Heal),
                };
                push(&mut steps, t, on);
                push(&mut steps, t + hold, off);
                t += hold + rng.random_range(1000..3000);
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_replay_from_their_seed() {
        for s in SCENARIOS {
            let a = schedule(s.name, 42, 60, 3);
            let b = schedule(s.name, 42, 60, 3);
            assert!(!a.is_empty(), "{} has no steps", s.name);
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap(),
                "{}",
                s.name
            );
            assert!(
                a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
                "{} out of order",
                s.name
            );
            assert!(
                a.iter().all(|st| st.at_ms <= 60_000),
                "{} runs past its time",
                s.name
            );
        }
        let other = schedule("mixed", 43, 60, 3);
        assert_ne!(
            serde_json::to_string(&schedule("mixed", 42, 60, 3)).unwrap(),
            serde_json::to_string(&other).unwrap()
        );
    }
}
