//! Watch mode (`shimcheck ports --watch`): the sampling loop, the only place that sleeps.
//!
//! Each sample: one socket dump, the owner map brought up to date incrementally
//! (`procs::OwnerCache`), the report with each group's change since the previous and the
//! first sample, and the detector run over the window of samples (`detect::History`). Output:
//! a screen redrawn in place on a terminal, one block per sample when piped, JSON Lines with
//! `-o json`. Ends after `--count` samples or on Ctrl-C, with a summary of what grew.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::aggregate::{self, GroupCounts, Report};
use crate::cli::{Output, PortsArgs};
use crate::collect::{self, SocketSource};
use crate::detect::{self, History, MIN_RISES};
use crate::join::{Joined, Topology};
use crate::model::{HostFacts, Sample, StateSet};
use crate::procs::{OwnerCache, ProcScanner};
use crate::render;

/// How often the sleep between samples checks for Ctrl-C.
const TICK: Duration = Duration::from_millis(50);

/// Takes one watch sample: the dump, then the owner map brought up to date.
pub fn sample(
    source: &mut (dyn SocketSource + Send),
    scanner: &ProcScanner,
    cache: &mut OwnerCache,
    states: StateSet,
    all_netns: bool,
) -> anyhow::Result<(Sample, Topology)> {
    let taken_at = SystemTime::now();
    let own = collect::netns::own(scanner.root()).unwrap_or(0);
    let dumped = crate::dump_sockets(source, scanner, states, all_netns, own).map_err(|e| {
        let hint = e.hint();
        anyhow::Error::new(e).context(format!("cannot list TCP sockets ({hint})"))
    })?;
    let topology = Topology::new(&dumped.sockets);
    let (owners, scan, fds, _) = cache
        .refresh(scanner, &dumped.sockets, crate::scan_threads())
        .with_context(|| format!("cannot list processes in {}", scanner.root().display()))?;
    let sample = Sample {
        taken_at,
        hostname: crate::hostname(),
        cgroup_places: crate::cgroup_places(
            scanner,
            std::path::Path::new(crate::SYS_FS_CGROUP),
            &dumped.sockets,
            &owners,
        ),
        netns_names: crate::name_namespaces(scanner, own, &dumped.targets),
        sockets: dumped.sockets,
        owners,
        scan,
        host: HostFacts {
            port_range: scanner.port_range(),
            fds,
        },
        warnings: dumped.warnings,
        own_netns: own,
    };
    Ok((sample, topology))
}

/// Runs the loop; returns the number of findings in the last sample.
pub fn run(args: &PortsArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<usize> {
    let query = crate::ports_query(args)?;
    let cfg = crate::detect_config(args);
    let interval: Duration = args.interval.into();
    if interval.is_zero() {
        bail!("--interval must be longer than 0 (try 500ms, 5s or 1m)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;

    let (mut source, fallback) = collect::open_default(&args.node.proc_root);
    if let Some(f) = &fallback {
        writeln!(err, "shimcheck: warning: {f}")?;
    }
    let scanner = ProcScanner::with_pods(&args.node.proc_root, &args.node.pods_dir);
    let mut cache = OwnerCache::new();
    let mut history = History::new(cfg.window, MIN_RISES);
    let redraw = args.output == Output::Table && std::io::stdout().is_terminal();
    let mut first: Option<GroupCounts> = None;
    let mut previous: Option<GroupCounts> = None;
    let mut warned: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    let last = loop {
        n += 1;
        let tick = Instant::now();
        let (sample, topology) = sample(
            source.as_mut(),
            &scanner,
            &mut cache,
            query.states,
            args.node.all_netns,
        )?;
        let joined = Joined::with_topology(&sample, topology);
        history.observe(&joined);
        let (mut report, counts) = aggregate::aggregate_with_counts(&joined, &query);
        let base = first.get_or_insert_with(|| counts.clone());
        // The first sample is its own baseline: every change is 0, and every field is there.
        aggregate::annotate_deltas(&mut report, Some(previous.as_ref().unwrap_or(base)), base);
        previous = Some(counts);
        report.sample = Some(n);
        report.elapsed_s = Some((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        report.findings = detect::findings(&joined, Some(&history), &cfg);
        for w in &report.warnings {
            if !warned.contains(w) {
                writeln!(err, "shimcheck: warning: {}", render::escape_control(w))?;
                warned.push(w.clone());
            }
        }
        match args.output {
            Output::Json => {
                serde_json::to_writer(&mut *out, &report)?;
                out.write_all(b"\n")?;
            }
            Output::Table => {
                if redraw {
                    // Home and clear: the screen shows the latest sample only, like `watch`.
                    out.write_all(b"\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "shimcheck ports --watch: sample {n}, {} after the first, every {}",
                    human_secs(report.elapsed_s.unwrap_or(0.0)),
                    humantime::format_duration(interval)
                )?;
                render::table::render(&report, out, crate::terminal_width())?;
                if !redraw {
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        if args.count.is_some_and(|c| n >= c) || stop.load(Ordering::SeqCst) {
            break report;
        }
        while tick.elapsed() < interval && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK.min(interval.saturating_sub(tick.elapsed())));
        }
        if stop.load(Ordering::SeqCst) {
            break report;
        }
    };
    // The summary is for people; JSON Lines stay one object per sample.
    let summary_to: &mut dyn Write = if args.output == Output::Json {
        err
    } else {
        out
    };
    summary(&last, n, started.elapsed(), summary_to)?;
    Ok(last.findings.len())
}

/// What grew between the first and the last sample, and the last sample's findings.
fn summary(
    report: &Report,
    samples: u64,
    elapsed: Duration,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "\nwatched {samples} samples over {}:",
        human_secs(elapsed.as_secs_f64())
    )?;
    let grew: Vec<_> = report
        .groups
        .iter()
        .filter(|g| g.delta_total.is_some_and(|d| d > 0))
        .collect();
    if grew.is_empty() {
        writeln!(out, "  no group shown grew")?;
    }
    for g in grew {
        let d = g.delta_total.unwrap_or(0);
        let start = g.count as i64 - d;
        writeln!(
            out,
            "  {}: {start} -> {} (+{d})",
            render::escape_control(&g.key),
            g.count
        )?;
    }
    if report.findings.is_empty() {
        writeln!(out, "  no finding in the last sample")?;
    } else {
        render::table::render_findings(&report.findings, out)?;
    }
    Ok(())
}

fn human_secs(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.1}m", s / 60.0)
    }
}
