//! Linearizability checking: the Wing-Gong-Lowe search with state
//! memoization (as in Lowe's "Testing for linearizability" and porcupine).
//!
//! An operation whose outcome is unknown (it timed out) has no return
//! event: it may take effect at any moment after its call, or never.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash + std::fmt::Debug;
    type Input: std::fmt::Debug;
    type Output: std::fmt::Debug;

    /// The states `input` may lead to from `state` when it returned
    /// `output` (`None`: unknown). Empty when `output` is impossible there.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Vec<Self::State>;
}

/// One operation of a history; times in nanoseconds since the run began.
#[derive(Clone, Debug)]
pub struct Event<I, O> {
    pub call: u64,
    /// `None`: never returned a definite outcome.
    pub ret: Option<u64>,
    pub input: I,
    pub output: Option<O>,
    /// Index in the run's full history, for reports.
    pub id: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order fits: the operation (its `id`) whose return could not be
    /// passed on the deepest path, and how many had been ordered there.
    Violation {
        stuck_at: usize,
        ordered: usize,
    },
    /// The search ran out of time.
    Unknown,
}

const NIL: usize = usize::MAX;

struct Node {
    prev: usize,
    next: usize,
    op: usize,
    /// For a call: its return node (NIL when it has none).
    ret: usize,
    is_call: bool,
}

/// A doubly linked list of call and return events in time order; an
/// ordered operation is lifted out of it and put back when undone.
struct List {
    nodes: Vec<Node>,
}

const HEAD: usize = 0;

impl List {
    fn lift(&mut self, c: usize) {
        for n in [c, self.nodes[c].ret] {
            if n == NIL {
                continue;
            }
            let (p, x) = (self.nodes[n].prev, self.nodes[n].next);
            self.nodes[p].next = x;
            if x != NIL {
                self.nodes[x].prev = p;
            }
        }
    }

    fn unlift(&mut self, c: usize) {
        for n in [self.nodes[c].ret, c] {
            if n == NIL {
                continue;
            }
            let (p, x) = (self.nodes[n].prev, self.nodes[n].next);
            self.nodes[p].next = n;
            if x != NIL {
                self.nodes[x].prev = n;
            }
        }
    }
}

fn memo_key<S: Hash>(bits: &[u64], state: &S) -> u128 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    let mut buf = Vec::with_capacity(bits.len() * 8 + 8);
    for w in bits {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    buf.extend_from_slice(&h.finish().to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&buf)
}

/// Checks that `events` (any order) are linearizable from `init`.
pub fn check<M: Model>(
    model: &M,
    init: M::State,
    events: &[Event<M::Input, M::Output>],
    budget: Duration,
) -> Verdict {
    let start = Instant::now();
    let n = events.len();
    // (time, 0 = call / 1 = return, op): at equal times calls come first,
    // so touching operations count as concurrent.
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in events.iter().enumerate() {
        order.push((e.call, 0, i));
        if let Some(r) = e.ret {
            order.push((r.max(e.call), 1, i));
        }
    }
    order.sort_unstable();
    let mut list = List {
        nodes: vec![Node {
            prev: NIL,
            next: NIL,
            op: NIL,
            ret: NIL,
            is_call: false,
        }],
    };
    let mut call_node = vec![NIL; n];
    for &(_, kind, op) in &order {
        let idx = list.nodes.len();
        let prev = idx - 1;
        list.nodes[prev].next = idx;
        list.nodes.push(Node {
            prev,
            next: NIL,
            op,
            ret: NIL,
            is_call: kind == 0,
        });
        if kind == 0 {
            call_node[op] = idx;
        } else {
            list.nodes[call_node[op]].ret = idx;
        }
    }

    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut state = init;
    let mut seen: HashSet<u128> = HashSet::new();
    // (call node, state before it, next candidate to try)
    let mut stack: Vec<(usize, M::State, usize)> = Vec::new();
    let mut deepest = (0usize, NIL);
    let mut cur = list.nodes[HEAD].next;
    let mut steps = 0u64;

    // Tries the candidates of call node `c` from `from`; on success orders it.
    macro_rules! try_from {
        ($c:expr, $from:expr) => {{
            let c = $c;
            let op = list.nodes[c].op;
            let e = &events[op];
            let cands = model.step(&state, &e.input, e.output.as_ref());
            bits[op / 64] |= 1 << (op % 64);
            let mut took = false;
            for (k, cand) in cands.into_iter().enumerate().skip($from) {
                if seen.insert(memo_key(&bits, &cand)) {
                    let before = std::mem::replace(&mut state, cand);
                    stack.push((c, before, k + 1));
                    list.lift(c);
                    took = true;
                    break;
                }
            }
            if !took {
                bits[op / 64] &= !(1 << (op % 64));
            }
            took
        }};
    }

    while list.nodes[HEAD].next != NIL {
        steps += 1;
        if steps.is_multiple_of(4096) && start.elapsed() > budget {
            return Verdict::Unknown;
        }
        if cur != NIL && list.nodes[cur].is_call {
            if try_from!(cur, 0) {
                cur = list.nodes[HEAD].next;
            } else {
                cur = list.nodes[cur].next;
            }
            continue;
        }
        // A return event (or the end): its operation must be ordered
        // before anything later, and it is not. Undo the last choice.
        if cur != NIL && stack.len() >= deepest.0 {
            deepest = (stack.len(), list.nodes[cur].op);
        }
        let Some((c, before, next)) = stack.pop() else {
            let stuck = if deepest.1 == NIL {
                0
            } else {
                events[deepest.1].id
            };
            return Verdict::Violation {
                stuck_at: stuck,
                ordered: deepest.0,
            };
        };
        let op = list.nodes[c].op;
        bits[op / 64] &= !(1 << (op % 64));
        list.unlift(c);
        state = before;
        // Its next candidate state, or else the next event after it.
        cur = if try_from!(c, next) {
            list.nodes[HEAD].next
        } else {
            list.nodes[c].next
        };
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of one integer.
    struct Register;

    #[derive(Debug)]
    enum Op {
        Write(u64),
        Read,
    }

    impl Model for Register {
        type State = u64;
        type Input = Op;
        type Output = u64;
        fn step(&self, s: &u64, i: &Op, o: Option<&u64>) -> Vec<u64> {
            match (i, o) {
                (Op::Write(v), _) => vec![*v],
                (Op::Read, Some(v)) if v == s => vec![*s],
                (Op::Read, None) => vec![*s],
                (Op::Read, Some(_)) => vec![],
            }
        }
    }

    fn ev(
        id: usize,
        call: u64,
        ret: Option<u64>,
        input: Op,
        output: Option<u64>,
    ) -> Event<Op, u64> {
        Event {
            call,
            ret,
            input,
            output,
            id,
        }
    }

    fn run(h: &[Event<Op, u64>]) -> Verdict {
        check(&Register, 0, h, Duration::from_secs(10))
    }

    #[test]
    fn concurrent_write_and_reads_are_linearizable() {
        // w(1) overlaps both reads: one sees 0 and then one sees 1.
        let h = vec![
            ev(0, 0, Some(10), Op::Write(1), None),
            ev(1, 1, Some(3), Op::Read, Some(0)),
            ev(2, 4, Some(6), Op::Read, Some(1)),
        ];
        assert_eq!(run(&h), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_a_completed_write_is_caught() {
        // A planted violation: the write finished before the read began,
        // yet the read saw the old value.
        let h = vec![
            ev(0, 0, Some(2), Op::Write(1), None),
            ev(1, 3, Some(5), Op::Read, Some(0)),
        ];
        assert_eq!(
            run(&h),
            Verdict::Violation {
                stuck_at: 1,
                ordered: 1
            }
        );
    }

    #[test]
    fn reads_may_not_flip_back() {
        // Both reads overlap the write, but once one read has seen the new
        // value a later read cannot see the old one.
        let h = vec![
            ev(0, 0, Some(100), Op::Write(1), None),
            ev(1, 1, Some(3), Op::Read, Some(1)),
            ev(2, 4, Some(6), Op::Read, Some(0)),
        ];
        assert!(matches!(run(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn an_unfinished_write_may_or_may_not_happen() {
        let took = vec![
            ev(0, 0, None, Op::Write(7), None),
            ev(1, 5, Some(6), Op::Read, Some(7)),
        ];
        assert_eq!(run(&took), Verdict::Linearizable);
        let never = vec![
            ev(0, 0, None, Op::Write(7), None),
            ev(1, 5, Some(6), Op::Read, Some(0)),
        ];
        assert_eq!(run(&never), Verdict::Linearizable);
        // But it cannot happen before it was called.
        let early = vec![
            ev(0, 0, Some(1), Op::Read, Some(7)),
            ev(1, 5, None, Op::Write(7), None),
        ];
        assert!(matches!(run(&early), Verdict::Violation { .. }));
    }

    #[test]
    fn an_unfinished_write_may_take_effect_long_after_its_call() {
        let mut h = vec![ev(0, 0, None, Op::Write(99), None)];
        for i in 1..200u64 {
            h.push(ev(
                h.len(),
                10 * i + 1,
                Some(10 * i + 2),
                Op::Write(i),
                None,
            ));
            h.push(ev(h.len(), 10 * i + 3, Some(10 * i + 4), Op::Read, Some(i)));
        }
        h.push(ev(h.len(), 5000, Some(5001), Op::Read, Some(99)));
        assert_eq!(run(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_value_never_written_is_caught() {
        let h = vec![
            ev(0, 0, Some(2), Op::Write(1), None),
            ev(1, 1, Some(5), Op::Read, Some(9)),
        ];
        assert!(matches!(run(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn long_histories_check_quickly() {
        // 4 clients, 2,000 operations each, every read seeing the last write.
        let mut h = Vec::new();
        let mut t = 0;
        let mut last = 0;
        for i in 0..8000u64 {
            let c = i % 4;
            let input = if c == 0 { Op::Write(i) } else { Op::Read };
            let out = match input {
                Op::Write(v) => {
                    last = v;
                    None
                }
                Op::Read => Some(last),
            };
            h.push(ev(i as usize, t, Some(t + 3), input, out));
            t += 2; // each overlaps the next
        }
        assert_eq!(run(&h), Verdict::Linearizable);
    }
}
