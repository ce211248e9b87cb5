//! Snapshots: one whole sample as a JSON file (`shimcheck snapshot`), and back
//! (`shimcheck ports --from`, `--baseline`): capture on the master, analyse anywhere.
//!
//! Input/output: a `Sample` ⇄ a JSON document, schema_version 1 (docs/snapshot.md): every
//! socket with its holders, cookie and tcp_info, the holders' names, the host facts the
//! detector uses, and what the /proc scan could not read.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
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
    sample.owners.walk_sorted(inodes.iter().copied(), |k, run| {
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

/// The largest snapshot shimcheck reads: 1 GiB, about four million sockets (a million-socket
/// node writes about 260 MB). A larger file, or a stream that does not end, is refused once
/// this much is read, so that reading one cannot exhaust the memory of the node it runs on.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// The members every schema version starts with: enough to tell a newer document from a broken
/// one.
#[derive(Deserialize)]
struct Head {
    schema_version: u32,
    #[serde(default)]
    kind: String,
}

/// Reads a snapshot file back into the sample it was taken from.
pub fn read(path: &Path) -> anyhow::Result<Sample> {
    let origin = path.display().to_string();
    let open =
        || std::fs::File::open(path).with_context(|| format!("cannot open snapshot {origin}"));
    let file = open()?;
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > MAX_SNAPSHOT_BYTES
    {
        bail!(too_large(&origin, Some(meta.len()), MAX_SNAPSHOT_BYTES));
    }
    read_from(io::BufReader::new(file), &origin).map_err(|e| {
        // A shimcheck document this shimcheck cannot parse may be of a newer schema: say so.
        let head = open().ok().and_then(|f| {
            serde_json::from_reader::<_, Head>(io::BufReader::new(f).take(MAX_SNAPSHOT_BYTES)).ok()
        });
        match head {
            Some(h) if h.kind == KIND && h.schema_version != SNAPSHOT_SCHEMA_VERSION => {
                anyhow::anyhow!(other_schema(&origin, &h.kind, h.schema_version))
            }
            _ => e,
        }
    })
}

fn too_large(origin: &str, len: Option<u64>, max: u64) -> String {
    let size = len.map_or_else(
        || format!("more than {max} bytes"),
        |n| format!("{n} bytes"),
    );
    format!(
        "{origin} is {size}: shimcheck reads snapshots of up to {max} bytes (1 GiB, about \
         four million sockets); is it a shimcheck snapshot?"
    )
}

fn other_schema(origin: &str, kind: &str, version: u32) -> String {
    let advice = if kind == KIND && version > SNAPSHOT_SCHEMA_VERSION {
        ": it was written by a newer shimcheck; read it with that version"
    } else {
        ""
    };
    format!(
        "{origin} is a {kind:?} schema_version {version} document; this shimcheck reads \
         {KIND} schema_version {SNAPSHOT_SCHEMA_VERSION}{advice}"
    )
}

/// Reads a snapshot document from `reader`; `origin` names it in errors. At most
/// `MAX_SNAPSHOT_BYTES` are read.
pub fn read_from(reader: impl io::Read, origin: &str) -> anyhow::Result<Sample> {
    read_at_most(reader, origin, MAX_SNAPSHOT_BYTES)
}

/// `read_from` with a limit of `max` bytes: a document that does not end within them is
/// refused as too large.
pub fn read_at_most(reader: impl io::Read, origin: &str, max: u64) -> anyhow::Result<Sample> {
    let mut limited = reader.take(max.saturating_add(1));
    let doc: SnapshotDoc = match serde_json::from_reader(&mut limited) {
        Ok(doc) => doc,
        Err(_) if limited.limit() == 0 => bail!(too_large(origin, None, max)),
        Err(e) => {
            return Err(e).with_context(|| format!("{origin} is not a shimcheck snapshot (JSON)"));
        }
    };
    if doc.kind != KIND || doc.schema_version != SNAPSHOT_SCHEMA_VERSION {
        bail!(other_schema(origin, &doc.kind, doc.schema_version));
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
