//! Stage 5, render as JSON: the report, schema_version 1 (docs/json.md), for scripts and `jq`.

use std::io::{self, Write};

use serde::Serialize;

use crate::aggregate::Report;

/// Writes the report as pretty-printed JSON and a newline, its groups materialized or spelled
/// out one at a time as they are written (`aggregate::LazyGroups`). Strings from the host are
/// left as they are: JSON escaping already makes control characters harmless.
pub fn render<G: Serialize>(report: &Report<G>, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    out.write_all(b"\n")
}
