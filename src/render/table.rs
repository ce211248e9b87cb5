//! Stage 5, render as a table: the report for a person at a terminal, largest group first,
//! owners as `name(pid)`, listening ports marked, a footer with what `--top` left out.

use std::io::{self, Write};

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};

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
    let trends = report.groups.iter().any(|g| g.trend.is_some());
    if trends {
        header.push("TREND");
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

    let mut rows: Vec<Vec<String>> = report
        .groups
        .iter()
        .map(|g| {
            let mut cells = row(g, changes, multi_state, color);
            if trends {
                let at = cells.len() - usize::from(multi_state) - tail_cells(report.group_by);
                cells.insert(at, g.trend.clone().unwrap_or_default());
            }
            if placed {
                let other = cells.pop().unwrap_or_default();
                cells.push(placements(&g.processes));
                cells.push(other);
            }
            cells
        })
        .collect();
    let mut header: Vec<String> = header.into_iter().map(str::to_string).collect();
    if let Some(w) = width {
        fit(&mut header, &mut rows, usize::from(w));
    }
    let count_col = header.iter().position(|h| h == "CONNS");
    let mut table = Table::new();
    // Never wrapped: a cell split across lines is what made the table unreadable; `fit` made
    // it narrow enough instead.
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    for cells in rows {
        table.add_row(cells);
    }
    if let Some(col) = count_col.and_then(|c| table.column_mut(c)) {
        col.set_cell_alignment(CellAlignment::Right);
    }
    table
}

/// Columns left out first when a terminal is too narrow, least needed first.
const DROPPABLE: [&str; 6] = [
    "POD / UNIT",
    "STATES",
    "SINCE START",
    "TREND",
    "COMMAND",
    "OTHER END ON THIS HOST",
];
/// Columns whose cells may be shortened (with `…`, keeping the pid) to fit.
const SHORTENABLE: [&str; 6] = [
    "HELD BY",
    "OTHER END ON THIS HOST",
    "COMMAND",
    "PROCESS",
    "POD / UNIT",
    "REMOTE ADDRESS:PORT",
];
/// The narrowest a shortened column gets.
const MIN_SHORTENED: usize = 12;
/// How narrow lists get before any column is left out.
const SOFT_SHORTENED: usize = 32;

/// The width a cell takes on screen (colour codes take none).
fn cell_width(cell: &str) -> usize {
    textwrap::core::display_width(cell)
}

/// Makes the table at most `width` columns wide, one line per row: first leaves out the least
/// needed columns, then shortens the names in the widest shortenable ones.
fn fit(header: &mut Vec<String>, rows: &mut [Vec<String>], width: usize) {
    let widths = |header: &[String], rows: &[Vec<String>]| -> Vec<usize> {
        (0..header.len())
            .map(|i| {
                rows.iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| cell_width(c))
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    };
    // Each cell has a blank either side; the last one's right blank is trimmed.
    let total = |w: &[usize]| w.iter().map(|w| w + 2).sum::<usize>().saturating_sub(1);
    // Long lists shortened to a readable width first, then the least needed columns left out,
    // then the lists shortened down to their narrowest.
    shrink(header, rows, width, SOFT_SHORTENED, &widths, &total);
    for name in DROPPABLE {
        if total(&widths(header, rows)) <= width {
            return;
        }
        if let Some(i) = header.iter().position(|h| h == name) {
            header.remove(i);
            for r in rows.iter_mut() {
                if i < r.len() {
                    r.remove(i);
                }
            }
        }
    }
    shrink(header, rows, width, MIN_SHORTENED, &widths, &total);
}

type Widths<'a> = dyn Fn(&[String], &[Vec<String>]) -> Vec<usize> + 'a;

/// Shortens the widest shortenable column, again and again, until the table fits `width` or
/// none is wider than `floor`.
fn shrink(
    header: &[String],
    rows: &mut [Vec<String>],
    width: usize,
    floor: usize,
    widths: &Widths<'_>,
    total: &dyn Fn(&[usize]) -> usize,
) {
    let mut w = widths(header, rows);
    while total(&w) > width {
        let widest = (0..header.len())
            .filter(|&i| SHORTENABLE.contains(&header[i].as_str()) && w[i] > floor)
            .max_by_key(|&i| w[i]);
        let Some(i) = widest else {
            // Nothing left to shorten: the identity and the counts stay whole.
            return;
        };
        let target = w[i]
            .saturating_sub(total(&w) - width)
            .max(floor)
            .max(header[i].chars().count());
        if target >= w[i] {
            return;
        }
        // A command line's parentheses are not a pid.
        let names = header[i] != "COMMAND";
        for r in rows.iter_mut() {
            if let Some(cell) = r.get_mut(i) {
                *cell = shorten(cell, target, names);
            }
        }
        w = widths(header, rows);
    }
}

/// A cell cut to `max` columns with `…`: a list keeps the whole items that fit (`registry(2811)
/// 40, …`); with `names`, a single `name(pid)` keeps its pid (`image-cri-s…(27720)`).
fn shorten(cell: &str, max: usize, names: bool) -> String {
    if cell_width(cell) <= max {
        return cell.to_string();
    }
    // Whole list items first.
    let items: Vec<&str> = cell.split(", ").collect();
    let mut kept = String::new();
    for item in &items {
        let next = if kept.is_empty() {
            item.to_string()
        } else {
            format!("{kept}, {item}")
        };
        if cell_width(&next) + ", …".len() > max {
            break;
        }
        kept = next;
    }
    if !kept.is_empty() {
        return format!("{kept}, …");
    }
    // One name: shorten it, keeping `(pid)` and what follows (a count).
    let first = items.first().copied().unwrap_or(cell);
    let is_pid = |tail: &str| {
        tail.strip_prefix('(')
            .and_then(|t| t.split_once(')'))
            .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Some(open) = first.rfind('(').filter(|&o| names && is_pid(&first[o..])) {
        let tail = &first[open..];
        let room = max.saturating_sub(cell_width(tail) + 1);
        if room > 0 {
            let head: String = first[..open].chars().take(room).collect();
            return format!("{head}…{tail}");
        }
    }
    let head: String = cell.chars().take(max.saturating_sub(1)).collect();
    format!("{head}…")
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

/// The cells `row` puts after the change and state columns: the holders (or the command
/// line) and the other ends, except for pairs, whose PROCESS column names the holder.
fn tail_cells(by: GroupBy) -> usize {
    match by {
        GroupBy::Pair => 1,
        _ => 2,
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

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn shortening_keeps_whole_names_and_the_pid() {
        assert_eq!(shorten("registry(2811)", 20, true), "registry(2811)");
        assert_eq!(
            shorten("image-cri-shim(2811249)", 16, true),
            "image-…(2811249)"
        );
        assert_eq!(
            shorten("image-cri-shim(2811249) 12", 19, true),
            "image-…(2811249) 12"
        );
        assert_eq!(
            shorten("gunicorn(300), gunicorn(301), gunicorn(302)", 20, true),
            "gunicorn(300), …"
        );
        // A command line's parentheses are not a pid.
        assert_eq!(shorten("python3 -c print(1)", 12, false), "python3 -c …");
    }
}
