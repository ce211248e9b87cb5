//! Fuzz target: the snapshot reader (`ports --from`, `--baseline`) on arbitrary documents, and
//! the report of whatever sample it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shimcheck::aggregate::{GroupBy, Query};
use shimcheck::model::StateSet;

fuzz_target!(|data: &[u8]| {
    if let Ok(sample) = shimcheck::snapshot::read_from(data, "fuzz input") {
        let query = Query {
            group_by: GroupBy::Pair,
            states: StateSet::all(),
            port: None,
            pid: None,
            process: None,
            top: None,
            fold: true,
        };
        let report = shimcheck::ports_report(&sample, &query);
        let _ = shimcheck::detect::findings(
            &shimcheck::join::Joined::new(&sample),
            None,
            &shimcheck::detect::DetectConfig::default(),
        );
        let _ = serde_json_len(&report);
    }
});

fn serde_json_len(report: &shimcheck::aggregate::Report) -> usize {
    let mut out = Vec::new();
    let _ = shimcheck::render::json::render(report, &mut out);
    out.len()
}
