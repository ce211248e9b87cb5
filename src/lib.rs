//! shimcheck as a library: the pipeline behind the binary, so tests drive it directly.
//!
//! sample (collect sockets ∥ find their owners in /proc) → join (owners, same-host peers,
//! listeners) → aggregate (groups) → detect (findings) → render (table, JSON, metrics).
//! `sample` is the only stage that touches the OS; every later stage is pure. This file is the
//! front: the modules, and one entry point per command.

pub mod aggregate;
pub mod atomic;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod collect;
pub mod culprits;
pub mod detect;
pub mod join;
mod keyed;
pub mod model;
pub mod privilege;
pub mod procs;
pub mod render;
pub mod sample;
pub mod serve;
pub mod snapshot;
pub mod watch;

use std::io::{IsTerminal, Write};

use crate::aggregate::{Query, Report};
use crate::cli::{Output, PortsArgs, SnapshotArgs};
use crate::join::Joined;
use crate::model::{Sample, StateSet};
use crate::sample::{Mode, Sampler, Taken};

/// Joins and aggregates a sample: the pure half of `shimcheck ports`.
pub fn ports_report(sample: &Sample, query: &Query) -> Report {
    aggregate::aggregate(&Joined::new(sample), query)
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
    let query = args.query()?;
    let (sample, topology) = match &args.from {
        Some(path) => (snapshot::read(path)?, None),
        None => {
            let Taken {
                sample, topology, ..
            } = Sampler::open(&args.node, Mode::OneShot).sample(query.states)?;
            (sample, Some(topology))
        }
    };
    let joined = match topology {
        Some(t) => Joined::with_topology(&sample, t),
        None => Joined::new(&sample),
    };
    let cfg = args.detect_config();
    if args.output == Output::Json && args.baseline.is_none() {
        // Written as the groups are spelled out: `--by pair` at a million sockets has half a
        // million groups, each with its holders' names and command lines.
        let mut report = aggregate::aggregate_streamed(&joined, &query);
        report.findings = detect::findings(&joined, None, &cfg);
        render::print_warnings(err, &report.warnings)?;
        render::json::render(&report, out)?;
        out.flush()?;
        return Ok(report.findings.len());
    }
    let mut report = aggregate::aggregate(&joined, &query);
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
            let mut h = detect::History::against_baseline();
            h.observe(&base_joined);
            h.observe(&joined);
            Some(h)
        }
        None => None,
    };
    report.findings = detect::findings(&joined, history.as_ref(), &cfg);
    render::print_warnings(err, &report.warnings)?;
    match args.output {
        Output::Json => render::json::render(&report, out)?,
        Output::Table => render::table::render(&report, out, table_style(args))?,
    }
    out.flush()?;
    Ok(report.findings.len())
}

/// Runs `shimcheck snapshot`: one full sample, every state, as a JSON document.
pub fn run_snapshot(
    args: &SnapshotArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<usize> {
    let Taken { sample, .. } = Sampler::open(&args.node, Mode::OneShot).sample(StateSet::all())?;
    render::print_warnings(err, &sample.warnings)?;
    match &args.output {
        Some(path) => snapshot::write_file(&sample, path)?,
        None => {
            snapshot::write(&sample, out)?;
            out.flush()?;
        }
    }
    Ok(0)
}

/// Runs `shimcheck completion SHELL`: the completion script, generated from the command line
/// definition itself (clap_complete), so it never lags behind the options.
pub fn run_completion(shell: cli::CompletionShell, out: &mut dyn Write) -> anyhow::Result<usize> {
    use clap::CommandFactory;
    let mut cmd = cli::Cli::command();
    let shell = match shell {
        cli::CompletionShell::Bash => clap_complete::Shell::Bash,
        cli::CompletionShell::Zsh => clap_complete::Shell::Zsh,
        cli::CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "shimcheck", out);
    out.flush()?;
    Ok(0)
}

/// Runs `shimcheck man`: the manual page in roff, with a page section per subcommand's options
/// (clap_mangen), plus exit status and files.
pub fn run_man(out: &mut dyn Write) -> anyhow::Result<usize> {
    use clap::CommandFactory;
    let cmd = cli::Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        writeln!(page, ".SH \"SHIMCHECK {}\"", sub.get_name().to_uppercase())?;
        if let Some(about) = sub.get_about() {
            writeln!(page, "{}", roff_text(&about.to_string()))?;
        }
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut page)?;
    }
    page.extend_from_slice(MAN_TAIL.as_bytes());
    man.render_version_section(&mut page)?;
    out.write_all(ascii_roff(&String::from_utf8_lossy(&page)).as_bytes())?;
    out.flush()?;
    Ok(0)
}

/// Roff without raw UTF-8, which `man` reads as Latin-1 garbage: each other character as its
/// `\[uXXXX]` escape (the help's arrows, the bullets clap_mangen writes).
fn ascii_roff(page: &str) -> String {
    let mut out = String::with_capacity(page.len());
    for c in page.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    out
}

/// The man page's hand-written sections.
const MAN_TAIL: &str = r#".SH "EXIT STATUS"
.TP
.B 0
success, no finding (also when the output pipe closes early, as with head)
.TP
.B 1
success, at least one finding (in watch mode: in the last sample)
.TP
.B 2
usage or runtime error; the message says what happened and what to do
.SH FILES
.TP
.I /proc
sockets' holders (/proc/PID/fd), the namespaces' TCP counters (/proc/PID/net)
.TP
.I /var/log/pods
pod names, read by --pods-dir
.SH "SEE ALSO"
.BR ss (8),
.BR netstat (8),
.BR lsof (8)
"#;

/// Text safe to put on a roff line: a leading dot or quote would be read as a request.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// How `ports`' tables are drawn: fitted to the terminal stdout is, coloured per `--color`.
pub(crate) fn table_style(args: &PortsArgs) -> render::table::Style {
    let terminal = std::io::stdout().is_terminal();
    render::table::Style {
        width: terminal_width(),
        color: args
            .color
            .colored(terminal, std::env::var_os("NO_COLOR").as_deref()),
    }
}

/// The terminal's rows when stdout is one; `None` when piped.
pub(crate) fn terminal_height() -> Option<u16> {
    terminal_size().map(|w| w.ws_row).filter(|&r| r > 0)
}

/// The terminal's width when stdout is one; `None` when piped.
pub(crate) fn terminal_width() -> Option<u16> {
    terminal_size().map(|w| w.ws_col).filter(|&c| c > 0)
}

/// The size of the terminal stdout is, if it is one.
fn terminal_size() -> Option<rustix::termios::Winsize> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    rustix::termios::tcgetwinsize(&stdout).ok()
}
