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
