//! Stage 5, render as Prometheus metrics (`shimcheck serve`): a joined sample and its findings
//! → metric families with bounded labels → text format 0.0.4 or OpenMetrics, encoded by the
//! official client (`prometheus-client`, which escapes every label value).
//!
//! Input: a `Joined` sample, its findings, the detector thresholds and the sampler's own
//! health. Output: `Families`, then bytes. Pure: the clock is the sample's `taken_at`. Label
//! values are never pids, ephemeral ports or client addresses; `--max-series` bounds the
//! per-process families (docs/metrics.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::detect::{DetectConfig, Finding, Kind, Severity};
use crate::join::Joined;
use crate::model::{FD_NAMED_SHARE, Sample, TcpState};

mod counts;
pub use counts::SocketCounts;

/// `process` of sockets no visible process holds.
pub const UNATTRIBUTED: &str = "(unattributed)";
/// Every label of the series `--max-series` folds together.
pub const OTHER: &str = "other";
/// How many (source, destination) tuples `shimcheck_ephemeral_ports_used` shows.
pub const EPHEMERAL_TUPLES: usize = 10;

/// `Content-Type` of text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics 1.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of one series, in order.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family and its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The name; a counter's without `_total` (the encoders add it).
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
    pub series: Vec<(Labels, f64)>,
}

/// What `serve` knows about its own sampling, exported beside the node's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerHealth {
    pub interval: Duration,
    /// When the last successful sample was taken, and how long it took.
    pub last_sample: Option<(SystemTime, Duration)>,
    pub samples: u64,
    pub errors: u64,
}

/// The families one sample gives, before the sampler's health is added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Families(pub Vec<Family>);

fn gauge(name: &'static str, help: &'static str, series: Vec<(Labels, f64)>) -> Family {
    Family {
        name,
        help,
        counter: false,
        series,
    }
}

/// Snake-case state names for label values.
fn state_label(st: TcpState) -> &'static str {
    match st {
        TcpState::Established => "established",
        TcpState::SynSent => "syn_sent",
        TcpState::SynRecv => "syn_recv",
        TcpState::FinWait1 => "fin_wait1",
        TcpState::FinWait2 => "fin_wait2",
        TcpState::TimeWait => "time_wait",
        TcpState::Close => "close",
        TcpState::CloseWait => "close_wait",
        TcpState::LastAck => "last_ack",
        TcpState::Listen => "listen",
        TcpState::Closing => "closing",
    }
}

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Growth => "growth",
        Kind::Idle => "idle",
        Kind::CloseWait => "close_wait",
        Kind::PortExhaustion => "port_exhaustion",
        Kind::FdLimit => "fd_limit",
    }
}

fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

/// The `netns` label: the namespace's name, or `net:[INODE]`.
fn netns_label(sample: &Sample, netns: u64) -> String {
    sample
        .netns_names
        .get(&netns)
        .cloned()
        .unwrap_or_else(|| format!("net:[{netns}]"))
}

/// The `process` label of a socket whose lowest-pid holder is `pid` (each socket is counted
/// once, so `sum()` over processes is the socket count).
fn process_label(sample: &Sample, pid: Option<u32>) -> String {
    match pid {
        Some(pid) => sample
            .owners
            .processes
            .get(&pid)
            .map_or_else(|| "?".to_string(), |p| p.comm.clone()),
        None => UNATTRIBUTED.to_string(),
    }
}

/// Keeps at most `max` series: the largest, with the rest summed into series whose `fold`
/// labels are `other` (the other labels, all of bounded values, are kept).
fn cap(series: Vec<(Labels, f64)>, max: usize, fold: &[&str]) -> Vec<(Labels, f64)> {
    if series.len() <= max {
        return series;
    }
    let mut series = series;
    series.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let folded_key = |labels: &Labels| -> Labels {
        labels
            .iter()
            .map(|(k, v)| {
                let v = if fold.contains(k) {
                    OTHER.to_string()
                } else {
                    v.clone()
                };
                (*k, v)
            })
            .collect()
    };
    // The folded series count against the limit too.
    let mut keep = max.saturating_sub(1);
    loop {
        let others: FxHashSet<Labels> = series[keep..].iter().map(|s| folded_key(&s.0)).collect();
        if keep + others.len() <= max || keep == 0 {
            break;
        }
        keep -= 1;
    }
    let rest = series.split_off(keep);
    let mut others: BTreeMap<Labels, f64> = BTreeMap::new();
    for (labels, v) in rest {
        *others.entry(folded_key(&labels)).or_default() += v;
    }
    series.extend(others);
    series
}

/// The metric families of one sample and its findings, its sockets counted anew.
pub fn families(
    j: &Joined<'_>,
    findings: &[Finding],
    cfg: &DetectConfig,
    max_series: usize,
) -> Families {
    families_of(j.sample, &SocketCounts::new(j, cfg), findings, max_series)
}

/// The metric families of one sample, whose sockets `counts` counted (for a sample where
/// nothing moved but time, those of the last new one), and its findings: no pass over the
/// sockets.
pub fn families_of(
    sample: &Sample,
    counts: &SocketCounts,
    findings: &[Finding],
    max_series: usize,
) -> Families {
    let mut names: FxHashMap<u64, String> = FxHashMap::default();
    let mut netns = |ns: u64| {
        names
            .entry(ns)
            .or_insert_with(|| netns_label(sample, ns))
            .clone()
    };
    let mut connections: BTreeMap<Labels, f64> = BTreeMap::new();
    for (&(ns, pid, endpoint, server, state), n) in counts.connections() {
        let labels = vec![
            ("netns", netns(ns)),
            ("process", process_label(sample, pid)),
            ("endpoint", endpoint.to_string()),
            ("side", if server { "server" } else { "client" }.into()),
            ("state", state_label(state).into()),
        ];
        *connections.entry(labels).or_default() += f64::from(n);
    }
    let mut idle: BTreeMap<Labels, f64> = BTreeMap::new();
    for (&(ns, pid, endpoint), n) in counts.idle_now(sample.tcp_info_age_ms) {
        let labels = vec![
            ("netns", netns(ns)),
            ("process", process_label(sample, pid)),
            ("endpoint", endpoint.to_string()),
        ];
        *idle.entry(labels).or_default() += f64::from(n);
    }
    let mut totals: BTreeMap<Labels, f64> = BTreeMap::new();
    let mut unattributed: BTreeMap<Labels, f64> = BTreeMap::new();
    for ((ns, state), n, none) in counts.totals() {
        let labels = vec![("netns", netns(ns)), ("state", state_label(state).into())];
        *totals.entry(labels).or_default() += f64::from(n);
        if none > 0 {
            *unattributed.entry(vec![("netns", netns(ns))]).or_default() += f64::from(none);
        }
    }

    let mut out = vec![
        gauge(
            "shimcheck_connections",
            "TCP connections (ESTABLISHED, CLOSE_WAIT) per network namespace, owning process \
             name, service endpoint (side=client: the remote addr:port; side=server: the local \
             listening addr:port) and state, from the latest sample; each socket counted once.",
            cap(
                connections.into_iter().collect(),
                max_series,
                &["netns", "process", "endpoint"],
            ),
        ),
        gauge(
            "shimcheck_idle_connections",
            "ESTABLISHED connections that carried no data for at least --idle-after, per \
             network namespace, process name and service endpoint, from the latest sample.",
            cap(
                idle.into_iter().collect(),
                max_series,
                &["netns", "process", "endpoint"],
            ),
        ),
    ];

    let mut by_finding: BTreeMap<Labels, f64> = BTreeMap::new();
    for f in findings {
        let netns = f
            .netns
            .as_ref()
            .map(|n| {
                n.name
                    .clone()
                    .unwrap_or_else(|| format!("net:[{}]", n.inode))
            })
            .unwrap_or_default();
        let endpoint = f.service.clone().or_else(|| f.remote.clone());
        *by_finding
            .entry(vec![
                ("kind", kind_label(f.kind).into()),
                ("severity", severity_label(f.severity).into()),
                ("netns", netns),
                ("process", f.comm.clone()),
                ("endpoint", endpoint.unwrap_or_default()),
            ])
            .or_default() += f.count as f64;
    }
    out.push(gauge(
        "shimcheck_finding",
        "Sockets a current finding of the detector is about (docs/detection.md); the series \
         exists only while the finding holds.",
        cap(
            by_finding.into_iter().collect(),
            max_series,
            &["netns", "process", "endpoint"],
        ),
    ));

    // Processes at half their fd limit or more; per name, the one closest to its limit.
    let mut fds: BTreeMap<String, (f64, u64, u64)> = BTreeMap::new();
    for (pid, f) in &sample.host.fds {
        let Some(limit) = f.limit.filter(|_| f.at_least(FD_NAMED_SHARE)) else {
            continue;
        };
        let comm = sample
            .owners
            .processes
            .get(pid)
            .map_or_else(|| "?".to_string(), |p| p.comm.clone());
        let share = f.open as f64 / limit as f64;
        let e = fds.entry(comm).or_insert((share, f.open, limit));
        if share > e.0 {
            *e = (share, f.open, limit);
        }
    }
    let (open, max): (Vec<_>, Vec<_>) = fds
        .into_iter()
        .map(|(comm, (_, open, limit))| {
            let labels = vec![("process", comm)];
            ((labels.clone(), open as f64), (labels, limit as f64))
        })
        .unzip();
    out.push(gauge(
        "shimcheck_process_open_fds",
        "Open files of processes at half their RLIMIT_NOFILE or more (per name, the one \
         closest to its limit).",
        open,
    ));
    out.push(gauge(
        "shimcheck_process_max_fds",
        "RLIMIT_NOFILE (soft) of the processes in shimcheck_process_open_fds.",
        max,
    ));

    out.push(gauge(
        "shimcheck_ephemeral_ports_used",
        "Local ports used by connections from one source address to one destination \
         endpoint, for the busiest such tuples; compare with shimcheck_ephemeral_ports_range.",
        counts
            .busiest()
            .into_iter()
            .map(|((ns, src, dst), n)| {
                let labels = vec![
                    ("netns", netns(ns)),
                    ("source", src.to_string()),
                    ("endpoint", dst.to_string()),
                ];
                (labels, n as f64)
            })
            .collect(),
    ));
    out.push(gauge(
        "shimcheck_ephemeral_ports_range",
        "Size of net.ipv4.ip_local_port_range in shimcheck's own network namespace: the ports \
         one (source, destination) tuple can use.",
        sample
            .host
            .port_range
            .map(|(lo, hi)| {
                let labels = vec![("netns", netns(sample.own_netns))];
                (labels, f64::from(hi - lo) + 1.0)
            })
            .into_iter()
            .collect(),
    ));
    out.push(gauge(
        "shimcheck_sockets",
        "TCP sockets per network namespace and state, from the latest sample (the states \
         shimcheck serve dumps: listen, established, close_wait).",
        totals.into_iter().collect(),
    ));
    out.push(gauge(
        "shimcheck_unattributed_sockets",
        "ESTABLISHED and CLOSE_WAIT sockets no visible process holds (not root, or another \
         pid namespace), per network namespace.",
        unattributed.into_iter().collect(),
    ));
    Families(out)
}

/// The sampler's own families: health, cost and version.
fn health_families(h: &SamplerHealth) -> Vec<Family> {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let one = |v: f64| vec![(Vec::new(), v)];
    let mut out = Vec::new();
    if let Some((at, took)) = h.last_sample {
        out.push(gauge(
            "shimcheck_last_sample_timestamp_seconds",
            "When the latest successful sample was taken (Unix time); every other node metric \
             comes from that cached sample.",
            one(secs(at)),
        ));
        out.push(gauge(
            "shimcheck_sample_duration_seconds",
            "How long the latest successful sample took (dump, owner search, detection).",
            one(took.as_secs_f64()),
        ));
    }
    out.push(gauge(
        "shimcheck_sample_interval_seconds",
        "The --interval between samples.",
        one(h.interval.as_secs_f64()),
    ));
    out.push(Family {
        name: "shimcheck_samples",
        help: "Samples taken successfully since start.",
        counter: true,
        series: one(h.samples as f64),
    });
    out.push(Family {
        name: "shimcheck_sample_errors",
        help: "Samples that failed since start (the error is on shimcheck's stderr).",
        counter: true,
        series: one(h.errors as f64),
    });
    out.push(gauge(
        "shimcheck_build_info",
        "Always 1; the version label is shimcheck's version.",
        vec![(
            vec![("version", env!("CARGO_PKG_VERSION").to_string())],
            1.0,
        )],
    ));
    out
}

/// The families in a form the client library's registry encodes on demand.
#[derive(Debug)]
struct Exposition(Vec<Family>);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, value) in &f.series {
                let metric = family.encode_family(labels)?;
                if f.counter {
                    ConstCounter::new(*value).encode(metric)?;
                } else {
                    ConstGauge::new(*value).encode(metric)?;
                }
            }
        }
        Ok(())
    }
}

/// Both encodings of one publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// OpenMetrics 1.0, ending in `# EOF`.
    pub openmetrics: String,
    /// Text format 0.0.4 (what Prometheus asks for by default, and node_exporter's textfile
    /// collector reads).
    pub text: String,
}

/// Encodes the sample's families and the sampler's health.
pub fn encode(sample: &Families, health: &SamplerHealth) -> Result<Encoded, std::fmt::Error> {
    let mut all = sample.0.clone();
    all.extend(health_families(health));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(all.clone())));
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode(&mut openmetrics, &registry)?;
    Ok(Encoded {
        text: text_format(&openmetrics, &all)?,
        openmetrics,
    })
}

/// Text format 0.0.4 from the OpenMetrics exposition of the same families. The two differ, for
/// these families, only in what 0.0.4 lacks: `# EOF`, and a counter's `# HELP`/`# TYPE`
/// lines name its `_total` series (OpenMetrics names the family without the suffix, which
/// 0.0.4 parsers such as node_exporter's take for a different metric).
fn text_format(openmetrics: &str, families: &[Family]) -> Result<String, std::fmt::Error> {
    let counters: FxHashSet<&str> = families
        .iter()
        .filter(|f| f.counter)
        .map(|f| f.name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|rest| ("HELP", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)));
        match meta {
            Some((what, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    writeln!(out, "# {what} {name}_total {tail}")?;
                } else {
                    writeln!(out, "{line}")?;
                }
            }
            None => writeln!(out, "{line}")?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(process: &str, side: &str, v: f64) -> (Labels, f64) {
        (
            vec![("process", process.to_string()), ("side", side.to_string())],
            v,
        )
    }

    #[test]
    fn max_series_keeps_the_largest_and_sums_the_rest_into_other() {
        let all = vec![
            series("a", "client", 1.0),
            series("b", "client", 50.0),
            series("c", "server", 2.0),
            series("d", "client", 30.0),
            series("e", "server", 3.0),
        ];
        let kept = cap(all.clone(), 4, &["process"]);
        assert_eq!(kept.len(), 4, "{kept:?}");
        let total: f64 = kept.iter().map(|s| s.1).sum();
        assert_eq!(total, 86.0, "folding keeps the sum: {kept:?}");
        assert!(kept.contains(&series("b", "client", 50.0)));
        assert!(kept.contains(&series("d", "client", 30.0)));
        // Two folded series (one per side), so only two of the originals fit.
        assert!(kept.contains(&series(OTHER, "client", 1.0)), "{kept:?}");
        assert!(kept.contains(&series(OTHER, "server", 5.0)), "{kept:?}");
        assert_eq!(
            cap(all.clone(), 5, &["process"]),
            all,
            "under the limit: untouched"
        );
        assert_eq!(
            cap(all, 1, &["process"]).len(),
            2,
            "never fewer than the folded ones"
        );
    }

    #[test]
    fn text_format_names_counters_by_their_total_series_and_has_no_eof() {
        let health = SamplerHealth {
            interval: Duration::from_secs(15),
            last_sample: None,
            samples: 7,
            errors: 1,
        };
        let e = encode(&Families::default(), &health).unwrap();
        assert!(e.openmetrics.ends_with("# EOF\n"));
        assert!(e.openmetrics.contains("# TYPE shimcheck_samples counter\n"));
        assert!(e.openmetrics.contains("\nshimcheck_samples_total 7.0\n"));
        assert!(!e.text.contains("# EOF"));
        assert!(e.text.contains("# TYPE shimcheck_samples_total counter\n"));
        assert!(e.text.contains("# HELP shimcheck_sample_errors_total "));
        assert!(e.text.contains("\nshimcheck_sample_errors_total 1.0\n"));
        assert!(
            e.text
                .contains("# TYPE shimcheck_sample_interval_seconds gauge\n")
        );
        assert!(!e.text.contains("shimcheck_last_sample_timestamp_seconds"));
    }

    #[test]
    fn label_values_from_the_host_are_escaped() {
        let fam = Families(vec![gauge(
            "shimcheck_connections",
            "help",
            vec![(vec![("process", "evil\"}\n\\x".to_string())], 1.0)],
        )]);
        let health = SamplerHealth {
            interval: Duration::from_secs(1),
            last_sample: None,
            samples: 0,
            errors: 0,
        };
        let e = encode(&fam, &health).unwrap();
        assert!(
            e.text
                .contains("shimcheck_connections{process=\"evil\\\"}\\n\\\\x\"} 1"),
            "{}",
            e.text
        );
    }
}
