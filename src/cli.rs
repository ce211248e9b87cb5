//! Stage 0, the command line: clap derive structs only. Their doc comments are the `--help`
//! text; `lib.rs` turns them into a `Query`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::aggregate::GroupBy;

/// Find TCP connection leaks on a Linux node: which local ports hold how many connections,
/// and which processes hold both ends. Exit status: 0 no finding, 1 at least one finding,
/// 2 usage or runtime error.
#[derive(Debug, Parser)]
#[command(name = "shimcheck", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Count connections per local address:port (or process, peer, process → peer), with the
    /// processes holding each end. Like `netstat -anp | grep ESTABLISHED | awk '{print $4}' |
    /// sort | uniq -c | sort -n` followed by `lsof -i :PORT`, in one pass.
    Ports(PortsArgs),
    /// Write one full sample (every socket with its holders, cookies and idle times, plus the
    /// host facts the detector uses) as JSON, to analyse elsewhere with `ports --from`.
    Snapshot(SnapshotArgs),
}

/// Where to look on the node: shared by every command that collects.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The procfs to scan for socket owners, e.g. /host/proc from inside a container.
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// The kubelet's pod log directory, whose `<namespace>_<name>_<uid>` entries name pods.
    #[arg(long, value_name = "DIR", default_value = "/var/log/pods")]
    pub pods_dir: PathBuf,

    /// Every network namespace on the node (pods, host services, `ip netns`), not only
    /// shimcheck's own; needs root to enter them.
    #[arg(long)]
    pub all_netns: bool,
}

/// Options of `shimcheck snapshot`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    /// Write the snapshot to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub node: NodeArgs,
}

/// Options of `shimcheck ports`.
#[derive(Debug, Clone, clap::Args)]
pub struct PortsArgs {
    /// Group by local address:port, owning process, remote address:port, process → remote, or
    /// pod (host processes by systemd unit).
    #[arg(long, value_enum, default_value = "port")]
    pub by: GroupBy,

    /// Show sockets in this TCP state (repeatable), by ss's names, or `all`.
    #[arg(long = "state", value_name = "STATE", default_value = "established", value_parser = STATE_NAMES)]
    pub states: Vec<String>,

    /// Only sockets whose local or remote port is N.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,

    /// Only sockets held by this process id.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Only sockets held by a process with this exact name (`comm`, as `ps -o comm` shows).
    #[arg(long, value_name = "NAME")]
    pub process: Option<String>,

    /// Show the N largest groups; 0 shows all. Default: 20 in the table, all in JSON.
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,

    #[command(flatten)]
    pub node: NodeArgs,

    /// Report on a snapshot (`shimcheck snapshot`) instead of the live node.
    #[arg(long, value_name = "FILE", conflicts_with = "watch")]
    pub from: Option<PathBuf>,

    /// Report growth since an earlier snapshot: per-group change and growth findings.
    #[arg(long, value_name = "FILE", conflicts_with = "watch")]
    pub baseline: Option<PathBuf>,

    /// Sample again every --interval until --count samples or Ctrl-C, showing each group's
    /// change since the last sample and since the start; Ctrl-C prints what grew.
    #[arg(long, help_heading = "Watch")]
    pub watch: bool,

    /// Time between samples in --watch (500ms, 5s, 1m ...).
    #[arg(
        long,
        value_name = "DUR",
        default_value = "5s",
        requires = "watch",
        help_heading = "Watch"
    )]
    pub interval: humantime::Duration,

    /// Stop --watch after N samples.
    #[arg(long, value_name = "N", requires = "watch", help_heading = "Watch")]
    pub count: Option<u64>,

    /// Growth: flag a (process, remote) pair whose ESTABLISHED count rose by at least N
    /// within --window while keeping its sockets.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        help_heading = "Detection"
    )]
    pub min_growth: usize,

    /// Growth: the span growth is judged over (500ms, 5s, 1m ...).
    #[arg(
        long,
        value_name = "DUR",
        default_value = "5m",
        help_heading = "Detection"
    )]
    pub window: humantime::Duration,

    /// Idle: flag at least N ESTABLISHED sockets from one process to one remote endpoint ...
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50,
        help_heading = "Detection"
    )]
    pub idle_min_count: usize,

    /// ... each carrying no data for at least this long (tcp_info).
    #[arg(
        long,
        value_name = "DUR",
        default_value = "5m",
        help_heading = "Detection"
    )]
    pub idle_after: humantime::Duration,

    /// CLOSE_WAIT: flag a process holding at least N CLOSE_WAIT sockets (whatever --state shows).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50,
        help_heading = "Detection"
    )]
    pub close_wait_min: usize,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document, schema_version 1 (docs/json.md).
    Json,
}

/// Accepted `--state` values: ss's state names plus `all`.
pub const STATE_NAMES: [&str; 12] = [
    "established",
    "syn-sent",
    "syn-recv",
    "fin-wait-1",
    "fin-wait-2",
    "time-wait",
    "close",
    "close-wait",
    "last-ack",
    "listen",
    "closing",
    "all",
];
