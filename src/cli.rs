//! Stage 0, the command line: the clap structs (their doc comments are the `--help` text) and
//! the one place where arguments become configuration: the `Query` groups are built by, the
//! detector's `DetectConfig`, the table's default length.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Parser, Subcommand, ValueEnum};

use crate::aggregate::{GroupBy, Query};
use crate::detect::DetectConfig;
use crate::model::{StateSet, TcpState};

/// Rows the table shows when `--top` is not given.
pub const DEFAULT_TABLE_TOP: usize = 20;
/// `--window` of `ports` (watch, baseline) when not given: a terminal session's span.
pub const PORTS_WINDOW: Duration = Duration::from_secs(5 * 60);
/// `--window` of `serve` when not given: long enough to see a leak of one connection every
/// five minutes (image-cri-shim on one node) reach `--min-growth`.
pub const SERVE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Where `serve` listens when neither `--listen` nor `--textfile` is given: loopback only, on a
/// port past the Prometheus exporter range 9100-9999, which is fully allocated (docs/deploy.md).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10188";

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
    /// Sample the node every --interval and serve Prometheus metrics, the latest report and a
    /// health check over HTTP, and/or write the metrics for node_exporter's textfile collector.
    Serve(ServeArgs),
    /// Print a completion script for SHELL (bash, zsh, fish): e.g. `shimcheck completion bash
    /// > /etc/bash_completion.d/shimcheck`.
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff): `shimcheck man > /usr/local/share/man/man1/shimcheck.1`.
    Man,
}

/// When the table is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

impl ColorWhen {
    /// Whether to colour output going to a terminal (`terminal`), given the value of
    /// `NO_COLOR` (no-color.org: set and not empty means no colour unless asked for).
    pub fn colored(self, terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
        match self {
            ColorWhen::Always => true,
            ColorWhen::Never => false,
            ColorWhen::Auto => terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }
}

/// The shells `shimcheck completion` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
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

    /// Read socket owners through /proc even where the BPF fd walk could be loaded (it needs
    /// CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN, and a kernel with BTF, 5.8+).
    #[arg(long)]
    pub no_bpf: bool,
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
    #[arg(
        long = "state",
        value_name = "STATE",
        default_value = "established",
        value_parser = STATE_NAMES
    )]
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

    /// `--by port`, table: show every ephemeral client port as a row of its own, as netstat's
    /// `$4` does, instead of one row per (local address, holder, remote endpoint).
    #[arg(long, conflicts_with = "fold")]
    pub no_fold: bool,

    /// `--by port`, JSON: fold the client ends on ephemeral ports into one group per (local
    /// address, holder, remote endpoint), as the table does. Without it, JSON keeps a group
    /// per local address:port.
    #[arg(long)]
    pub fold: bool,

    /// Colour severities and growth in the table: auto (on a terminal, unless the NO_COLOR
    /// environment variable is set), always, never. JSON is never coloured.
    #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
    pub color: ColorWhen,

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

    #[command(flatten)]
    pub detect: DetectArgs,
}

/// The detector's thresholds, shared by `ports` and `serve`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Detection")]
pub struct DetectArgs {
    /// Growth: flag a (process, remote) pair whose ESTABLISHED count rose by at least N
    /// within --window while keeping its sockets.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub min_growth: usize,

    /// Growth: the span growth is judged over (500ms, 5s, 1m ...). Default: 5m for `ports`,
    /// 1h for `serve`.
    #[arg(long, value_name = "DUR")]
    pub window: Option<humantime::Duration>,

    /// Idle: flag at least N ESTABLISHED sockets from one process to one remote endpoint ...
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub idle_min_count: usize,

    /// ... each carrying no data for at least this long (tcp_info).
    #[arg(long, value_name = "DUR", default_value = "5m")]
    pub idle_after: humantime::Duration,

    /// CLOSE_WAIT: flag a process holding at least N CLOSE_WAIT sockets (whatever --state shows).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub close_wait_min: usize,
}

impl DetectArgs {
    /// The detector configuration, with `window` where `--window` is not given.
    pub fn config(&self, window: Duration) -> DetectConfig {
        DetectConfig {
            min_growth: self.min_growth,
            window: self.window.map_or(window, Into::into),
            idle_min_count: self.idle_min_count,
            idle_after: self.idle_after.into(),
            close_wait_min: self.close_wait_min,
        }
    }
}

impl PortsArgs {
    /// The query `shimcheck ports` runs for these arguments.
    pub fn query(&self) -> anyhow::Result<Query> {
        Ok(Query {
            group_by: self.by,
            states: parse_states(&self.states)?,
            port: self.port,
            pid: self.pid,
            process: self.process.clone(),
            top: match (self.top, self.output) {
                (Some(n), _) => Some(n),
                (None, Output::Table) => Some(DEFAULT_TABLE_TOP),
                (None, Output::Json) => None,
            },
            // People read folded client ports; scripts get netstat's $4 unless they ask.
            fold: match self.output {
                Output::Table => !self.no_fold,
                Output::Json => self.fold,
            },
        })
    }

    /// The detector thresholds these arguments set.
    pub fn detect_config(&self) -> DetectConfig {
        self.detect.config(PORTS_WINDOW)
    }
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

/// Options of `shimcheck serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Time between samples (5s, 15s, 1m ...). Scrapes read the latest sample; they never
    /// trigger one.
    #[arg(long, value_name = "DUR", default_value = "15s")]
    pub interval: humantime::Duration,

    /// Serve GET /metrics, /report and /healthz on ADDR:PORT. Default: 127.0.0.1:10188, unless
    /// only --textfile is given (then no port is opened).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// After each sample, write the metrics (text format 0.0.4) to PATH for node_exporter's
    /// textfile collector: written beside it, then renamed over it.
    #[arg(long, value_name = "PATH")]
    pub textfile: Option<PathBuf>,

    /// At most N `shimcheck_connections` series: the largest are kept, the rest are summed
    /// into process="other".
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub max_series: usize,

    /// Include process command lines in /report (they can carry passwords and tokens).
    #[arg(long)]
    pub report_cmdline: bool,

    #[command(flatten)]
    pub node: NodeArgs,

    #[command(flatten)]
    pub detect: DetectArgs,
}

impl ServeArgs {
    /// Where to listen: `--listen`, else the default unless only `--textfile` was asked for.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match (self.listen, &self.textfile) {
            (Some(addr), _) => Ok(Some(addr)),
            (None, Some(_)) => Ok(None),
            (None, None) => Ok(Some(DEFAULT_LISTEN.parse()?)),
        }
    }

    /// The detector thresholds these arguments set.
    pub fn detect_config(&self) -> DetectConfig {
        self.detect.config(SERVE_WINDOW)
    }
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
