//! Stage 5, render as JSON: the report, schema_version 1 (docs/json.md), for scripts and `jq`.

use std::io::{self, Write};

use crate::aggregate::Report;

/// Writes the report as pretty-printed JSON and a newline. Strings from the host are left as
/// they are: JSON escaping already makes control characters harmless.
pub fn render(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    out.write_all(b"\n")
}
