//! The event-kept socket table (`collect::events`): what a loop's later sample makes of the
//! kernel's state changes and its answers to lookups, with the lookups played by a map.
use std::collections::BTreeMap;

use shimcheck::aggregate::KeptGroups;
use shimcheck::bpf::events::StateChange;
use shimcheck::collect::CollectError;
use shimcheck::collect::events::{Drain, Edits, Pending, Redump, Table, follows};
use shimcheck::collect::netlink::Exact;
use shimcheck::join::Topology;
use shimcheck::model::{Sample, ScanStats, Socket, StateSet, TcpState};

use crate::support::builders::{SocketWith, sock};

fn states(list: &[TcpState]) -> StateSet {
    list.iter().copied().collect()
}

fn shown() -> StateSet {
    states(&[TcpState::Listen, TcpState::Established, TcpState::CloseWait])
}

fn change(cookie: u64, old: TcpState, new: TcpState, local: &str, remote: &str) -> StateChange {
    StateChange {
        cookie,
        netns: 1,
        family: 2,
        old: old.kernel_number(),
        new: new.kernel_number(),
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        bound_dev_if: 0,
    }
}

/// The kernel as the lookups see it: sockets by cookie, and every lookup asked.
#[derive(Default)]
struct Kernel {
    now: BTreeMap<u64, Socket>,
    asked: Vec<Exact>,
}

impl Kernel {
    fn lookup(&mut self, e: &Exact) -> Result<Option<Socket>, CollectError> {
        self.asked.push(*e);
        Ok(self
            .now
            .get(&e.cookie)
            .filter(|s| s.local() == e.local && s.remote() == e.remote)
            .cloned())
    }
}

fn apply(table: &mut Table, pending: &Pending, kernel: &mut Kernel) -> Result<usize, Redump> {
    table.apply(pending, &mut |e| kernel.lookup(e)).unwrap()
}

fn cookies(table: &Table) -> Vec<(u64, TcpState, u64)> {
    let mut v: Vec<_> = table
        .sockets()
        .iter()
        .map(|s| (s.cookie().unwrap(), s.state, s.inode))
        .collect();
    v.sort_unstable();
    v
}

const SERVER: &str = "127.0.0.1:5000";

/// The changes of client sockets (`moved`), in the order made.
fn changes(list: &[(u64, TcpState, TcpState)]) -> Pending {
    let mut p = Pending::default();
    for &(cookie, old, new) in list {
        p.add(moved(cookie, old, new));
    }
    p
}

/// A change of the client socket `cookie`, on local port 40000 + `cookie`, to the server.
fn moved(cookie: u64, old: TcpState, new: TcpState) -> StateChange {
    let local = format!("127.0.0.1:{}", 40000 + cookie);
    change(cookie, old, new, &local, SERVER)
}

/// A listener opening on 0.0.0.0:6000 in its own namespace's changes.
fn listener_opens(cookie: u64) -> Pending {
    let mut p = Pending::default();
    p.add(change(
        cookie,
        TcpState::Close,
        TcpState::Listen,
        "0.0.0.0:6000",
        "0.0.0.0:0",
    ));
    p
}

/// A drain holding one change, in namespace `netns`.
fn drained(netns: u32, c: StateChange) -> Drain {
    let mut d = Drain::default();
    d.by_netns.entry(netns).or_default().add(c);
    d
}

fn est(cookie: u64, port: u16, inode: u64) -> Socket {
    sock(
        TcpState::Established,
        &format!("127.0.0.1:{port}"),
        SERVER,
        inode,
    )
    .cookie(cookie)
}

#[test]
fn new_sockets_are_looked_up_and_closed_ones_dropped_without_a_lookup() {
    let mut table = Table::new(vec![est(1, 40001, 11), est(2, 40002, 12)], shown()).unwrap();
    let mut kernel = Kernel::default();
    kernel.now.insert(3, est(3, 40003, 13));
    let pending = changes(&[
        (3, TcpState::SynSent, TcpState::Established),
        (1, TcpState::Established, TcpState::FinWait1),
    ]);
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(1));
    assert_eq!(
        cookies(&table),
        vec![
            (2, TcpState::Established, 12),
            (3, TcpState::Established, 13)
        ]
    );
    assert_eq!(kernel.asked.len(), 1, "FIN_WAIT1 is not shown: no lookup");
    assert_eq!(kernel.asked[0].cookie, 3);
}

#[test]
fn the_latest_change_of_a_socket_wins_and_the_kernel_has_the_last_word() {
    let mut table = Table::new(vec![est(1, 40001, 11)], shown()).unwrap();
    let mut kernel = Kernel::default();
    // Gone to CLOSE_WAIT, then (before the lookup) to LAST_ACK: the kernel says so.
    let mut later = est(1, 40001, 11);
    later.state = TcpState::LastAck;
    kernel.now.insert(1, later);
    let pending = changes(&[(1, TcpState::Established, TcpState::CloseWait)]);
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(1));
    assert!(table.sockets().is_empty(), "LAST_ACK is not shown");

    // Opened and closed between two samples: its last change says closed, nothing to ask.
    let pending = changes(&[
        (9, TcpState::SynSent, TcpState::Established),
        (9, TcpState::Established, TcpState::Close),
    ]);
    kernel.asked.clear();
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(0));
    assert!(table.sockets().is_empty());
    assert!(kernel.asked.is_empty());
}

#[test]
fn a_socket_the_kernel_no_longer_has_or_has_under_another_cookie_is_dropped() {
    let mut table = Table::new(vec![est(1, 40001, 11), est(2, 40002, 12)], shown()).unwrap();
    let mut kernel = Kernel::default();
    // Same 4-tuple, another socket (the port was reused): not the one that changed.
    kernel.now.insert(1, est(7, 40001, 17));
    let pending = changes(&[
        (1, TcpState::Established, TcpState::CloseWait),
        (2, TcpState::Established, TcpState::CloseWait),
    ]);
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(2));
    assert!(table.sockets().is_empty(), "{:?}", cookies(&table));
}

#[test]
fn removing_from_the_middle_keeps_every_other_socket_findable() {
    let all: Vec<Socket> = (1..=5).map(|c| est(c, 40000 + c as u16, 10 + c)).collect();
    let mut table = Table::new(all, shown()).unwrap();
    let mut kernel = Kernel::default();
    let pending = changes(&[(2, TcpState::Established, TcpState::Close)]);
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(0));
    // The socket moved into the hole (5) is updated in place, not added twice.
    let mut five = est(5, 40005, 15);
    five.state = TcpState::CloseWait;
    kernel.now.insert(5, five);
    let pending = changes(&[(5, TcpState::Established, TcpState::CloseWait)]);
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(1));
    assert_eq!(
        cookies(&table),
        vec![
            (1, TcpState::Established, 11),
            (3, TcpState::Established, 13),
            (4, TcpState::Established, 14),
            (5, TcpState::CloseWait, 15)
        ]
    );
}

#[test]
fn a_socket_waiting_to_be_accepted_is_asked_about_until_it_has_an_inode() {
    let mut table = Table::new(vec![est(1, 40001, 0), est(2, 40002, 12)], shown()).unwrap();
    let mut kernel = Kernel::default();
    let pending = Pending::default();
    assert_eq!(
        apply(&mut table, &pending, &mut kernel),
        Ok(1),
        "still waiting"
    );
    assert_eq!(cookies(&table)[0], (1, TcpState::Established, 0));
    kernel.now.insert(1, est(1, 40001, 21));
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(1));
    assert_eq!(cookies(&table)[0], (1, TcpState::Established, 21));
    kernel.asked.clear();
    assert_eq!(
        apply(&mut table, &pending, &mut kernel),
        Ok(0),
        "accepted: no more lookups"
    );
    // An orphan (closed by its application, so no inode) in a shown state is not waiting.
    let orphan = sock(TcpState::LastAck, "127.0.0.1:40003", SERVER, 0).cookie(3);
    let mut table = Table::new(vec![orphan], states(&[TcpState::LastAck])).unwrap();
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(0));
}

#[test]
fn listeners_and_sockets_without_a_port_need_a_dump() {
    let mut table = Table::new(vec![est(1, 40001, 11)], shown()).unwrap();
    let mut kernel = Kernel::default();
    let mut pending = Pending::default();
    pending.add(change(
        5,
        TcpState::Close,
        TcpState::Listen,
        "0.0.0.0:6000",
        "0.0.0.0:0",
    ));
    assert_eq!(
        apply(&mut table, &pending, &mut kernel),
        Err(Redump::Listener)
    );
    let mut pending = Pending::default();
    pending.add(change(
        6,
        TcpState::Close,
        TcpState::Established,
        "127.0.0.1:0",
        SERVER,
    ));
    assert_eq!(
        apply(&mut table, &pending, &mut kernel),
        Err(Redump::NoPort)
    );
    // An accepted child leaves no trace of its listener (SYN_RECV is filtered in the kernel).
    let mut pending = Pending::default();
    pending.add(change(
        7,
        TcpState::SynRecv,
        TcpState::Established,
        SERVER,
        "127.0.0.1:40007",
    ));
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(1));
}

#[test]
fn only_states_every_way_into_and_out_of_which_is_an_event_are_followed() {
    assert!(follows(shown()));
    assert!(follows(states(&[
        TcpState::FinWait1,
        TcpState::LastAck,
        TcpState::Closing
    ])));
    for lives_on in [
        TcpState::TimeWait,
        TcpState::FinWait2,
        TcpState::SynRecv,
        TcpState::SynSent,
    ] {
        assert!(
            !follows(states(&[TcpState::Established, lives_on])),
            "{lives_on}"
        );
    }
    assert!(!follows(StateSet::all()));
}

#[test]
fn a_dump_with_a_socket_without_a_stable_cookie_makes_no_table() {
    let uncookied = sock(TcpState::Established, "127.0.0.1:40001", SERVER, 11).cookie(None);
    assert!(Table::new(vec![est(1, 40002, 12), uncookied], shown()).is_err());
}

#[test]
fn more_changes_than_a_dump_costs_are_not_looked_up_one_by_one() {
    use shimcheck::collect::events::Kept;
    use std::time::Instant;
    let now = Instant::now();
    let table: Vec<Socket> = (1..=600)
        .map(|c| est(c, (c % 60000) as u16 + 1, c))
        .collect();
    // Changes that need no lookup (into a state not shown): without a sock_diag socket, the
    // update succeeds as long as it does not decide to dump instead.
    let closing = |n: u64| {
        let mut p = Pending::default();
        for c in 1..=n {
            let local = format!("127.0.0.1:{}", (c % 60000) as u16 + 1);
            p.add(change(
                c,
                TcpState::Established,
                TcpState::FinWait1,
                &local,
                SERVER,
            ));
        }
        p
    };
    for (changes, updated) in [(256, true), (257, false)] {
        let mut kept = Kept::default();
        kept.dumped(table.clone(), shown(), now);
        let got = kept.update(None, shown(), &closing(changes), false, now);
        assert_eq!(got.is_ok(), updated, "{changes} changes of 600 sockets");
        if updated {
            assert_eq!(got.unwrap().len(), 600 - changes as usize);
        }
    }
    // A bigger table takes a third of its size in lookups.
    let big: Vec<Socket> = (1..=3000)
        .map(|c| est(c, (c % 60000) as u16 + 1, c))
        .collect();
    for (changes, updated) in [(1000, true), (1001, false)] {
        let mut kept = Kept::default();
        kept.dumped(big.clone(), shown(), now);
        let got = kept.update(None, shown(), &closing(changes), false, now);
        assert_eq!(got.is_ok(), updated, "{changes} changes of 3,000 sockets");
    }
}

#[test]
fn samples_answered_from_the_table_count_toward_a_resync_as_updates_do() {
    use shimcheck::collect::counters::{RESYNC_AFTER, RESYNC_EVERY};
    use shimcheck::collect::events::Kept;
    use std::time::Instant;
    let at = Instant::now();
    let later = at + RESYNC_AFTER;
    let mut kept = Kept::default();
    kept.dumped(vec![est(1, 40001, 11)], shown(), at);
    for _ in 0..RESYNC_EVERY - 2 {
        kept.looked();
    }
    assert!(kept.quiet(shown(), later), "one sample short of a resync");
    kept.looked();
    assert!(
        kept.quiet(shown(), at),
        "enough samples, but not a minute yet"
    );
    assert!(!kept.quiet(shown(), later), "both: a resync is due");
    // A table of other states, or none at all, never holds.
    assert!(!kept.quiet(StateSet::all(), at));
    assert!(!Kept::default().quiet(shown(), at));
}

#[test]
fn a_lending_table_is_updated_only_once_its_sockets_are_back() {
    use shimcheck::collect::events::Kept;
    use std::time::Instant;
    let now = Instant::now();
    let closed = changes(&[(1, TcpState::Established, TcpState::Close)]);
    let lent =
        |kept: &mut Kept| kept.dumped(vec![est(1, 40001, 11), est(2, 40002, 12)], shown(), now);
    // Given back as lent (the sample may have tagged them or read their clocks again): the
    // next update needs no dump, so it works without a sock_diag socket.
    let mut kept = Kept::lending();
    let mut sockets = lent(&mut kept);
    sockets.iter_mut().for_each(|s| s.netns = 7);
    kept.give_back(sockets);
    let next = kept.update(None, shown(), &closed, false, now).unwrap();
    assert_eq!(next.len(), 1);
    // Not given back, or something else given back: the next update must dump.
    let mut kept = Kept::lending();
    let _ = lent(&mut kept);
    assert!(kept.update(None, shown(), &closed, false, now).is_err());
    let mut kept = Kept::lending();
    let mut sockets = lent(&mut kept);
    sockets.reverse();
    kept.give_back(sockets);
    assert!(kept.update(None, shown(), &closed, false, now).is_err());
    // A table that does not lend gives copies, and needs nothing back.
    let mut kept = Kept::default();
    let _ = lent(&mut kept);
    assert!(kept.update(None, shown(), &closed, false, now).is_ok());
}

#[test]
fn sockets_waiting_to_be_accepted_are_asked_about_a_bounded_number_at_a_time_in_turn() {
    use shimcheck::collect::events::WAITING_LOOKUPS;
    let n = WAITING_LOOKUPS as u64 + 44;
    let all: Vec<Socket> = (1..=n).map(|c| est(c, 20000 + c as u16, 0)).collect();
    let mut table = Table::new(all, shown()).unwrap();
    let mut kernel = Kernel::default();
    let nothing = Pending::default();
    assert_eq!(
        apply(&mut table, &nothing, &mut kernel),
        Ok(WAITING_LOOKUPS)
    );
    assert_eq!(
        apply(&mut table, &nothing, &mut kernel),
        Ok(WAITING_LOOKUPS)
    );
    // The first sample asked about the lowest cookies, the second went on from there and
    // round again: every socket asked about within two samples.
    let asked: std::collections::BTreeSet<u64> = kernel.asked.iter().map(|e| e.cookie).collect();
    assert_eq!(asked.len() as u64, n);
    let first: Vec<u64> = kernel.asked[..WAITING_LOOKUPS]
        .iter()
        .map(|e| e.cookie)
        .collect();
    assert_eq!(first, (1..=WAITING_LOOKUPS as u64).collect::<Vec<_>>());
    assert_eq!(
        kernel.asked[WAITING_LOOKUPS].cookie,
        WAITING_LOOKUPS as u64 + 1
    );
}

#[test]
fn a_namespace_is_answered_without_asking_the_kernel_only_when_nothing_changed_in_it() {
    use shimcheck::collect::events::Kept;
    use std::time::Instant;
    let now = Instant::now();
    let mut kept = Kept::default();
    kept.dumped(vec![est(1, 40001, 11), est(2, 40002, 12)], shown(), now);
    let changed = changes(&[(1, TcpState::Established, TcpState::Close)]);
    assert!(Pending::default().is_empty() && !changed.is_empty());
    assert!(kept.quietly(shown(), Some(&changed), false, now).is_none());
    assert!(
        kept.quietly(shown(), None, true, now).is_none(),
        "changes were lost"
    );
    let quiet = kept.quietly(shown(), Some(&Pending::default()), false, now);
    assert_eq!(quiet.map(|s| s.len()), Some(2));
    assert_eq!(
        kept.quietly(shown(), None, false, now).map(|s| s.len()),
        Some(2)
    );
    assert_eq!(kept.last_lookups(), Some(0));
    // A listener's change alone is a change.
    let listener = listener_opens(9);
    assert!(!listener.is_empty());
    assert!(kept.quietly(shown(), Some(&listener), false, now).is_none());
}

#[test]
fn the_changes_of_two_drains_merge_the_later_winning_and_any_loss_or_listener_kept() {
    let mut earlier = drained(1, moved(1, TcpState::SynSent, TcpState::Established));
    let mut later = drained(1, moved(1, TcpState::Established, TcpState::Close));
    later.lost = true;
    later.by_netns.insert(2, listener_opens(9));
    assert!(earlier.moved() && !earlier.lost);
    earlier.merge(later);
    assert!(earlier.lost && earlier.moved());
    // The socket's latest change is the later drain's: closed, so no lookup and no socket.
    let mut table = Table::new(vec![est(1, 40001, 11)], shown()).unwrap();
    let mut kernel = Kernel::default();
    assert_eq!(apply(&mut table, &earlier.by_netns[&1], &mut kernel), Ok(0));
    assert!(table.sockets().is_empty());
    // Namespace 2's listener survives the merge into an empty slot, and one merged into an
    // existing slot too.
    assert_eq!(
        apply(&mut table, &earlier.by_netns[&2], &mut kernel),
        Err(Redump::Listener)
    );
    let mut again = drained(2, moved(5, TcpState::SynSent, TcpState::Established));
    let mut with_listener = Drain::default();
    with_listener
        .by_netns
        .insert(2, earlier.by_netns.remove(&2).unwrap());
    again.merge(with_listener);
    assert_eq!(
        apply(&mut table, &again.by_netns[&2], &mut kernel),
        Err(Redump::Listener)
    );
    assert!(!Drain::default().moved());
}

#[test]
fn unchanged_sockets_have_their_clocks_moved_on_by_the_time_since_the_last_sample() {
    use shimcheck::collect::events::Kept;
    use std::time::{Duration, Instant};
    let at = Instant::now();
    let mut kept = Kept::default();
    let _ = kept.dumped(vec![est(1, 40001, 11).idle(1000)], shown(), at);
    let next = kept
        .update(
            None,
            shown(),
            &Pending::default(),
            false,
            at + Duration::from_millis(500),
        )
        .unwrap();
    let info = next[0].tcp_info.unwrap();
    assert_eq!(info.data_idle_ms(), 1500);
}

/// One connection on loopback in namespace `netns`, both ends: the client's cookie is `2c`,
/// the server end's `2c + 1`, with no inode until accepted. Client ports repeat every 64
/// connections, so a tuple can be held twice while its first connection lingers in
/// CLOSE_WAIT. Its ends have carried no data for up to 100 s as the kernel says, the ends of
/// every 17th connection have no clocks (no tcp_info).
fn connection(netns: u64, c: u64, accepted: bool) -> [Socket; 2] {
    let client = format!("127.0.0.1:{}", 40000 + c % 64);
    let server_inode = if accepted { 100_000 + 2 * c + 1 } else { 0 };
    [
        sock(TcpState::Established, &client, SERVER, 100_000 + 2 * c).cookie(2 * c),
        sock(TcpState::Established, SERVER, &client, server_inode).cookie(2 * c + 1),
    ]
    .map(|s| {
        let s = s.netns(netns);
        match Socket::cookie(&s) {
            Some(k) if !c.is_multiple_of(17) => s.idle((k * 7919 % 100_000) as u32),
            _ => s,
        }
    })
}

/// One namespace's table, the kernel its lookups ask, and the connections open there.
struct Namespace {
    netns: u64,
    kernel: Kernel,
    table: Table,
    live: Vec<u64>,
    next: u64,
}

impl Namespace {
    /// A listener on :5000 and `n` accepted connections; cookies from `first` up.
    fn new(netns: u64, first: u64, n: u64) -> Namespace {
        let mut kernel = Kernel::default();
        let listener = sock(TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", first).cookie(first);
        kernel.now.insert(first, listener.netns(netns));
        let live: Vec<u64> = (first + 1..=first + n).collect();
        for &c in &live {
            for s in connection(netns, c, true) {
                kernel.now.insert(Socket::cookie(&s).unwrap(), s);
            }
        }
        let table = Table::new(kernel.now.values().cloned().collect(), shown()).unwrap();
        Namespace {
            netns,
            kernel,
            table,
            live,
            next: first + n + 1,
        }
    }

    /// Some connections close (both ends), some open (their server ends waiting to be
    /// accepted), one goes half-closed, and the waiting ones may be accepted meanwhile; the
    /// table is then brought up to date.
    fn churn(&mut self, roll: &mut impl FnMut(u64) -> u64) {
        // Seconds pass: the sockets that did not change carry no data meanwhile.
        self.table.age(roll(20_000) as u32);
        let mut pending = Pending::default();
        let add = |p: &mut Pending, s: &Socket, from: TcpState, to: TcpState| {
            let (local, remote) = (s.local().to_string(), s.remote().to_string());
            p.add(change(
                Socket::cookie(s).unwrap(),
                from,
                to,
                &local,
                &remote,
            ));
        };
        for _ in 0..roll(4).min(self.live.len() as u64) {
            let c = self.live.swap_remove(roll(self.live.len() as u64) as usize);
            for s in connection(self.netns, c, true) {
                self.kernel.now.remove(&Socket::cookie(&s).unwrap());
                add(&mut pending, &s, s.state, TcpState::Close);
            }
        }
        for _ in 0..roll(5) {
            let [client, server] = connection(self.netns, self.next, false);
            for (s, from) in [(client, TcpState::SynSent), (server, TcpState::SynRecv)] {
                add(&mut pending, &s, from, TcpState::Established);
                self.kernel.now.insert(Socket::cookie(&s).unwrap(), s);
            }
            self.live.push(self.next);
            self.next += 1;
        }
        if let Some(&c) = self.live.get(roll(self.live.len() as u64 + 1) as usize) {
            let [_, mut server] = connection(self.netns, c, true);
            server.state = TcpState::CloseWait;
            add(
                &mut pending,
                &server,
                TcpState::Established,
                TcpState::CloseWait,
            );
            self.kernel.now.insert(2 * c + 1, server);
        }
        for s in self.kernel.now.values_mut() {
            if s.inode == 0 && Socket::cookie(s).is_some_and(|c| c % 3 != 0) {
                s.inode = 100_000 + Socket::cookie(s).unwrap_or(0);
            }
        }
        let applied = self.table.apply(&pending, &mut |e| self.kernel.lookup(e));
        assert!(matches!(applied, Ok(Ok(_))), "{applied:?}");
    }
}

/// A step of xorshift64: the tests' rolls of dice, the same every run.
fn xorshift(state: &mut u64, n: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % n.max(1)
}

/// Two namespaces' tables swept as `--all-netns` sweeps them: the larger lends its sockets
/// first and is patched; the other's are copied after them (every other round) and given back
/// at once. Which one lends first changes every few rounds, so a patch must start from the
/// match of the very lend its edits are counted from.
struct Sweep {
    spaces: [Namespace; 2],
    rng: u64,
}

/// One round's sockets: the first `own` lent by namespace `first`, with its edits, then, every
/// other round, the other namespace's.
struct Swept {
    first: usize,
    own: usize,
    sockets: Vec<Socket>,
    edits: Edits,
}

impl Sweep {
    fn new(seed: u64) -> Sweep {
        Sweep {
            spaces: [Namespace::new(1, 1, 40), Namespace::new(2, 10_000, 20)],
            rng: seed,
        }
    }

    fn roll(&mut self, n: u64) -> u64 {
        xorshift(&mut self.rng, n)
    }

    fn lend(&mut self, round: u32) -> Swept {
        let first = usize::from(round % 7 >= 4);
        let (mut sockets, edits) = self.spaces[first].table.lend();
        let own = sockets.len();
        if round % 2 == 1 {
            let (others, _) = self.spaces[1 - first].table.lend();
            sockets.extend(others.iter().cloned());
            assert!(self.spaces[1 - first].table.give_back(others));
        }
        Swept {
            first,
            own,
            sockets,
            edits,
        }
    }

    /// Gives a round's sockets back to the table that lent them, then moves every namespace on.
    fn next(&mut self, swept: Swept) {
        let Swept {
            first,
            own,
            mut sockets,
            ..
        } = swept;
        sockets.truncate(own);
        assert!(self.spaces[first].table.give_back(sockets));
        let Sweep { spaces, rng } = self;
        for space in spaces.iter_mut() {
            space.churn(&mut |n| xorshift(rng, n));
        }
    }
}

#[test]
fn a_peer_match_patched_by_a_tables_edits_is_the_match_from_scratch() {
    use shimcheck::join::{KeptTopology, Topology};
    let mut sweep = Sweep::new(0x2545_f491_4f6c_dd1d);
    let mut kept = KeptTopology::default();
    let mut last_first = None;
    for round in 0..80 {
        let swept = sweep.lend(round);
        let patched = kept.topology(&swept.sockets, Some(&swept.edits));
        assert_eq!(
            patched,
            Topology::with_inode_order(&swept.sockets),
            "round {round}"
        );
        // Patched whenever the table lent first is the last round's (whose lend the edits
        // count from); matched anew otherwise.
        assert_eq!(
            kept.last_patched(),
            last_first == Some(swept.first),
            "round {round}"
        );
        last_first = Some(swept.first);
        sweep.next(swept);
    }
}

/// The holders of socket `inode` in the test below: none for some (while `hidden`: a holder
/// the scan could not see), two processes for others, the server ends one process, the
/// client ends one of four; those `passed` names are held by another process since (an fd
/// passed, a holder exited), or shared with another one.
fn holders_of(inode: u64, passed: &BTreeMap<u64, u32>, hidden: bool) -> Vec<(u64, u32)> {
    let passed = passed.get(&inode).copied();
    match (inode, passed) {
        (i, _) if hidden && i % 11 == 0 => vec![],
        // Shared, by a second process that can change.
        (i, p) if i % 13 == 0 => vec![(i, 1000), (i, p.unwrap_or(1001))],
        (i, Some(pid)) => vec![(i, pid)],
        // Two registries hold the server ends: which holds most of a client's other ends (the
        // note of its findings) changes as its connections come and go.
        (i, None) if i % 2 == 1 => vec![(i, 2000 + (i / 2 % 2) as u32)],
        (i, None) => vec![(i, 1000 + (i / 2 % 4) as u32)],
    }
}

/// A round's sample of `sockets` for the tests of what a loop keeps: holders from
/// `holders_of` (hidden in half the rounds), the processes they name, and one process the
/// scan could not read, so that a socket with an inode and no holder warns so.
fn round_sample(sockets: Vec<Socket>, passed: &BTreeMap<u64, u32>, round: u32) -> Sample {
    use crate::support::builders::{process, sample};
    let pairs: Vec<(u64, u32)> = sockets
        .iter()
        .filter(|s| s.inode != 0)
        .flat_map(|s| holders_of(s.inode, passed, round % 10 < 5))
        .collect();
    let mut processes = vec![process(2000, "registry"), process(3000, "sidecar")];
    processes.push(process(2001, "registry"));
    processes.extend((1000..1004).map(|pid| process(pid, &format!("client{}", pid - 1000))));
    let denied = ScanStats {
        denied: 1,
        ..ScanStats::default()
    };
    sample()
        .at(1_800_000_000 + 15 * u64::from(round))
        .port_range(40000, 40063)
        .sockets(sockets)
        .owners(pairs)
        .processes(processes)
        .scan(denied)
        .build()
}

/// Between rounds a holder or two change hands, and one goes back.
fn pass_holders(sweep: &mut Sweep, passed: &mut BTreeMap<u64, u32>) {
    for _ in 0..2 {
        let inode = 100_000 + sweep.roll(200);
        passed.insert(inode, 3000);
    }
    if let Some(&inode) = passed
        .keys()
        .nth(sweep.roll(passed.len() as u64 + 1) as usize)
    {
        passed.remove(&inode);
    }
}

#[test]
fn groups_kept_by_a_tables_edits_are_the_groups_made_from_scratch() {
    use shimcheck::aggregate::{GroupBy, KeptGroups, Query, aggregate_with_counts};
    use shimcheck::join::{Joined, KeptTopology};

    use crate::support::builders::query;
    // Two namespaces' tables taking turns being lent first (`Sweep`); holders that change
    // hands between rounds; every grouping a loop keeps, with and without
    // filters and a top, and two it does not keep (`--by pod`, `--process`).
    let shown = [TcpState::Established, TcpState::CloseWait];
    let mut queries: Vec<Query> = [GroupBy::Port, GroupBy::Peer, GroupBy::Process]
        .into_iter()
        .chain([GroupBy::Pair, GroupBy::Pod])
        .map(|by| query(by, &shown))
        .collect();
    queries.push(Query {
        fold: true,
        ..query(GroupBy::Port, &shown)
    });
    queries.push(Query {
        top: Some(3),
        ..query(GroupBy::Pair, &shown)
    });
    queries.push(Query {
        top: Some(0),
        ..query(GroupBy::Process, &shown)
    });
    queries.push(Query {
        pid: Some(2000),
        port: Some(5000),
        ..query(GroupBy::Peer, &[TcpState::Established])
    });
    queries.push(Query {
        process: Some("client1".into()),
        ..query(GroupBy::Port, &shown)
    });
    let keeps = |q: &Query| q.group_by != GroupBy::Pod && q.process.is_none();
    let mut kept: Vec<KeptGroups> = queries.iter().map(|_| KeptGroups::default()).collect();
    let mut sweep = Sweep::new(0x9e37_79b9_7f4a_7c15);
    let mut topology = KeptTopology::default();
    let mut passed: BTreeMap<u64, u32> = BTreeMap::new();
    let (mut patched, mut last_first) = (0, None);
    for round in 0..80 {
        let Swept {
            first,
            own,
            sockets,
            edits,
        } = sweep.lend(round);
        let peers = topology.topology(&sockets, Some(&edits));
        let sample = round_sample(sockets, &passed, round);
        let joined = Joined::with_topology_of(&sample, &peers);
        let scratch = Joined::new(&sample);
        for (q, groups) in queries.iter().zip(&mut kept) {
            let (report, counts) = groups.report(&joined, q, Some(&edits), true);
            let (want, want_counts) = aggregate_with_counts(&scratch, q);
            assert_eq!(report, want, "round {round}: {q:?}");
            assert_eq!(counts, Some(want_counts), "round {round}: {q:?}");
            // Patched whenever the query can be kept and the table lent first is the last
            // round's (whose lend the edits count from); made anew otherwise.
            assert_eq!(
                groups.last_patched().is_some(),
                keeps(q) && last_first == Some(first),
                "round {round}: {q:?}"
            );
            patched += usize::from(groups.last_patched().is_some());
        }
        drop((joined, scratch));
        let swept = Swept {
            first,
            own,
            sockets: sample.sockets,
            edits,
        };
        sweep.next(swept);
        last_first = Some(first);
        pass_holders(&mut sweep, &mut passed);
    }
    assert!(patched > 350, "{patched} reports patched");
}

/// One round of `serve_rounds`: its sample (whose clocks a test may read again), the peers
/// matched in it, the kept groups' report of it just made, and the edits of its table.
struct Round<'a> {
    number: u32,
    own: usize,
    sample: &'a mut Sample,
    peers: &'a Topology,
    groups: &'a KeptGroups,
    edits: &'a Edits,
}

/// `serve`'s loop in small, over 80 rounds of `Sweep`: the peer match and the groups (by
/// `report_query`) patched by the table's edits; `round` then does what the test keeps from
/// sample to sample. Holders change hands between rounds. Returns the rounds whose groups were
/// patched.
fn serve_rounds(seed: u64, mut round: impl FnMut(Round<'_>)) -> usize {
    use shimcheck::join::{Joined, KeptTopology};
    use shimcheck::serve::report_query;
    let query = report_query();
    let mut sweep = Sweep::new(seed);
    let mut topology = KeptTopology::default();
    let mut groups = KeptGroups::default();
    let mut passed: BTreeMap<u64, u32> = BTreeMap::new();
    let mut patched = 0;
    for number in 0..80 {
        let Swept {
            first,
            own,
            sockets,
            edits,
        } = sweep.lend(number);
        let peers = topology.topology(&sockets, Some(&edits));
        let mut sample = round_sample(sockets, &passed, number);
        groups.report(
            &Joined::with_topology_of(&sample, &peers),
            &query,
            Some(&edits),
            false,
        );
        patched += usize::from(groups.last_patched().is_some());
        round(Round {
            number,
            own,
            sample: &mut sample,
            peers: &peers,
            groups: &groups,
            edits: &edits,
        });
        sweep.next(Swept {
            first,
            own,
            sockets: sample.sockets,
            edits,
        });
        pass_holders(&mut sweep, &mut passed);
    }
    patched
}

/// Every third round a loop reads again the clocks of some of the sockets a table lent
/// (`own`), and of `wanted`: data flowed on those connections meanwhile. The places read.
fn read_again(r: &mut Round<'_>, wanted: &[u32]) -> Vec<u32> {
    if !r.number.is_multiple_of(3) {
        return Vec::new();
    }
    let mut places: Vec<u32> = (0..r.own as u32)
        .step_by(7)
        .chain(wanted.iter().copied())
        .collect();
    places.sort_unstable();
    places.dedup();
    for &i in &places {
        if let Some(t) = r.sample.sockets[i as usize].tcp_info.as_mut() {
            t.last_data_recv_ms = 5;
        }
    }
    places
}

#[test]
fn socket_counts_kept_by_the_groups_changes_are_the_counts_made_from_scratch() {
    use std::time::Duration;

    use shimcheck::detect::DetectConfig;
    use shimcheck::join::Joined;
    use shimcheck::render::metrics::{self, Families, SocketCounts};
    // The metrics' counts patched by the groups' changes, against counts made anew. Clocks age
    // up to 20 s a round and cross --idle-after; some are read again between samples; a
    // sample is reused 30 s later.
    let cfg = DetectConfig {
        idle_after: Duration::from_secs(60),
        ..DetectConfig::default()
    };
    let scratch = |s: &Sample| metrics::families(&Joined::new(s), &[], &cfg, 10_000);
    let kept_of =
        |s: &Sample, c: &SocketCounts| -> Families { metrics::families_of(s, c, &[], 10_000) };
    let mut counts: Option<SocketCounts> = None;
    let (mut idle_seen, mut counted) = (0.0, 0);
    let patched = serve_rounds(0x0517_cc1b_7272_20a1, |mut r| {
        let joined = Joined::with_topology_of(r.sample, r.peers);
        // Now and then the groups move on without the counts: those are then a report
        // behind, and must be counted anew.
        if r.number % 11 == 5 {
            counts.get_or_insert_with(|| SocketCounts::new(&joined, &cfg));
            return;
        }
        let mut kept = SocketCounts::update(counts.take(), &joined, &cfg, r.groups, Some(r.edits));
        drop(joined);
        // Patched only where the groups were, and then unless a sample was missed.
        assert!(!kept.patched() || r.groups.last_patched().is_some());
        counted += usize::from(kept.patched());
        let families = kept_of(r.sample, &kept);
        assert_eq!(families, scratch(r.sample), "round {}", r.number);
        idle_seen += families
            .0
            .iter()
            .filter(|f| f.name == "shimcheck_idle_connections")
            .flat_map(|f| f.series.iter().map(|(_, v)| v))
            .sum::<f64>();
        let places = read_again(&mut r, &[]);
        if !places.is_empty() {
            kept.recount(&Joined::with_topology_of(r.sample, r.peers), &places);
            assert_eq!(
                kept_of(r.sample, &kept),
                scratch(r.sample),
                "round {}",
                r.number
            );
        }
        // Nothing moved since, 30 s later: the counts stand, their clocks brought forward.
        let mut later = r.sample.clone();
        later.tcp_info_age_ms = 30_000;
        assert_eq!(
            kept_of(&later, &kept),
            scratch(&later),
            "round {}",
            r.number
        );
        counts = Some(kept);
    });
    assert!(patched > 40, "{patched} rounds' groups patched");
    assert!(counted > 40, "{counted} rounds' counts patched");
    assert!(idle_seen > 0.0, "no connection ever idle long enough");
}

#[test]
fn a_digest_and_history_kept_by_the_groups_changes_are_those_made_from_scratch() {
    use std::time::Duration;

    use shimcheck::detect::{self, DetectConfig, Digest, History, Kind};
    use shimcheck::join::Joined;
    // A loop's digest and history brought up to date at the places its groups changed,
    // against those made from every socket. When each socket was first seen decides which
    // connections count as opened within the window, and so the growth findings and the
    // clocks read again; the digest's members, clocks and notes decide the others. Two sets
    // of thresholds: a loop's, and one that makes a finding of every pair, process and
    // destination, so that every count, clock and note is compared.
    let cfg = DetectConfig {
        min_growth: 2,
        window: Duration::from_secs(120),
        idle_after: Duration::from_secs(60),
        idle_min_count: 3,
        close_wait_min: 1,
    };
    let everything = DetectConfig {
        min_growth: 1,
        idle_after: Duration::ZERO,
        idle_min_count: 1,
        ..cfg.clone()
    };
    let mut digest: Option<Digest> = None;
    let (mut kept, mut scratch) = (History::new(cfg.window, 2), History::new(cfg.window, 2));
    let (mut young, mut digested) = (0, 0);
    let mut kinds = BTreeMap::new();
    let patched = serve_rounds(0x2f69_3a1d_c0de_5eed, |mut r| {
        // Now and then the loop misses a sample: the digest and the history must then look
        // at every socket again, the groups' next changes being counted from a sample they
        // never saw.
        if r.number % 11 == 5 {
            return;
        }
        let joined = Joined::with_topology_of(r.sample, r.peers);
        let mut d = Digest::update(digest.take(), &joined, r.groups, Some(r.edits));
        assert!(!d.patched() || r.groups.last_patched().is_some());
        digested += usize::from(d.patched());
        kept.observe_digest(&d, &joined, r.groups, Some(r.edits));
        drop(joined);
        scratch.observe(&Joined::new(r.sample));
        for i in 0..r.sample.sockets.len() {
            assert_eq!(
                kept.first_seen(i),
                scratch.first_seen(i),
                "round {}, {i}",
                r.number
            );
        }
        let wanted = kept.clocks_wanted(&d, &cfg);
        let fresh = Digest::new(&Joined::new(r.sample));
        assert_eq!(
            wanted,
            scratch.clocks_wanted(&fresh, &cfg),
            "round {}",
            r.number
        );
        young += wanted.len();
        let places = read_again(&mut r, &wanted);
        if !places.is_empty() {
            d.recount(&Joined::with_topology_of(r.sample, r.peers), &places);
        }
        // Judged now, and once more 30 s later with nothing moved.
        let mut later = r.sample.clone();
        later.tcp_info_age_ms = 30_000;
        for (s, c) in [
            (&*r.sample, &cfg),
            (&*r.sample, &everything),
            (&later, &cfg),
        ] {
            let findings = d.findings(s, Some(&kept), c);
            assert_eq!(
                findings,
                detect::findings(&Joined::new(s), Some(&scratch), c),
                "round {}",
                r.number
            );
            for f in findings {
                *kinds.entry(format!("{:?}", f.kind)).or_insert(0) += 1;
            }
        }
        digest = Some(d);
    });
    assert!(patched > 40, "{patched} rounds' groups patched");
    assert!(digested > 40, "{digested} rounds' digests patched");
    assert!(young > 0, "no socket opened within the window was judged");
    for kind in [
        Kind::Growth,
        Kind::Idle,
        Kind::CloseWait,
        Kind::PortExhaustion,
    ] {
        assert!(
            kinds.contains_key(&format!("{kind:?}")),
            "no {kind:?} finding: {kinds:?}"
        );
    }
}

#[test]
fn counts_kept_while_a_table_ages_a_month_still_tell_a_new_busy_connection_from_an_idle_one() {
    use shimcheck::aggregate::KeptGroups;
    use shimcheck::detect::DetectConfig;
    use shimcheck::join::Joined;
    use shimcheck::render::metrics::{self, SocketCounts};
    use shimcheck::serve::report_query;

    use crate::support::builders::sample;
    // A table kept 35 days: its clocks aged past what the counts keep of them in 32 bits.
    let mut kernel = Kernel::default();
    for s in connection(1, 1, true) {
        kernel
            .now
            .insert(Socket::cookie(&s).unwrap(), s.idle(1_000));
    }
    let mut table = Table::new(kernel.now.values().cloned().collect(), shown()).unwrap();
    let cfg = DetectConfig::default();
    let (mut groups, mut counts) = (KeptGroups::default(), None);
    let mut look = |table: &mut Table, counts: &mut Option<SocketCounts>| {
        let (sockets, edits) = table.lend();
        let s = sample().sockets(sockets).build();
        let joined = Joined::new(&s);
        groups.report(&joined, &report_query(), Some(&edits), false);
        let kept = SocketCounts::update(counts.take(), &joined, &cfg, &groups, Some(&edits));
        let families = metrics::families_of(&s, &kept, &[], 100);
        assert_eq!(families, metrics::families(&joined, &[], &cfg, 100));
        *counts = Some(kept);
        drop(joined);
        assert!(table.give_back(s.sockets));
        families
    };
    look(&mut table, &mut counts);
    table.age(35 * 86_400_000);
    // A connection opens: its clocks, read now, say it carried data 5 ms ago.
    let mut pending = Pending::default();
    for s in connection(1, 2, true) {
        let (local, remote) = (s.local().to_string(), s.remote().to_string());
        let cookie = Socket::cookie(&s).unwrap();
        pending.add(change(
            cookie,
            TcpState::SynSent,
            TcpState::Established,
            &local,
            &remote,
        ));
        kernel.now.insert(cookie, s.idle(5));
    }
    assert_eq!(apply(&mut table, &pending, &mut kernel), Ok(2));
    let families = look(&mut table, &mut counts);
    let idle: f64 = families
        .0
        .iter()
        .filter(|f| f.name == "shimcheck_idle_connections")
        .flat_map(|f| f.series.iter().map(|(_, v)| v))
        .sum();
    assert_eq!(
        idle, 2.0,
        "the first connection's two ends, not the new one's"
    );
}

#[test]
fn kept_groups_asked_another_question_or_lent_by_another_table_or_lend_are_made_anew() {
    use shimcheck::aggregate::{GroupBy, KeptGroups, Query, aggregate_with_counts};
    use shimcheck::join::{Joined, Topology};

    use crate::support::builders::{query, sample};
    let shown = [TcpState::Established, TcpState::CloseWait];
    // Two tables of as many sockets, on other client ports.
    let (mut a, mut b) = (Namespace::new(1, 1, 20), Namespace::new(1, 10_000, 20));
    let mut kept = KeptGroups::default();
    let mut look = |ns: &mut Namespace, q: &Query, what: &str| {
        let (sockets, edits) = ns.table.lend();
        let topology = Topology::with_inode_order(&sockets);
        let s = sample().sockets(sockets).build();
        let (report, _) = kept.report(
            &Joined::with_topology_of(&s, &topology),
            q,
            Some(&edits),
            false,
        );
        let (want, _) = aggregate_with_counts(&Joined::new(&s), q);
        assert_eq!(report, want, "{what}");
        assert!(ns.table.give_back(s.sockets));
        kept.last_patched()
    };
    let (by_port, by_peer) = (query(GroupBy::Port, &shown), query(GroupBy::Peer, &shown));
    assert_eq!(look(&mut a, &by_port, "a's first lend"), None);
    assert_eq!(look(&mut a, &by_port, "a again, nothing moved"), Some(0));
    // A connection half-closes, then a lend the groups never see: the next edits count from
    // that lend and do not hold the change: grouped anew.
    a.churn(&mut |_| 0);
    let (sockets, _) = a.table.lend();
    assert!(a.table.give_back(sockets));
    assert_eq!(
        look(&mut a, &by_port, "a after a lend it did not see"),
        None
    );
    // The same table, nothing moved, another question: grouped anew.
    assert_eq!(look(&mut a, &by_peer, "a asked by peer"), None);
    // Another table whose edits count from a lend of the same number and length as the
    // last one's: grouped anew.
    for _ in 0..3 {
        let (sockets, _) = b.table.lend();
        assert!(b.table.give_back(sockets));
    }
    assert_eq!(look(&mut b, &by_peer, "b's fourth lend"), None);
}

#[test]
fn past_the_groups_a_loop_keeps_it_groups_from_scratch() {
    use shimcheck::aggregate::{GroupBy, KeptGroups, aggregate_with_counts};
    use shimcheck::join::Joined;

    use crate::support::builders::{query, sample};
    // 70,000 connections to as many places: a group each by peer, past the 65,536 kept.
    let sockets: Vec<Socket> = (0..70_000u64)
        .map(|i| {
            let remote = format!("10.{}.{}.{}:443", i >> 16, (i >> 8) & 255, i & 255);
            sock(
                TcpState::Established,
                "10.0.0.1:40000",
                &remote,
                1_000_000 + i,
            )
            .cookie(i + 1)
        })
        .collect();
    let mut table = Table::new(sockets, shown()).unwrap();
    let by_peer = query(GroupBy::Peer, &[TcpState::Established]);
    let mut kept = KeptGroups::default();
    for look in 0..2 {
        let (sockets, edits) = table.lend();
        let s = sample().sockets(sockets).build();
        let joined = Joined::new(&s);
        let (report, _) = kept.report(&joined, &by_peer, Some(&edits), false);
        assert_eq!(
            report,
            aggregate_with_counts(&joined, &by_peer).0,
            "look {look}"
        );
        assert_eq!(report.total_groups, 70_000);
        assert_eq!(
            kept.last_patched(),
            None,
            "look {look}: grouped from scratch"
        );
        drop(joined);
        assert!(table.give_back(s.sockets));
    }
}
