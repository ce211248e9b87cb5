//! Least privilege, live: shimcheck as an unprivileged user (`setpriv`, uid 65534) holding
//! only the capabilities docs/deploy.md lists attributes every socket as root does; holding
//! fewer, its warning names the capability it lacks; and a procfs mounted `hidepid=invisible`
//! (in a mount namespace of the test's own) gives the right counts and says why owners are
//! missing.

use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::support::{Population, nobody_args};

const OWNER_CAPS: &str = "+sys_ptrace,+dac_read_search";

fn population() -> Population {
    Population::start(&json!({
        "servers": [
            {"name": "registry", "addr": "127.0.0.1", "port": 5000},
            {"name": "v6server", "addr": "::1", "port": 8443}
        ],
        "clients": [
            {"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 25},
            {"name": "v6client", "connect": "[::1]:8443", "count": 4}
        ]
    }))
}

/// `prefix` running shimcheck as `nobody_args(caps)`.
fn nobody(mut prefix: Command, caps: &str) -> Command {
    prefix.args(nobody_args(caps));
    prefix
}

/// A command running inside the population's namespace (`nsenter -t PID -n`), not yet named.
fn in_pop(pop: &Population) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pop.ns_pid.to_string(), "-n"]);
    c
}

fn json_of(out: &Output) -> Value {
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "shimcheck failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn warnings(report: &Value) -> Vec<String> {
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_capabilities_attribute_every_socket_as_root_does_in_every_grouping() {
    skip_unless_live!();
    let pop = population();
    for by in ["port", "process", "peer", "pair", "pod"] {
        let root = pop.report(&["--by", by, "--top", "0"]);
        let out = nobody(in_pop(&pop), OWNER_CAPS)
            .args(["ports", "-o", "json", "--by", by, "--top", "0"])
            .output()
            .unwrap();
        let capped = json_of(&out);
        assert_eq!(capped["totals"], root["totals"], "--by {by}");
        assert_eq!(capped["totals"]["unattributed"], 0, "--by {by}");
        assert_eq!(capped["groups"], root["groups"], "--by {by}");
        assert_eq!(warnings(&capped), Vec::<String>::new(), "--by {by}");
    }
}

#[test]
fn the_warning_names_the_capability_that_is_missing() {
    skip_unless_live!();
    let pop = population();
    let total = pop.report(&[])["totals"]["sockets"].clone();
    // (ambient capabilities, named as missing, not named)
    let cases = [
        ("", vec!["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"], vec![]),
        (
            "+dac_read_search",
            vec!["CAP_SYS_PTRACE"],
            vec!["CAP_DAC_READ_SEARCH"],
        ),
        (
            "+sys_ptrace",
            vec!["CAP_DAC_READ_SEARCH"],
            vec!["CAP_SYS_PTRACE"],
        ),
    ];
    for (caps, missing, held) in cases {
        let out = nobody(in_pop(&pop), caps)
            .args(["ports", "-o", "json"])
            .output()
            .unwrap();
        let report = json_of(&out);
        assert_eq!(
            report["totals"]["sockets"], total,
            "{caps}: counts stay right"
        );
        assert_eq!(report["totals"]["attributed"], 0, "{caps}");
        let w = warnings(&report);
        assert_eq!(w.len(), 1, "{caps}: {w:?}");
        assert!(w[0].contains("cannot read the open files"), "{caps}: {w:?}");
        for cap in missing {
            assert!(w[0].contains(cap), "{caps}: {cap} not named: {w:?}");
        }
        for cap in held {
            assert!(!w[0].contains(cap), "{caps}: {cap} is held: {w:?}");
        }
    }
}

#[test]
fn all_netns_needs_cap_sys_admin_too_and_says_so_without_it() {
    skip_unless_live!();
    let pop = population();
    let inode = pop.netns_inode();
    let mine = |report: &Value| -> Vec<Value> {
        report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["netns"]["inode"] == inode)
            .cloned()
            .collect()
    };
    let root = crate::support::shimcheck_json(&["ports", "--all-netns", "--top", "0"]);
    let args = ["ports", "--all-netns", "--top", "0", "-o", "json"];
    let sockets = |groups: &[Value]| {
        groups
            .iter()
            .map(|g| g["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        sockets(&mine(&root)),
        58,
        "both ends of 25 + 4 connections: {root}"
    );

    let capped = json_of(
        &nobody(Command::new("env"), &format!("{OWNER_CAPS},+sys_admin"))
            .args(args)
            .output()
            .unwrap(),
    );
    assert_eq!(mine(&capped), mine(&root));
    assert!(
        !warnings(&capped).iter().any(|w| w.contains("cannot dump")),
        "{:?}",
        warnings(&capped)
    );

    let without = json_of(
        &nobody(Command::new("env"), OWNER_CAPS)
            .args(args)
            .output()
            .unwrap(),
    );
    assert_eq!(
        mine(&without),
        Vec::<Value>::new(),
        "not entered, not counted"
    );
    let w = warnings(&without);
    let dump = w
        .iter()
        .find(|w| w.contains("cannot dump"))
        .unwrap_or_else(|| panic!("no warning about namespaces not dumped: {w:?}"));
    assert!(dump.contains("lacks CAP_SYS_ADMIN"), "{dump}");
}

#[test]
fn hidepid_invisible_keeps_the_counts_and_says_why_owners_are_missing() {
    skip_unless_live!();
    let pop = population();
    let root = pop.report(&[]);
    // A procfs of the test's own, mounted hidepid=invisible over /proc in a private mount
    // namespace: nothing outside the test sees it.
    let run = |caps: &str| -> Value {
        let line = nobody_args(caps).join(" ");
        let out = in_pop(&pop)
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t proc -o hidepid=invisible proc /proc && exec {line} ports -o json"
            ))
            .output()
            .unwrap();
        json_of(&out)
    };

    let hidden = run("");
    assert_eq!(hidden["totals"]["sockets"], root["totals"]["sockets"]);
    assert_eq!(hidden["totals"]["attributed"], 0);
    let w = warnings(&hidden);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("hidepid=invisible") && w[0].contains("CAP_SYS_PTRACE"),
        "{w:?}"
    );

    // CAP_SYS_PTRACE sees through hidepid: every owner, no warning.
    let seen = run(OWNER_CAPS);
    assert_eq!(seen["groups"], root["groups"]);
    assert_eq!(warnings(&seen), Vec::<String>::new());
}
