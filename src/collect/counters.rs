//! Stage 1, collector, the cheap look before a dump: a network namespace's own TCP counters
//! tell whether its last dump still holds, so a loop (`--watch`, `serve`) dumps only the
//! namespaces where something moved.
//!
//! Input: a namespace's `net` directory in procfs (`/proc/thread-self/net`, `/proc/PID/net`).
//! Output: `Counters` (the `Tcp:` line of `snmp`, the `inuse` and `tw` of `sockstat{,6}`,
//! 15–20 µs to read); `Stillness`, whether the last dump still holds; and, in `LastDump`, the
//! sockets of the last dump, reused while the counters stand still.
//!
//! Why equal counters mean an equal dump: every change a dump shows needs a segment sent or
//! received (InSegs, OutSegs: data, FIN, RST, keepalive), a connection opened or refused
//! (ActiveOpens, PassiveOpens, AttemptFails), a socket hashed or unhashed (`inuse`: listen,
//! close of a listener) or a TIME_WAIT ending (`tw`). With none of those, the only thing that
//! moves is time: every tcp_info clock is older by exactly the time since the dump, which
//! `LastDump` adds (and a loop's `Sample::tcp_info_age_ms` counts). What no counter sees (a
//! receive queue drained by the application, a listener's accept backlog shrinking) is caught
//! by the full dump every `RESYNC_EVERY` samples (and at most once a minute). Counters shared
//! by the whole node (`alloc`, `orphan`, `mem`) are left out: they move with every namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::{Socket, StateSet};

/// Samples between two dumps of a namespace whose counters never move...
pub const RESYNC_EVERY: u32 = 20;
/// ... and not more often than this: a watch every 100 ms resyncs once a minute, not every
/// 2 s; `serve` every 15 s resyncs every 5 minutes.
pub const RESYNC_AFTER: Duration = Duration::from_secs(60);

/// The per-namespace TCP counters that move whenever a dump could differ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// The values line of `snmp`'s `Tcp:` block, as the kernel wrote it.
    snmp: String,
    /// `sockstat`'s TCP `inuse` and `tw`, `sockstat6`'s TCP6 `inuse`.
    sockstat: [u64; 3],
}

impl Counters {
    /// Reads the counters of the namespace `net_dir` shows; `None` when any file cannot be
    /// read (a process gone, procfs not mounted): the caller dumps.
    pub fn read(net_dir: &Path) -> Option<Counters> {
        let snmp = std::fs::read_to_string(net_dir.join("snmp")).ok()?;
        let v4 = std::fs::read_to_string(net_dir.join("sockstat")).ok()?;
        // No IPv6 in this kernel: no TCP6 line, 0 sockets.
        let v6 = std::fs::read_to_string(net_dir.join("sockstat6")).unwrap_or_default();
        Counters::parse(&snmp, &v4, &v6)
    }

    /// The counters from the three files' text; `None` when `snmp` has no `Tcp:` values or
    /// `sockstat` no `TCP:` line.
    pub fn parse(snmp: &str, sockstat: &str, sockstat6: &str) -> Option<Counters> {
        // Two `Tcp:` lines: the names, then the values.
        let values = snmp.lines().filter(|l| l.starts_with("Tcp:")).nth(1)?;
        let v4 = sockstat.lines().find(|l| l.starts_with("TCP: "))?;
        let v6 = sockstat6.lines().find(|l| l.starts_with("TCP6: "));
        Some(Counters {
            snmp: values.to_string(),
            sockstat: [
                field(v4, "inuse")?,
                field(v4, "tw").unwrap_or(0),
                v6.and_then(|l| field(l, "inuse")).unwrap_or(0),
            ],
        })
    }

    /// TCP sockets in the namespace, TIME_WAIT included: 0 means a dump would be empty.
    pub fn sockets(&self) -> u64 {
        self.sockstat.iter().sum()
    }
}

/// The number after `name` on a sockstat line (`TCP: inuse 5 orphan 0 tw 3 ...`).
fn field(line: &str, name: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == name)?;
    words.next()?.parse().ok()
}

/// Whether a namespace's last dump still holds: the counters read just before it.
#[derive(Debug, Default)]
pub struct Stillness {
    /// The counters, the states dumped, the samples answered since without a dump, and when
    /// the counters were read.
    kept: Option<(Counters, StateSet, u32, Instant)>,
}

impl Stillness {
    /// True when `counters` (read `now`) equal those read before the last dump, which was of
    /// the same `states`, and a resync is not due (`RESYNC_EVERY` samples and `RESYNC_AFTER`
    /// since); counts one more sample answered so.
    pub fn still(&mut self, counters: &Counters, states: StateSet, now: Instant) -> bool {
        let Some((kept, kept_states, reused, at)) = self.kept.as_mut() else {
            return false;
        };
        let resync =
            *reused + 1 >= RESYNC_EVERY && now.saturating_duration_since(*at) >= RESYNC_AFTER;
        if kept != counters || *kept_states != states || resync {
            return false;
        }
        *reused += 1;
        true
    }

    /// Remembers the counters read at `at`, just before a dump of `states`.
    pub fn dumped(&mut self, counters: Counters, states: StateSet, at: Instant) {
        self.kept = Some((counters, states, 0, at));
    }

    /// Forgets the last dump (the namespace could not be read).
    pub fn forget(&mut self) {
        self.kept = None;
    }
}

/// Milliseconds from `at` to `now`, what a socket's tcp_info clocks move on by (0 if `now` is
/// earlier, `u32::MAX` past 49 days).
pub fn ms_since(at: Instant, now: Instant) -> u32 {
    u32::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u32::MAX)
}

/// A namespace's last dump itself, for a sweep of many namespaces that assembles every sample
/// from the namespaces that moved and those that did not.
#[derive(Debug, Default)]
pub struct LastDump {
    still: Stillness,
    sockets: Vec<Socket>,
    at: Option<Instant>,
}

impl LastDump {
    /// The sockets of the last dump with their clocks brought to `now`, if it still holds
    /// (`Stillness::still`).
    pub fn reuse(
        &mut self,
        counters: &Counters,
        states: StateSet,
        now: Instant,
    ) -> Option<Vec<Socket>> {
        let at = self.at?;
        if !self.still.still(counters, states, now) {
            return None;
        }
        let ms = ms_since(at, now);
        let mut sockets = self.sockets.clone();
        sockets.iter_mut().for_each(|s| s.age(ms));
        Some(sockets)
    }

    /// Remembers a dump finished at `at` and the counters read just before it started.
    pub fn keep(&mut self, counters: Counters, states: StateSet, sockets: &[Socket], at: Instant) {
        self.still.dumped(counters, states, at);
        self.sockets = sockets.to_vec();
        self.at = Some(at);
    }

    /// Forgets the last dump (the namespace could not be read).
    pub fn forget(&mut self) {
        *self = LastDump::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm ActiveOpens InSegs\n\
                        Tcp: 1 505 2129985\nUdp: InDatagrams\nUdp: 3\n";

    #[test]
    fn counters_read_the_tcp_values_and_the_namespace_socket_counts() {
        let v4 = "sockets: used 8\nTCP: inuse 5 orphan 0 tw 3 alloc 120004 mem 9\n";
        let c = Counters::parse(SNMP, v4, "TCP6: inuse 4\n").unwrap();
        assert_eq!(c.snmp, "Tcp: 1 505 2129985");
        assert_eq!(c.sockets(), 12);
        // alloc, orphan and mem are node-wide: another namespace moves them.
        let other = "sockets: used 9\nTCP: inuse 5 orphan 2 tw 3 alloc 99 mem 1\n";
        assert_eq!(Counters::parse(SNMP, other, "TCP6: inuse 4\n"), Some(c));
        assert_eq!(Counters::parse("Tcp: only names\n", v4, ""), None);
        assert_eq!(Counters::parse(SNMP, "UDP: inuse 1\n", ""), None);
    }

    #[test]
    fn a_kept_dump_comes_back_older_by_the_time_since_and_not_past_a_resync() {
        use crate::model::{Socket, TcpInfo, TcpState};
        let info = TcpInfo {
            last_data_sent_ms: 1000,
            last_data_recv_ms: 2000,
            last_ack_recv_ms: 500,
        };
        let mut socket = Socket::new(
            TcpState::Established,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        );
        socket.inode = 9;
        socket.set_cookie(Some(1));
        socket.tcp_info = Some(info);
        let c = Counters::parse(SNMP, "TCP: inuse 2 orphan 0 tw 0\n", "").unwrap();
        let states: StateSet = [TcpState::Established].into_iter().collect();
        let at = Instant::now();
        let mut last = LastDump::default();
        assert_eq!(last.reuse(&c, states, at), None, "nothing kept yet");
        last.keep(c.clone(), states, std::slice::from_ref(&socket), at);
        let later = at + std::time::Duration::from_millis(1500);
        let again = last.reuse(&c, states, later).unwrap();
        let aged = again[0].tcp_info.unwrap();
        assert_eq!(
            (
                aged.last_data_sent_ms,
                aged.last_data_recv_ms,
                aged.last_ack_recv_ms
            ),
            (2500, 3500, 2000)
        );
        let moved = Counters::parse(SNMP, "TCP: inuse 3 orphan 0 tw 0\n", "").unwrap();
        assert_eq!(
            last.reuse(&moved, states, later),
            None,
            "a socket more: a dump"
        );
        last.keep(c.clone(), states, &[], at);
        let reused = (0..RESYNC_EVERY)
            .filter(|_| last.reuse(&c, states, later).is_some())
            .count();
        assert_eq!(reused as u32, RESYNC_EVERY, "within a minute, no resync");
        let much_later = at + RESYNC_AFTER;
        assert_eq!(
            last.reuse(&c, states, much_later),
            None,
            "{RESYNC_EVERY} samples and a minute: a resync"
        );
    }
}
