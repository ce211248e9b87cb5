//! Stage 5, render: a `Report` → bytes on a `Write`, as a table for people (`table`) or JSON
//! for scripts (`json`), and warnings for stderr. Renderers never print directly, so tests
//! render into a `Vec<u8>`.

pub mod json;
pub mod metrics;
pub mod table;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;

use crate::model::Warning;

/// Writes each warning as `shimcheck: warning: SENTENCE`, escaped: the one place warnings are
/// printed.
pub fn print_warnings<'a>(
    err: &mut dyn io::Write,
    warnings: impl IntoIterator<Item = &'a Warning>,
) -> io::Result<()> {
    for w in warnings {
        writeln!(
            err,
            "shimcheck: warning: {}",
            escape_control(&w.to_string())
        )?;
    }
    Ok(())
}

/// The warnings a loop (`--watch`, `serve`) has printed: each is printed once, however many
/// samples repeat it.
#[derive(Debug, Default)]
pub struct WarnedOnce(Vec<Warning>);

impl WarnedOnce {
    /// Prints those of `warnings` not printed before.
    pub fn print_new(&mut self, err: &mut dyn io::Write, warnings: &[Warning]) -> io::Result<()> {
        let new: Vec<Warning> = warnings
            .iter()
            .filter(|w| !self.0.contains(w))
            .cloned()
            .collect();
        self.0.extend(new.iter().cloned());
        print_warnings(err, &new)
    }
}

/// Makes a string from the host safe for a terminal: control characters (C0, DEL, C1) become
/// `\x1b`-style escapes, so a process named with escape codes cannot repaint the screen.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_prints_each_warning_once() {
        let mut warned = WarnedOnce::default();
        let a = Warning::Recorded("a\x1b[31m".into());
        let b = Warning::Recorded("b".into());
        let mut err = Vec::new();
        warned
            .print_new(&mut err, std::slice::from_ref(&a))
            .unwrap();
        warned.print_new(&mut err, &[a, b]).unwrap();
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "shimcheck: warning: a\\x1b[31m\nshimcheck: warning: b\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("registry"), "registry");
        assert_eq!(escape_control("evil\x1b[31m"), "evil\\x1b[31m");
        assert_eq!(escape_control("a\tb\u{7f}\u{9b}"), "a\\x09b\\x7f\\x9b");
        assert_eq!(escape_control("καλά"), "καλά");
    }
}
