//! shimcheck as a library: the pipeline behind the binary, so tests drive it directly.
//!
//! collect (sockets from the kernel) ∥ procs (socket inode → processes from /proc)
//!   → join (owners, same-host peers, listeners) → aggregate (groups) → render (table, JSON).
//! `collect` and `procs` touch the OS; every later stage is pure.

pub mod aggregate;
pub mod cgroup;
pub mod cli;
pub mod collect;
pub mod culprits;
pub mod detect;
pub mod join;
pub mod model;
pub mod procs;
pub mod render;
pub mod snapshot;
pub mod watch;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, anyhow};

use crate::aggregate::{Query, Report};
use crate::cli::{Output, PortsArgs, SnapshotArgs};
use crate::collect::SocketSource;
use crate::detect::DetectConfig;
use crate::join::{Joined, Topology};
use crate::model::{HostFacts, Sample, Socket, StateSet, TcpState};
use crate::procs::ProcScanner;

/// Rows the table shows when `--top` is not given.
pub const DEFAULT_TABLE_TOP: usize = 20;

/// Takes one sample of the node: the socket dump (then the peer matching, which needs only
/// sockets) runs beside the fd scan (the slow half), then the owners of the dumped sockets are
/// described. LISTEN sockets are always dumped too, to tell server ports from client ports.
/// With `all_netns`, every network namespace is dumped (`collect::netns`).
pub fn collect(
    source: &mut (dyn SocketSource + Send),
    scanner: &ProcScanner,
    states: StateSet,
    all_netns: bool,
) -> anyhow::Result<(Sample, Topology)> {
    let proc_root = scanner.root();
    let taken_at = SystemTime::now();
    let own = collect::netns::own(proc_root).unwrap_or(0);
    let (dumped, scan) = std::thread::scope(|s| {
        let dump = s.spawn(|| {
            dump_sockets(source, scanner, states, all_netns, own).map(|d| {
                let topology = Topology::new(&d.sockets);
                (d, topology)
            })
        });
        let scan = scanner.socket_fds(scan_threads());
        (dump.join(), scan)
    });
    let (dumped, topology) = dumped
        .map_err(|_| anyhow!("the socket collector thread panicked"))?
        .map_err(|e| {
            let hint = e.hint();
            anyhow::Error::new(e).context(format!("cannot list TCP sockets ({hint})"))
        })?;
    let scan = scan.with_context(|| {
        format!(
            "cannot list processes in {} (is procfs mounted there? --proc-root names another)",
            proc_root.display()
        )
    })?;
    // Processes near their fd limit get a name too: a finding may be about them.
    let near_limit: Vec<u32> = scan
        .fds
        .iter()
        .filter(|(_, f)| f.limit.is_some_and(|l| f.open * 5 >= l * 4))
        .map(|(pid, _)| *pid)
        .collect();
    let owners = scanner.index(
        scan.pairs,
        dumped.sockets.iter().map(|s| s.inode),
        near_limit.into_iter(),
    );
    let sample = Sample {
        taken_at,
        hostname: hostname(),
        cgroup_places: cgroup_places(scanner, Path::new(SYS_FS_CGROUP), &dumped.sockets, &owners),
        netns_names: name_namespaces(scanner, own, &dumped.targets),
        sockets: dumped.sockets,
        owners,
        scan: scan.stats,
        host: HostFacts {
            port_range: scanner.port_range(),
            fds: scan.fds.into_iter().collect(),
        },
        warnings: dumped.warnings,
        own_netns: own,
    };
    Ok((sample, topology))
}

/// Sockets from one dump, or from every namespace's.
pub struct Dumped {
    pub sockets: Vec<Socket>,
    pub warnings: Vec<String>,
    /// The namespaces dumped with `--all-netns` (empty otherwise).
    pub targets: Vec<collect::netns::Target>,
}

/// Dumps this namespace (through `source`) or every one, tagging sockets with their namespace.
/// The states detection needs are always included.
pub fn dump_sockets(
    source: &mut (dyn SocketSource + Send),
    scanner: &ProcScanner,
    states: StateSet,
    all_netns: bool,
    own: u64,
) -> Result<Dumped, collect::CollectError> {
    let dump_states = states.union(DETECT_STATES.into_iter().collect());
    if all_netns {
        let pids = scanner.pids().unwrap_or_default();
        let (targets, denied) = collect::netns::discover(
            scanner.root(),
            &pids,
            Path::new(collect::netns::IP_NETNS_DIR),
        );
        let (sockets, mut warnings) =
            collect::netns::dump_all(&targets, own, dump_states, scan_threads());
        if denied > 0 {
            warnings.push(format!(
                "cannot see which network namespace {denied} processes are in (permission \
                 denied): namespaces only they use are not counted; run as root to see every \
                 namespace"
            ));
        }
        return Ok(Dumped {
            sockets,
            warnings,
            targets,
        });
    }
    let mut sockets = source.sockets(dump_states)?;
    sockets.iter_mut().for_each(|s| s.netns = own);
    Ok(Dumped {
        sockets,
        warnings: Vec::new(),
        targets: Vec::new(),
    })
}

/// Where cgroup v2 is mounted on a Linux host.
pub const SYS_FS_CGROUP: &str = "/sys/fs/cgroup";

/// Names the owners of sockets no visible process holds (unprivileged, another pid namespace)
/// by the cgroup that created them: their pod or systemd unit.
pub fn cgroup_places(
    scanner: &ProcScanner,
    sys_fs_cgroup: &Path,
    sockets: &[Socket],
    owners: &model::OwnerIndex,
) -> BTreeMap<u64, model::CgroupPlace> {
    let wanted: std::collections::HashSet<u64> = sockets
        .iter()
        .filter(|s| owners.owners(s.inode).is_empty())
        .filter_map(|s| s.cgroup_id)
        .collect();
    if wanted.is_empty() {
        return BTreeMap::new();
    }
    let Some(root) = cgroup::v2_root(sys_fs_cgroup) else {
        return BTreeMap::new();
    };
    cgroup::paths_by_id(&root, &wanted)
        .into_iter()
        .map(|(id, path)| {
            let p = cgroup::placement_of_path(&path);
            let pod = p.pod_uid.as_deref().and_then(|uid| scanner.pod(uid));
            (id, model::CgroupPlace { pod, unit: p.unit })
        })
        .collect()
}

/// Names namespaces as operators know them: `host` (PID 1's, or shimcheck's own where PID 1's
/// cannot be read), `ip netns` names, and the pod of a process living in one.
pub fn name_namespaces(
    scanner: &ProcScanner,
    own: u64,
    targets: &[collect::netns::Target],
) -> BTreeMap<u64, String> {
    let mut names = BTreeMap::new();
    let host = collect::netns::inode_of(&scanner.root().join("1/ns/net")).unwrap_or(own);
    names.insert(host, "host".to_string());
    for (inode, name) in collect::netns::ip_netns(Path::new(collect::netns::IP_NETNS_DIR)) {
        names.entry(inode).or_insert(name);
    }
    for t in targets {
        if names.contains_key(&t.inode) {
            continue;
        }
        if let Some(pod) = t
            .pid
            .and_then(|pid| scanner.process(pid))
            .and_then(|p| p.pod)
        {
            names.insert(t.inode, format!("{}/{}", pod.namespace, pod.name));
        }
    }
    names
}

/// States always dumped, whatever `--state` shows: LISTEN tells server ports from client
/// ports; ESTABLISHED and CLOSE_WAIT are what the detector looks at.
pub const DETECT_STATES: [TcpState; 3] =
    [TcpState::Listen, TcpState::Established, TcpState::CloseWait];

/// Threads for the fd scan: every core, up to 8 (past that /proc's locks, not CPUs, limit).
pub fn scan_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// The node's name, as `hostname` prints it.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Joins and aggregates a sample: the pure half of `shimcheck ports`.
pub fn ports_report(sample: &Sample, query: &Query) -> Report {
    aggregate::aggregate(&Joined::new(sample), query)
}

/// The states `--state` names; `all` stands for every state.
pub fn parse_states(names: &[String]) -> anyhow::Result<StateSet> {
    let mut set = StateSet::empty();
    for name in names {
        if name == "all" {
            set = set.union(StateSet::all());
        } else {
            set.insert(name.parse::<TcpState>().map_err(|e| anyhow!(e))?);
        }
    }
    Ok(set)
}

/// The query `shimcheck ports` runs for these arguments.
pub fn ports_query(args: &PortsArgs) -> anyhow::Result<Query> {
    Ok(Query {
        group_by: args.by,
        states: parse_states(&args.states)?,
        port: args.port,
        pid: args.pid,
        process: args.process.clone(),
        top: match (args.top, args.output) {
            (Some(n), _) => Some(n),
            (None, Output::Table) => Some(DEFAULT_TABLE_TOP),
            (None, Output::Json) => None,
        },
    })
}

/// Runs `shimcheck ports`: one report (live, `--from` a snapshot, or against a `--baseline`)
/// or, with `--watch`, a series. Writes the report to `out` and warnings to `err`; returns
/// the number of findings (in watch mode, those of the last sample).
pub fn run_ports(
    args: &PortsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<usize> {
    if args.watch {
        return watch::run(args, out, err);
    }
    let query = ports_query(args)?;
    let (sample, topology) = match &args.from {
        Some(path) => (snapshot::read(path)?, None),
        None => {
            let (mut source, fallback) = collect::open_default(&args.node.proc_root);
            let scanner = ProcScanner::with_pods(&args.node.proc_root, &args.node.pods_dir);
            let (mut sample, topology) =
                collect(source.as_mut(), &scanner, query.states, args.node.all_netns)?;
            sample.warnings.extend(fallback);
            (sample, Some(topology))
        }
    };
    let joined = match topology {
        Some(t) => Joined::with_topology(&sample, t),
        None => Joined::new(&sample),
    };
    let mut report = aggregate::aggregate(&joined, &query);
    let cfg = detect_config(args);
    let history = match &args.baseline {
        Some(path) => {
            let base = snapshot::read(path)?;
            if base.taken_at > sample.taken_at {
                anyhow::bail!(
                    "the baseline {} was taken after the sample it should precede; swap them",
                    path.display()
                );
            }
            let base_joined = Joined::new(&base);
            let (_, base_counts) = aggregate::aggregate_with_counts(&base_joined, &query);
            aggregate::annotate_deltas(&mut report, None, &base_counts);
            report.baseline_taken_at = Some(aggregate::rfc3339(base.taken_at));
            // A baseline is the window's start, however long ago; one rise is enough.
            let mut h = detect::History::new(std::time::Duration::MAX, 1);
            h.observe(&base_joined);
            h.observe(&joined);
            Some(h)
        }
        None => None,
    };
    report.findings = detect::findings(&joined, history.as_ref(), &cfg);
    write_report(&report, args.output, out, err)?;
    Ok(report.findings.len())
}

/// Prints a report's warnings on `err` and the report itself on `out`.
pub fn write_report(
    report: &Report,
    output: Output,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    for w in &report.warnings {
        writeln!(err, "shimcheck: warning: {}", render::escape_control(w))?;
    }
    match output {
        Output::Json => render::json::render(report, out)?,
        Output::Table => render::table::render(report, out, terminal_width())?,
    }
    out.flush()?;
    Ok(())
}

/// Runs `shimcheck snapshot`: one full sample, every state, as a JSON document.
pub fn run_snapshot(
    args: &SnapshotArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<usize> {
    let (mut source, fallback) = collect::open_default(&args.node.proc_root);
    let scanner = ProcScanner::with_pods(&args.node.proc_root, &args.node.pods_dir);
    let (mut sample, _) = collect(
        source.as_mut(),
        &scanner,
        StateSet::all(),
        args.node.all_netns,
    )?;
    sample.warnings.extend(fallback);
    for w in &sample.warnings {
        writeln!(err, "shimcheck: warning: {}", render::escape_control(w))?;
    }
    match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            snapshot::write(&sample, &mut w)?;
            w.flush()
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => {
            snapshot::write(&sample, out)?;
            out.flush()?;
        }
    }
    Ok(0)
}

/// The detector thresholds these arguments set.
pub fn detect_config(args: &PortsArgs) -> DetectConfig {
    DetectConfig {
        min_growth: args.min_growth,
        window: args.window.into(),
        idle_min_count: args.idle_min_count,
        idle_after: args.idle_after.into(),
        close_wait_min: args.close_wait_min,
    }
}

/// The terminal's width when stdout is one; `None` when piped.
pub fn terminal_width() -> Option<u16> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&stdout)
        .ok()
        .map(|w| w.ws_col)
        .filter(|&c| c > 0)
}
