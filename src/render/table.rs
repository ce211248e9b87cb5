//! Stage 5, render as a table: the report for a person at a terminal, largest group first,
//! owners as `name(pid)`, listening ports marked, a footer with what `--top` left out.

use std::io::{self, Write};

use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table, Width, presets};

use super::escape_control;
use crate::aggregate::{Group, GroupBy, GroupKey, OwnerCount, Report};
use crate::detect::{Finding, Severity};
use crate::model::TcpState;

/// How many owners a cell names before it says "+N more".
const OWNERS_SHOWN: usize = 3;

/// How a table is drawn for where it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// The terminal's columns: the table and the findings are fitted to them. `None` (a pipe)
    /// never wraps.
    pub width: Option<u16>,
    /// Severities and growth in colour (a terminal, and no `NO_COLOR`; `--color`).
    pub color: bool,
}

impl From<Option<u16>> for Style {
    /// Fitted to `width`, in no colour.
    fn from(width: Option<u16>) -> Style {
        Style {
            width,
            color: false,
        }
    }
}

/// SGR sequences: bold red, yellow, and back to normal.
const RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// `text` in `sgr` when `color`.
fn paint(text: &str, sgr: &str, color: bool) -> String {
    if color {
        format!("{sgr}{text}{RESET}")
    } else {
        text.to_string()
    }
}

/// Writes the table, then the footer (warnings are the caller's, for stderr), drawn for
/// `style`: fitted to its width, in colour or not.
pub fn render(report: &Report, out: &mut dyn Write, style: impl Into<Style>) -> io::Result<()> {
    let style = style.into();
    let width = style.width;
    let states = if report.states.len() == TcpState::ALL.len() {
        "all states".to_string()
    } else {
        let names: Vec<&str> = report.states.iter().map(|s| s.name()).collect();
        names.join(", ")
    };
    if report.groups.is_empty() {
        writeln!(out, "no TCP sockets match ({states})")?;
    } else {
        // comfy-table pads every cell; trailing blanks only get in the way of grep and diff.
        for line in build(report, width, style.color).lines() {
            writeln!(out, "{}", line.trim_end())?;
        }
    }
    let shown = report.groups.len();
    if shown < report.total_groups {
        writeln!(
            out,
            "... {} more groups not shown (--top 0 shows all {})",
            report.total_groups - shown,
            report.total_groups
        )?;
    }
    let t = report.totals;
    let sockets = if t.sockets == 1 { "socket" } else { "sockets" };
    writeln!(
        out,
        "{} {sockets} ({states}): {} attributed to a process, {} unattributed",
        t.sockets, t.attributed, t.unattributed
    )?;
    if let Some(t) = &report.baseline_taken_at {
        writeln!(out, "changes are since the baseline snapshot taken at {t}")?;
    }
    render_findings(&report.findings, out, style)
}

/// The detector's conclusions, most severe first, each with what to do: on a terminal wrapped
/// at word boundaries with a hanging indent, severities in colour.
pub fn render_findings(
    findings: &[Finding],
    out: &mut dyn Write,
    style: impl Into<Style>,
) -> io::Result<()> {
    let style = style.into();
    if findings.is_empty() {
        return Ok(());
    }
    let n = findings.len();
    writeln!(out, "\n{n} finding{}:", if n == 1 { "" } else { "s" })?;
    for f in findings {
        let severity = match f.severity {
            Severity::Critical => paint("CRITICAL", RED, style.color),
            Severity::Warning => paint("WARNING", YELLOW, style.color),
        };
        let kind = serde_json::to_value(f.kind).ok();
        let kind = kind.as_ref().and_then(|k| k.as_str()).unwrap_or("?");
        let message = format!("{severity} {kind}: {}", escape_control(&f.message));
        write_wrapped(out, &message, "  ", "    ", style.width)?;
        if let Some(fix) = &f.remediation {
            let fix = format!("fix: {}", escape_control(fix));
            write_wrapped(out, &fix, "    ", "      ", style.width)?;
        }
    }
    Ok(())
}

/// One paragraph, wrapped to `width` at word boundaries (a word longer than a line, such as a
/// long address, is broken only then), or on one line when piped.
fn write_wrapped(
    out: &mut dyn Write,
    text: &str,
    first: &str,
    rest: &str,
    width: Option<u16>,
) -> io::Result<()> {
    let Some(width) = width else {
        return writeln!(out, "{first}{text}");
    };
    // Spaces only: `image-cri-shim` and `10.0.0.101:5000` are never cut at a hyphen or dot.
    let options = textwrap::Options::new(usize::from(width).max(20))
        .initial_indent(first)
        .subsequent_indent(rest)
        .word_separator(textwrap::WordSeparator::AsciiSpace)
        .word_splitter(textwrap::WordSplitter::NoHyphenation);
    for line in textwrap::wrap(text, options) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn build(report: &Report, width: Option<u16>, color: bool) -> Table {
    let multi_state = report.states.len() > 1;
    let mut header: Vec<&str> = match report.group_by {
        GroupBy::Port => vec!["LOCAL ADDRESS:PORT", "SIDE", "CONNS"],
        GroupBy::Process => vec!["PROCESS", "CONNS"],
        GroupBy::Peer => vec!["REMOTE ADDRESS:PORT", "CONNS"],
        GroupBy::Pair => vec!["PROCESS", "REMOTE ADDRESS:PORT", "CONNS"],
        GroupBy::Pod => vec!["POD / UNIT", "CONNS"],
    };
    let changes = Changes::of(report);
    match changes {
        Changes::None => {}
        Changes::SinceBaseline => header.push("SINCE BASELINE"),
        Changes::Watch => header.extend(["CHANGE", "SINCE START"]),
    }
    if multi_state {
        header.push("STATES");
    }
    match report.group_by {
        GroupBy::Process => header.push("COMMAND"),
        // The PROCESS column already says who holds a pair's sockets.
        GroupBy::Pair => {}
        _ => header.push("HELD BY"),
    }
    // Pods and units, where this node has them: how an operator names the holders.
    let placed = report.group_by != GroupBy::Pod
        && report
            .groups
            .iter()
            .flat_map(|g| &g.processes)
            .any(|o| o.pod.is_some() || o.unit.is_some());
    if placed {
        header.push("POD / UNIT");
    }
    header.push("OTHER END ON THIS HOST");

    let command_col = header.iter().position(|&h| h == "COMMAND");
    let mut widest_word: Vec<usize> = header.iter().map(|h| longest_word(h)).collect();
    let mut widest_cell: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_header(header);
    match width {
        Some(w) => {
            table
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(w);
        }
        None => {
            table.set_content_arrangement(ContentArrangement::Disabled);
        }
    }
    for g in &report.groups {
        let mut cells = row(g, changes, multi_state, color);
        if placed {
            let other = cells.pop().unwrap_or_default();
            cells.push(placements(&g.processes));
            cells.push(other);
        }
        for ((word, whole), cell) in widest_word.iter_mut().zip(&mut widest_cell).zip(&cells) {
            *word = (*word).max(longest_word(cell));
            *whole = (*whole).max(cell.chars().count());
        }
        table.add_row(cells);
    }
    let count_col = match report.group_by {
        GroupBy::Port => 2,
        GroupBy::Pair => 2,
        _ => 1,
    };
    if let Some(col) = table.column_mut(count_col) {
        col.set_cell_alignment(CellAlignment::Right);
    }
    // A narrow terminal split `10.0.0.101:33101` into `10.0.0.101:3310` and `1`, and
    // `registry(2811)` into `registry(28` and `11)`: the group's identity and numbers are never
    // wrapped, and where the width allows, the lists after them wrap between words only. Only
    // a command line, any length, may always break a word.
    let changes_cols = match changes {
        Changes::None => 0,
        Changes::SinceBaseline => 1,
        Changes::Watch => 2,
    };
    let fixed = |i: usize| i <= count_col + changes_cols;
    let pad = |i: usize| {
        table
            .column(i)
            .map_or(0, |c| usize::from(c.padding_width()))
    };
    let needed: usize = (0..widest_word.len())
        .map(|i| {
            pad(i)
                + match i {
                    i if fixed(i) => widest_cell[i],
                    i if Some(i) == command_col => 0,
                    i => widest_word[i],
                }
        })
        .sum();
    // render() trims the last column's right padding.
    let whole_words = width.is_some_and(|w| needed.saturating_sub(1) <= usize::from(w));
    for (i, w) in widest_word.into_iter().enumerate() {
        let Some(col) = table.column_mut(i) else {
            continue;
        };
        if fixed(i) {
            col.set_constraint(ColumnConstraint::ContentWidth);
        } else if whole_words && Some(i) != command_col {
            // A boundary counts the cell's padding too.
            let w = u16::try_from(w).unwrap_or(u16::MAX);
            let w = w.saturating_add(col.padding_width());
            col.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(w)));
        }
    }
    table
}

/// The length of the longest whitespace-separated word in a cell, in characters.
fn longest_word(text: &str) -> usize {
    text.split_whitespace()
        .map(|w| w.chars().count())
        .max()
        .unwrap_or(0)
}

/// Which change columns a report has: none, its change since a baseline, or (watch) since
/// the previous sample and since the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changes {
    None,
    SinceBaseline,
    Watch,
}

impl Changes {
    fn of(report: &Report) -> Changes {
        if report.sample.is_some() {
            Changes::Watch
        } else if report.baseline_taken_at.is_some() {
            Changes::SinceBaseline
        } else {
            Changes::None
        }
    }
}

/// A change: growth `+N` (in yellow with `color`: what a leak looks like), a fall, or `-`.
fn signed(d: Option<i64>, color: bool) -> String {
    match d {
        Some(d) if d > 0 => paint(&format!("+{d}"), YELLOW, color),
        Some(d) => d.to_string(),
        None => "-".to_string(),
    }
}

fn row(g: &Group, changes: Changes, multi_state: bool, color: bool) -> Vec<String> {
    let mut cells = match &g.what {
        GroupKey::Port { listening, .. } => vec![
            escape_control(&g.key).into_owned(),
            if *listening { "server" } else { "client" }.to_string(),
            g.count.to_string(),
        ],
        // `127.0.0.1:* -> 127.0.0.1:5000`: one ephemeral port per socket, so CONNS ports.
        GroupKey::Folded { .. } => vec![
            escape_control(&g.key).into_owned(),
            "client".to_string(),
            g.count.to_string(),
        ],
        GroupKey::Process { pid, comm, .. } => {
            vec![proc_name(*pid, comm.as_deref()), g.count.to_string()]
        }
        GroupKey::Peer { .. } => vec![escape_control(&g.key).into_owned(), g.count.to_string()],
        GroupKey::Place { .. } => vec![escape_control(&g.key).into_owned(), g.count.to_string()],
        GroupKey::Pair {
            pid,
            comm,
            remote_addr,
            remote_port,
            ..
        } => {
            // The key's endpoint carries the namespace (`@kube-system/etcd-master1`) with
            // `--all-netns`; rebuilt from the address alone, two namespaces' rows looked alike.
            let holder = match (pid, comm) {
                (Some(pid), Some(comm)) => format!("{comm}({pid}) -> "),
                _ => "(unattributed) -> ".to_string(),
            };
            let remote = match g.key.strip_prefix(&holder) {
                Some(endpoint) => escape_control(endpoint).into_owned(),
                None if remote_addr.contains(':') => format!("[{remote_addr}]:{remote_port}"),
                None => format!("{remote_addr}:{remote_port}"),
            };
            vec![
                proc_name(*pid, comm.as_deref()),
                remote,
                g.count.to_string(),
            ]
        }
    };
    match changes {
        Changes::None => {}
        Changes::SinceBaseline => cells.push(signed(g.delta_total, color)),
        Changes::Watch => cells.extend([signed(g.delta, color), signed(g.delta_total, color)]),
    }
    if multi_state {
        let st: Vec<String> = g.states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        cells.push(st.join(", "));
    }
    match &g.what {
        GroupKey::Pair { .. } => {}
        GroupKey::Process { cmdline, .. } => {
            cells.push(escape_control(cmdline.as_deref().unwrap_or("-")).into_owned())
        }
        _ => cells.push(owners(&g.processes, g.count)),
    }
    cells.push(owners(&g.peer_processes, g.count));
    cells
}

/// `kube-system/etcd-master1`, `image-cri-shim.service`: the holders' pods or units, each once.
fn placements(list: &[OwnerCount]) -> String {
    let mut names: Vec<String> = Vec::new();
    for o in list {
        let name = match (&o.pod, &o.unit) {
            (Some(p), _) => format!("{}/{}", p.namespace, p.name),
            (None, Some(u)) => u.clone(),
            (None, None) => continue,
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return "-".to_string();
    }
    let more = names.len().saturating_sub(OWNERS_SHOWN);
    names.truncate(OWNERS_SHOWN);
    let mut text = escape_control(&names.join(", ")).into_owned();
    if more > 0 {
        text.push_str(&format!(", +{more} more"));
    }
    text
}

fn proc_name(pid: Option<u32>, comm: Option<&str>) -> String {
    match (pid, comm) {
        (Some(pid), Some(comm)) => format!("{}({pid})", escape_control(comm)),
        _ => "(unattributed)".to_string(),
    }
}

/// `registry(2811)`, or with counts where owners hold different shares:
/// `registry(2811) 40, sshd(12) 3, +2 more`.
fn owners(list: &[OwnerCount], group_count: usize) -> String {
    if list.is_empty() {
        return "-".to_string();
    }
    let all_hold_all = list.iter().all(|o| o.count == group_count);
    let mut parts: Vec<String> = list
        .iter()
        .take(OWNERS_SHOWN)
        .map(|o| {
            let name = format!("{}({})", escape_control(&o.comm), o.pid);
            if all_hold_all {
                name
            } else {
                format!("{name} {}", o.count)
            }
        })
        .collect();
    if list.len() > OWNERS_SHOWN {
        parts.push(format!("+{} more", list.len() - OWNERS_SHOWN));
    }
    parts.join(", ")
}
