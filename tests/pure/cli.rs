//! The binary's contract: help, usage errors and runtime errors exit 2 with a message that
//! says what to do; none of these need root.

use assert_cmd::Command;
use predicates::prelude::*;

fn shimcheck() -> Command {
    Command::cargo_bin("shimcheck").unwrap()
}

#[test]
fn help_names_the_command_and_its_options() {
    shimcheck()
        .args(["ports", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--by"))
        .stdout(predicate::str::contains("--state"))
        .stdout(predicate::str::contains("netstat -anp"));
}

#[test]
fn an_unknown_state_is_a_usage_error_listing_the_valid_ones() {
    shimcheck()
        .args(["ports", "--state", "estab"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid value 'estab'"))
        .stderr(predicate::str::contains("close-wait"));
}

#[test]
fn an_unknown_grouping_is_a_usage_error() {
    shimcheck()
        .args(["ports", "--by", "color"])
        .assert()
        .code(2);
}

#[test]
fn a_missing_proc_root_is_a_runtime_error_that_says_what_failed() {
    shimcheck()
        .args(["ports", "--proc-root", "/nonexistent/proc"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::starts_with(
            "shimcheck: error: cannot list processes in /nonexistent/proc",
        ));
}

#[test]
fn json_output_is_one_document_with_the_contract_fields() {
    let out = shimcheck()
        .args(["ports", "-o", "json", "--state", "all"])
        .output()
        .unwrap();
    // 0 or 1: whatever this host's own sockets make the detector conclude, the report is whole.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["group_by"], "port");
    assert_eq!(v["states"].as_array().unwrap().len(), 11);
    for field in ["taken_at", "hostname", "totals", "groups", "warnings"] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    let t = &v["totals"];
    assert_eq!(
        t["sockets"].as_u64().unwrap(),
        t["attributed"].as_u64().unwrap() + t["unattributed"].as_u64().unwrap()
    );
}

/// A real snapshot of this host (any user may take one), as a JSON value to edit.
fn host_snapshot(dir: &std::path::Path) -> serde_json::Value {
    let path = dir.join("snap.json");
    shimcheck()
        .args(["snapshot", "-o", path.to_str().unwrap()])
        .assert()
        .success();
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn a_snapshot_from_a_newer_shimcheck_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = host_snapshot(dir.path());
    let newer = dir.path().join("newer.json");
    // Same shape, a newer number; then a shape this version cannot parse at all.
    doc["schema_version"] = 2.into();
    let reshaped = dir.path().join("reshaped.json");
    std::fs::write(&newer, doc.to_string()).unwrap();
    doc["sockets"] = serde_json::json!({"v4": doc["sockets"].clone()});
    doc["host"] = serde_json::json!("renamed");
    std::fs::write(&reshaped, doc.to_string()).unwrap();
    for file in [&newer, &reshaped] {
        shimcheck()
            .args(["ports", "--from", file.to_str().unwrap()])
            .assert()
            .code(2)
            .stdout("")
            .stderr(predicate::str::contains(
                "schema_version 2 document; this shimcheck reads shimcheck-snapshot \
                 schema_version 1: it was written by a newer shimcheck",
            ));
    }
}

#[test]
fn a_snapshot_file_of_several_gigabytes_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let doc = host_snapshot(dir.path());
    let big = dir.path().join("big.json");
    // A real document followed by 5 GiB of spaces (a sparse file: no disk is used): valid
    // JSON, and far more than any node's snapshot.
    std::fs::write(&big, doc.to_string()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    shimcheck()
        .args(["ports", "--from", big.to_str().unwrap()])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains(format!(
            "is {} bytes: shimcheck reads snapshots of up to {} bytes",
            5u64 << 30,
            shimcheck::snapshot::MAX_SNAPSHOT_BYTES
        )));
}

#[test]
fn a_snapshot_stream_that_does_not_end_is_refused_at_the_limit() {
    // A valid start, then spaces forever (a pipe, a device): read up to the limit, no further.
    let endless = std::io::Read::chain(
        &b"{\"schema_version\": 1, \"kind\": \"shimcheck-snapshot\""[..],
        std::io::repeat(b' '),
    );
    let err = shimcheck::snapshot::read_at_most(endless, "the pipe", 4096)
        .err()
        .unwrap();
    assert_eq!(
        format!("{err:#}"),
        "the pipe is more than 4096 bytes: shimcheck reads snapshots of up to 4096 bytes (1 \
         GiB, about four million sockets); is it a shimcheck snapshot?"
    );
}
