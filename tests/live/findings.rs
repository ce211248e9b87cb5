//! Live detector tests that need no time series: idle pile-ups and CLOSE_WAIT seen in one
//! look, snapshots that analyse like the live node, exit statuses. Each test makes its own
//! network namespace (root, CI).

use serde_json::{Value, json};

use crate::support::{PATIENCE, Population, wait_until};

fn findings(report: &Value) -> &Vec<Value> {
    report["findings"].as_array().unwrap()
}

#[test]
fn an_idle_pile_up_is_flagged_in_one_look_and_exits_1() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "pool-app", "connect": "127.0.0.1:5000", "count": 60}]
    }));
    // Quiet before the threshold: nothing is idle for 2 s yet.
    let out = pop.shimcheck(&["ports", "--idle-after", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Then idle for 2 s: wait until all 60 are (a finding that needs 60 idle sockets), however
    // long a loaded machine takes, and look with the default threshold (50).
    wait_until("60 connections idle for 2 s", PATIENCE, || {
        let out = pop.shimcheck(&["ports", "--idle-after", "2s", "--idle-min-count", "60"]);
        out.status.code() == Some(1)
    });
    let out = pop.shimcheck(&["ports", "-o", "json", "--idle-after", "2s"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = findings(&report);
    assert_eq!(
        f.len(),
        1,
        "the registry's ends are the mirror, not a second finding: {f:#?}"
    );
    assert_eq!(f[0]["kind"], "idle");
    assert_eq!(f[0]["pid"], pop.pid("pool-app"));
    assert_eq!(f[0]["remote"], "127.0.0.1:5000");
    assert_eq!(f[0]["count"], 60);
    assert!(f[0]["idle_s_min"].as_u64().unwrap() >= 2);
    let msg = f[0]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "the other ends are held by registry({})",
            pop.pid("registry")
        )),
        "{msg}"
    );

    // The table shows the same finding after the groups.
    let out = pop.shimcheck(&["ports", "--idle-after", "2s"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("1 finding:") && table.contains("WARNING idle: pool-app("),
        "{table}"
    );
}

#[test]
fn a_close_wait_pile_up_is_flagged_whatever_state_is_shown() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "hangup", "addr": "127.0.0.1", "port": 7000, "close_accepted": true}],
        "clients": [{"name": "never-closes", "connect": "127.0.0.1:7000", "count": 60}]
    }));
    // The default view shows ESTABLISHED only; the CLOSE_WAIT sockets are still looked at.
    let report = pop.report(&[]);
    assert_eq!(report["totals"]["sockets"], 0);
    let f = findings(&report);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["kind"], "close-wait");
    assert_eq!(f[0]["pid"], pop.pid("never-closes"));
    assert_eq!(f[0]["count"], 60);
    assert_eq!(f[0]["remote"], "127.0.0.1:7000");
}

#[test]
fn a_snapshot_analysed_elsewhere_gives_the_live_report() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [
            {"name": "registry", "addr": "127.0.0.1", "port": 5000},
            {"name": "v6server", "addr": "::1", "port": 8443}
        ],
        "clients": [
            {"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 30},
            {"name": "v6client", "connect": "[::1]:8443", "count": 4}
        ]
    }));
    let dir = std::env::temp_dir().join(format!("shimcheck-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("snap.json");
    let out = pop.shimcheck(&["snapshot", "-o", snap.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for by in ["port", "process", "peer", "pair"] {
        let live = pop.report(&["--top", "0", "--by", by]);
        // Read outside the namespace: a snapshot needs nothing of the node it came from.
        let from = crate::support::shimcheck_json(&[
            "ports",
            "--top",
            "0",
            "--by",
            by,
            "--from",
            snap.to_str().unwrap(),
        ]);
        for field in ["groups", "totals", "hostname", "findings"] {
            assert_eq!(live[field], from[field], "--by {by}: {field} differs");
        }
    }
    let doc: Value = serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
    assert_eq!(doc["schema_version"], 1);
    let s = &doc["sockets"].as_array().unwrap()[0];
    for field in [
        "state", "local", "remote", "inode", "cookie", "owners", "tcp_info",
    ] {
        assert!(s.get(field).is_some(), "snapshot socket lacks {field}: {s}");
    }
    assert!(doc["host"]["port_range"].is_array());
    assert!(!doc["host"]["fds"].as_object().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_quiet_node_exits_0_and_a_bad_snapshot_exits_2() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "srv", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "cli", "connect": "127.0.0.1:5000", "count": 5}]
    }));
    assert_eq!(pop.shimcheck(&["ports"]).status.code(), Some(0));
    let bogus = std::env::temp_dir().join(format!("shimcheck-bogus-{}.json", std::process::id()));
    std::fs::write(&bogus, b"{\"schema_version\": 7}").unwrap();
    let out = crate::support::shimcheck_cmd(&["ports", "--from", bogus.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("is not a shimcheck snapshot"), "{stderr}");
    std::fs::remove_file(&bogus).unwrap();
}
