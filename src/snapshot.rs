//! Snapshots: one whole sample as a JSON file (`shimcheck snapshot`), and back
//! (`shimcheck ports --from`, `--baseline`): capture on the master, analyse anywhere.
//!
//! Input/output: a `Sample` ⇄ a JSON document, schema_version 1 (docs/snapshot.md): every
//! socket with its holders, cookie and tcp_info, the holders' names, the host facts the
//! detector uses, and what the /proc scan could not read.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::model::{HostFacts, OwnerIndex, Place, Process, Sample, ScanStats, Socket, Warning};

/// The snapshot schema version this module reads and writes.
pub const SNAPSHOT_SCHEMA_VERSION: u32 = 1;
const KIND: &str = "shimcheck-snapshot";

#[derive(Serialize, Deserialize)]
struct SnapshotDoc {
    schema_version: u32,
    kind: String,
    /// RFC 3339, for people.
    taken_at: String,
    /// Milliseconds since the epoch, for rates.
    taken_at_ms: u64,
    hostname: String,
    host: HostFacts,
    processes: Vec<Process>,
    sockets: Vec<SnapSocket>,
    scan: ScanStats,
    warnings: Vec<String>,
    #[serde(default)]
    own_netns: u64,
    #[serde(default)]
    netns_names: BTreeMap<u64, String>,
    #[serde(default)]
    cgroup_places: BTreeMap<u64, Place>,
}

#[derive(Serialize, Deserialize)]
struct SnapSocket {
    #[serde(flatten)]
    socket: Socket,
    /// Pids holding the socket.
    owners: Vec<u32>,
}

/// Each socket's holders, by one walk of the sockets in inode order beside the owner pairs.
fn holders(sample: &Sample) -> Vec<Vec<u32>> {
    let mut order: Vec<(u64, usize)> = sample
        .sockets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.inode, i))
        .collect();
    order.sort_unstable();
    let inodes: Vec<u64> = order.iter().map(|&(inode, _)| inode).collect();
    let mut out = vec![Vec::new(); sample.sockets.len()];
    let pairs = sample.owners.pairs();
    sample.owners.walk_sorted(&inodes, |k, run| {
        out[order[k].1] = pairs[run].iter().map(|&(_, pid)| pid).collect();
    });
    out
}

/// Writes `sample` as a snapshot document.
pub fn write(sample: &Sample, out: &mut dyn Write) -> io::Result<()> {
    let taken_at_ms = sample
        .taken_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut processes: Vec<Process> = sample.owners.processes.values().cloned().collect();
    processes.sort_by_key(|p| p.pid);
    let doc = SnapshotDoc {
        schema_version: SNAPSHOT_SCHEMA_VERSION,
        kind: KIND.into(),
        taken_at: crate::aggregate::rfc3339(sample.taken_at),
        taken_at_ms,
        hostname: sample.hostname.clone(),
        host: sample.host.clone(),
        processes,
        sockets: sample
            .sockets
            .iter()
            .zip(holders(sample))
            .map(|(s, owners)| {
                let mut socket = s.clone();
                // The document's clocks are as of its `taken_at`.
                socket.age(u32::try_from(sample.tcp_info_age_ms).unwrap_or(u32::MAX));
                SnapSocket { socket, owners }
            })
            .collect(),
        scan: sample.scan.clone(),
        warnings: sample.warnings.iter().map(ToString::to_string).collect(),
        own_netns: sample.own_netns,
        netns_names: sample.netns_names.clone(),
        cgroup_places: sample.cgroup_places.clone(),
    };
    serde_json::to_writer(&mut *out, &doc)?;
    out.write_all(b"\n")
}

/// Writes `sample` to `path` whole or not at all: into a temporary file beside it, flushed
/// and synced, then renamed over it, so a full disk or a signal never leaves a truncated
/// snapshot where the previous one was.
pub fn write_file(sample: &Sample, path: &Path) -> anyhow::Result<()> {
    crate::atomic::replace(path, |w| write(sample, w))
}

/// Reads a snapshot file back into the sample it was taken from.
pub fn read(path: &Path) -> anyhow::Result<Sample> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open snapshot {}", path.display()))?;
    read_from(io::BufReader::new(file), &path.display().to_string())
}

/// Reads a snapshot document from `reader`; `origin` names it in errors.
pub fn read_from(reader: impl io::Read, origin: &str) -> anyhow::Result<Sample> {
    let doc: SnapshotDoc = serde_json::from_reader(reader)
        .with_context(|| format!("{origin} is not a shimcheck snapshot (JSON)"))?;
    if doc.kind != KIND || doc.schema_version != SNAPSHOT_SCHEMA_VERSION {
        bail!(
            "{origin} is a {} schema_version {} document; this shimcheck reads {KIND} \
             schema_version {SNAPSHOT_SCHEMA_VERSION}",
            doc.kind,
            doc.schema_version
        );
    }
    let mut pairs = Vec::new();
    let mut sockets = Vec::with_capacity(doc.sockets.len());
    for s in doc.sockets {
        pairs.extend(s.owners.iter().map(|&pid| (s.socket.inode, pid)));
        sockets.push(s.socket);
    }
    let processes = doc.processes.into_iter().map(|p| (p.pid, p)).collect();
    Ok(Sample {
        tcp_info_age_ms: 0,
        taken_at: SystemTime::UNIX_EPOCH + Duration::from_millis(doc.taken_at_ms),
        hostname: doc.hostname,
        sockets,
        owners: OwnerIndex::from_pairs(pairs, processes),
        scan: doc.scan,
        host: doc.host,
        warnings: doc.warnings.into_iter().map(Warning::Recorded).collect(),
        own_netns: doc.own_netns,
        netns_names: doc.netns_names,
        cgroup_places: doc.cgroup_places,
    })
}
