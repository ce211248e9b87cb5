//! Watch mode (`shimcheck ports --watch`): the sampling loop, the only place that sleeps.
//!
//! Each sample: one socket dump, the owner map brought up to date incrementally
//! (`procs::OwnerCache`), the report with each group's change since the previous and the
//! first sample, and the detector run over the window of samples (`detect::History`). Output:
//! a screen redrawn in place on a terminal, one block per sample when piped, JSON Lines with
//! `-o json`. Ends after `--count` samples or on Ctrl-C, with a summary of what grew.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustc_hash::FxHashMap;

use crate::aggregate::Query;
use crate::aggregate::{self, GroupCounts, GroupKey, KeptGroups, Report};
use crate::cli::{Output, PortsArgs};
use crate::collect::events::Edits;
use crate::detect::{DetectConfig, Digest};
use crate::detect::{History, MIN_RISES};
use crate::join::Joined;
use crate::join::Topology;
use crate::model::{Moved, Sample};
use crate::render;
use crate::sample::{Look, Mode, Sampler, Taken};

/// Groups the end-of-watch summary names, those that grew most.
const SUMMARY_GROWERS: usize = 10;

/// Runs the loop; returns the number of findings in the last sample.
pub fn run(args: &PortsArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<usize> {
    let query = args.query()?;
    let cfg = args.detect_config();
    let interval: Duration = args.interval.into();
    if interval.is_zero() {
        bail!("--interval must be longer than 0 (try 500ms, 5s or 1m)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // The handler also wakes this thread, which sleeps between samples until the next one
    // is due or a signal comes: no polling.
    let sleeper = std::thread::current();
    ctrlc::set_handler(move || {
        flag.store(true, Ordering::SeqCst);
        sleeper.unpark();
    })
    .context("cannot install the Ctrl-C handler")?;

    let mut sampler = Sampler::open(&args.node, Mode::Incremental);
    let mut state = State {
        history: History::new(cfg.window, MIN_RISES),
        first: None,
        previous: None,
        kept: None,
        groups: KeptGroups::default(),
        digest: None,
    };
    let redraw = args.output == Output::Table && std::io::stdout().is_terminal();
    let style = crate::table_style(args);
    // Like top: the terminal's alternate screen, redrawn in place; the summary goes to the
    // normal screen once it is left.
    let screen = if redraw {
        Some(Screen::enter(out)?)
    } else {
        None
    };
    let mut warned = render::WarnedOnce::default();
    let mut trends = Trends::new(utf8_locale());
    let started = Instant::now();
    let mut n = 0u64;
    let last = loop {
        n += 1;
        let tick = Instant::now();
        // A new sample replaces the last: drop it first, never hold two.
        let look = sampler.look(query.states, || state.kept.take().map(|k| k.sample.sockets))?;
        let mut report = match look {
            Look::New(taken) => state.full(taken, &query, &cfg, &mut sampler),
            Look::Same(moved) => match state.kept.take() {
                Some(kept) => state.same(kept, moved, &query, &cfg, &mut sampler),
                // No sample to reuse yet (the first look always dumps): take one.
                None => {
                    let taken = sampler.sample(query.states)?;
                    state.full(taken, &query, &cfg, &mut sampler)
                }
            },
        };
        report.sample = Some(n);
        if args.output == Output::Table {
            trends.update(&mut report);
        }
        report.elapsed_s = Some((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        warned.print_new(err, &report.warnings)?;
        match args.output {
            Output::Json => {
                serde_json::to_writer(&mut *out, &report)?;
                out.write_all(b"\n")?;
            }
            Output::Table => {
                let title = format!(
                    "shimcheck ports --watch: sample {n}, {} after the first, every {}",
                    human_secs(report.elapsed_s.unwrap_or(0.0)),
                    humantime::format_duration(interval)
                );
                if screen.is_some() {
                    let frame = frame(&report, &title, style, crate::terminal_height())?;
                    // Home, each line over the last frame's (cleared to its end), then the rest
                    // of the screen cleared: no blank flash between frames.
                    out.write_all(b"\x1b[H")?;
                    out.write_all(frame.join("\x1b[K\n").as_bytes())?;
                    out.write_all(b"\x1b[K\x1b[J")?;
                } else {
                    writeln!(out, "{title}")?;
                    render::table::render(&report, out, style)?;
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        if args.count.is_some_and(|c| n >= c) || stop.load(Ordering::SeqCst) {
            break report;
        }
        while !stop.load(Ordering::SeqCst) {
            match interval.checked_sub(tick.elapsed()) {
                Some(left) if !left.is_zero() => std::thread::park_timeout(left),
                _ => break,
            }
        }
        if stop.load(Ordering::SeqCst) {
            break report;
        }
    };
    out.flush()?;
    drop(screen);
    // The summary is for people; JSON Lines stay one object per sample.
    let summary_to: &mut dyn Write = if args.output == Output::Json {
        err
    } else {
        out
    };
    // JSON Lines: the summary goes to stderr, plain.
    let summary_style = if args.output == Output::Json {
        render::table::Style::default()
    } else {
        style
    };
    summary(&last, n, started.elapsed(), summary_to, summary_style)?;
    Ok(last.findings.len())
}

/// Samples a group's sparkline spans.
const TREND_SAMPLES: usize = 8;

/// Each shown group's size over the last samples, drawn as a sparkline on a terminal.
struct Trends {
    counts: FxHashMap<String, VecDeque<usize>>,
    bars: &'static [char],
}

impl Trends {
    fn new(utf8: bool) -> Trends {
        Trends {
            counts: FxHashMap::default(),
            bars: if utf8 {
                &['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█']
            } else {
                &['_', '.', '-', '~', '=', '+', '*', '#']
            },
        }
    }

    /// Adds this sample's counts and gives each group its sparkline; groups no longer shown
    /// are forgotten, so memory follows the screen.
    fn update(&mut self, report: &mut Report) {
        let mut next = FxHashMap::default();
        for g in &mut report.groups {
            let mut series = self.counts.remove(&g.key).unwrap_or_default();
            series.push_back(g.count);
            while series.len() > TREND_SAMPLES {
                series.pop_front();
            }
            g.trend = Some(spark(&series, self.bars));
            next.insert(g.key.clone(), series);
        }
        self.counts = next;
    }
}

/// The values as bars scaled between their minimum and maximum; a flat series is the lowest
/// bar throughout.
fn spark(values: &VecDeque<usize>, bars: &[char]) -> String {
    let lo = values.iter().copied().min().unwrap_or(0);
    let hi = values.iter().copied().max().unwrap_or(0);
    let top = bars.len() - 1;
    values
        .iter()
        .map(|&v| {
            let level = if hi == lo {
                0
            } else {
                (v - lo) * top / (hi - lo)
            };
            bars[level.min(top)]
        })
        .collect()
}

/// True when the locale's character set is UTF-8 (`LC_ALL`, else `LC_CTYPE`, else `LANG`).
fn utf8_locale() -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        })
}

/// The terminal's alternate screen, entered for the loop and left when dropped (at the end,
/// on an error, or on Ctrl-C), with the cursor shown again.
struct Screen;

impl Screen {
    fn enter(out: &mut dyn Write) -> std::io::Result<Screen> {
        out.write_all(b"\x1b[?1049h\x1b[?25l")?;
        out.flush()?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = stdout.flush();
    }
}

/// One screen of the watch view, `height` lines at most: the title and the table's header at
/// the top, as many of the largest groups as fit, the totals and the findings at the bottom.
fn frame(
    report: &Report,
    title: &str,
    style: render::table::Style,
    height: Option<u16>,
) -> std::io::Result<Vec<String>> {
    let mut shown = report.clone();
    if let Some(h) = height {
        let mut findings = Vec::new();
        render::table::render_findings(&report.findings, &mut findings, style)?;
        let findings = String::from_utf8_lossy(&findings).lines().count();
        // The title, the table's header, "... more groups", the totals, then the findings.
        let fixed = 4 + findings;
        shown
            .groups
            .truncate(usize::from(h).saturating_sub(fixed).max(1));
    }
    let mut text = Vec::new();
    writeln!(text, "{title}")?;
    render::table::render(&shown, &mut text, style)?;
    let mut lines: Vec<String> = String::from_utf8_lossy(&text)
        .lines()
        .map(str::to_string)
        .collect();
    // More findings than the screen holds: what does not fit is left out, never scrolled.
    if let Some(h) = height {
        lines.truncate(usize::from(h));
    }
    Ok(lines)
}

/// What the loop remembers between samples.
struct State {
    history: History,
    /// Every group's size in the first sample and in the previous one.
    first: Option<GroupCounts>,
    previous: Option<GroupCounts>,
    /// The last new sample: what a look that saw nothing move reuses.
    kept: Option<Kept>,
    /// The groups and the detector's digest of the last new sample, brought up to date where
    /// the sockets lent by an event-kept table changed.
    groups: KeptGroups,
    digest: Option<Digest>,
}

/// A new sample, its topology, what its table wrote since its last lend, and its report.
struct Kept {
    sample: Sample,
    topology: Topology,
    edits: Option<Box<Edits>>,
    report: Report,
}

impl State {
    /// The report of a new sample, every stage run. Where the collector aged tcp_info clocks
    /// instead of reading them, those a growth finding is judged by are read again through
    /// `sampler` first.
    fn full(
        &mut self,
        taken: Taken,
        query: &Query,
        cfg: &DetectConfig,
        sampler: &mut Sampler,
    ) -> Report {
        let Taken {
            mut sample,
            topology,
            edits,
        } = taken;
        let joined = Joined::with_topology_of(&sample, &topology);
        let (mut report, counts) = self.groups.report(&joined, query, edits.as_deref(), true);
        let counts = counts.unwrap_or_default();
        let base = self.first.get_or_insert_with(|| counts.clone());
        // The first sample is its own baseline: every change is 0, and every field is there.
        aggregate::annotate_deltas(
            &mut report,
            Some(self.previous.as_ref().unwrap_or(base)),
            base,
        );
        self.previous = Some(counts);
        // The history counts the digest's pairs: no second pass.
        let mut digest =
            Digest::update(self.digest.take(), &joined, &self.groups, edits.as_deref());
        self.history
            .observe_digest(&digest, &joined, &self.groups, edits.as_deref());
        drop(joined);
        // Clocks brought forward by a reuse (`tcp_info_age_ms`) are exact: nothing moved.
        if sample.tcp_info_age_ms == 0 {
            let wanted = self.history.clocks_wanted(&digest, cfg);
            if !wanted.is_empty() {
                sampler.fresh_clocks(&mut sample, &wanted);
                digest.recount(&Joined::with_topology_of(&sample, &topology), &wanted);
            }
        }
        self.digest = Some(digest);
        let kept = Kept {
            sample,
            topology,
            edits,
            report,
        };
        self.judge(kept, cfg)
    }

    /// The report when the collector saw nothing move: the last sample's groups, none changed
    /// since, and the findings judged again at this time from the detector's digest, without
    /// a pass over the sockets. If a holder exited, the owners changed: every stage runs
    /// again on the same sockets.
    fn same(
        &mut self,
        mut kept: Kept,
        moved: Moved,
        query: &Query,
        cfg: &DetectConfig,
        sampler: &mut Sampler,
    ) -> Report {
        // The report's warnings stay: the collector's and the last full scan's are the same.
        if kept.sample.apply(moved) {
            let Kept {
                sample,
                topology,
                edits,
                ..
            } = kept;
            let taken = Taken {
                sample,
                topology,
                edits,
            };
            return self.full(taken, query, cfg, sampler);
        }
        self.history.observe_same(kept.sample.taken_at);
        kept.report.taken_at = aggregate::rfc3339(kept.sample.taken_at);
        for g in &mut kept.report.groups {
            g.delta = Some(0);
        }
        self.judge(kept, cfg)
    }

    /// Fills in the findings and keeps the sample for the next look.
    fn judge(&mut self, mut kept: Kept, cfg: &DetectConfig) -> Report {
        if let Some(digest) = &self.digest {
            kept.report.findings = digest.findings(&kept.sample, Some(&self.history), cfg);
        }
        let report = kept.report.clone();
        self.kept = Some(kept);
        report
    }
}

/// What grew between the first and the last sample, and the last sample's findings.
fn summary(
    report: &Report,
    samples: u64,
    elapsed: Duration,
    out: &mut dyn Write,
    style: render::table::Style,
) -> std::io::Result<()> {
    writeln!(
        out,
        "\nwatched {samples} samples over {}:",
        human_secs(elapsed.as_secs_f64())
    )?;
    let mut grew: Vec<_> = report
        .groups
        .iter()
        .filter(|g| g.delta_total.is_some_and(|d| d > 0))
        .collect();
    if grew.is_empty() {
        writeln!(out, "  no group shown grew")?;
    }
    // The top growers (client ports come folded, as in the table).
    grew.sort_by_key(|g| std::cmp::Reverse(g.delta_total));
    let more = grew.len().saturating_sub(SUMMARY_GROWERS);
    for g in grew.into_iter().take(SUMMARY_GROWERS) {
        let d = g.delta_total.unwrap_or(0);
        let start = g.count as i64 - d;
        // Folded client ports share their key with other holders' rows: name the holder.
        let holder = match (&g.what, g.processes.first()) {
            (GroupKey::Folded { .. }, Some(o)) => format!(" ({}({}))", o.comm, o.pid),
            _ => String::new(),
        };
        writeln!(
            out,
            "  {}{}: {start} -> {} (+{d})",
            render::escape_control(&g.key),
            render::escape_control(&holder),
            g.count
        )?;
    }
    if more > 0 {
        writeln!(out, "  ... and {more} more groups grew")?;
    }
    if report.findings.is_empty() {
        writeln!(out, "  no finding in the last sample")?;
    } else {
        render::table::render_findings(&report.findings, out, style)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_between_the_least_and_the_most() {
        let rising: VecDeque<usize> = [30, 40, 50, 60, 70, 80, 90, 100].into_iter().collect();
        assert_eq!(spark(&rising, Trends::new(true).bars), "▁▂▃▄▅▆▇█");
        assert_eq!(spark(&rising, Trends::new(false).bars), "_.-~=+*#");
        let flat: VecDeque<usize> = [5, 5, 5].into_iter().collect();
        assert_eq!(spark(&flat, Trends::new(true).bars), "▁▁▁");
    }
}
