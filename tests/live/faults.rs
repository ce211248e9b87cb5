//! Hostile hosts, live: hundreds of short-lived processes a second holding sockets while
//! shimcheck scans; shimcheck's own open-file limit at 32 (and far too low); sock_diag refused
//! by a seccomp filter, so that the /proc/net fallback runs for real. Each gives the right
//! answer or a clear error with exit 2, never a panic.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::{FORKER, Population, group_counts, refuse_syscall, shimcheck_bin};

/// The registry and its stable leaking client: what every run must count exactly, whatever
/// else happens on the node.
fn stable() -> Population {
    Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 40}]
    }))
}

/// The stable population's server row: its count and holder.
fn registry_row(report: &Value) -> (u64, String) {
    let g = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "127.0.0.1:5000")
        .unwrap_or_else(|| panic!("no 127.0.0.1:5000 group: {report}"));
    (
        g["count"].as_u64().unwrap(),
        g["processes"][0]["comm"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn processes_born_and_gone_by_the_hundred_during_scans_leave_the_rest_exact() {
    skip_unless_live!();
    let pop = stable();
    let forker = pop.script(FORKER);
    // The churn is real: the forker's processes come and go while shimcheck runs.
    let pids_before = pop
        .sh("cat /proc/loadavg")
        .split('/')
        .nth(1)
        .map(str::to_string);

    // The registry's row: 40 accepted, and its listener where every state is shown.
    let check = |report: &Value, what: &str, expected: u64| {
        let t = &report["totals"];
        assert_eq!(
            t["sockets"].as_u64().unwrap(),
            t["attributed"].as_u64().unwrap() + t["unattributed"].as_u64().unwrap(),
            "{what}: {t}"
        );
        assert_eq!(
            registry_row(report),
            (expected, "registry".to_string()),
            "{what}"
        );
    };
    for by in ["port", "process", "pair"] {
        for states in ["established", "all"] {
            let out = pop.shimcheck(&["ports", "-o", "json", "--by", by, "--state", states]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            if by == "port" {
                let expected = if states == "all" { 41 } else { 40 };
                check(&report, &format!("--state {states}"), expected);
            }
        }
    }
    // The incremental path (owner cache, slot reads) under the same churn.
    let mut samples = 0;
    let code = crate::support::watch(&pop, &["--interval", "300ms", "--count", "8"], |r, _| {
        samples += 1;
        check(r, &format!("watch sample {samples}"), 40);
    });
    assert!(matches!(code, Some(0 | 1)), "watch exited {code:?}");
    assert_eq!(samples, 8);

    drop(forker);
    let pids_after = pop
        .sh("cat /proc/loadavg")
        .split('/')
        .nth(1)
        .map(str::to_string);
    assert_ne!(pids_before, pids_after, "the forker did not fork");
}

#[test]
fn an_open_file_limit_of_32_gives_the_same_answer_and_a_tiny_one_a_clear_error() {
    skip_unless_live!();
    let pop = stable();
    let limited = |nofile: &str, args: &[&str]| {
        pop.command("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(shimcheck_bin())
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["ports", "-o", "json", "--top", "0"][..],
        &["ports", "-o", "json", "--top", "0", "--by", "pair"],
        &["ports", "-o", "json", "--top", "0", "--state", "all"],
    ] {
        let free = pop.report(&args[3..]);
        let out = limited("32", args);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["groups"], free["groups"], "{args:?}");
        assert_eq!(report["totals"], free["totals"], "{args:?}");
        assert_eq!(report["warnings"], free["warnings"], "{args:?}");
    }
    let mut samples = 0;
    let out = limited(
        "32",
        &[
            "ports",
            "--watch",
            "--interval",
            "200ms",
            "--count",
            "4",
            "-o",
            "json",
        ],
    );
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(registry_row(&r), (40, "registry".to_string()));
        samples += 1;
    }
    assert_eq!(samples, 4);

    let out = limited("5", &["ports"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("Too many open files"), "{stderr}");
    assert!(
        stderr.contains("ran out of file descriptors (its open-file limit is 5)"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn with_sock_diag_refused_by_seccomp_the_proc_net_fallback_counts_what_ss_counts() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [
            {"name": "registry", "addr": "127.0.0.1", "port": 5000},
            {"name": "v6server", "addr": "::1", "port": 8443},
            {"name": "hangup", "addr": "127.0.0.1", "port": 7000, "close_accepted": true}
        ],
        "clients": [
            {"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 30},
            {"name": "v6client", "connect": "[::1]:8443", "count": 5},
            {"name": "leaky-closer", "connect": "127.0.0.1:7000", "count": 6}
        ]
    }));
    let mut cmd = pop.command(shimcheck_bin().to_str().unwrap());
    cmd.args([
        "ports",
        "-o",
        "json",
        "--top",
        "0",
        "--no-fold",
        "--state",
        "all",
    ]);
    // As a locked-down container runtime would.
    refuse_syscall(&mut cmd, libc::SYS_socket, Some(libc::AF_NETLINK as u32));
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = report["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("falling back to /proc/net/tcp and tcp6")),
        "the fallback ran and said so: {warnings:?}"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // The same population through ss (sock_diag, no filter): per local endpoint, every state.
    let ours = group_counts(&report);
    let theirs: BTreeMap<String, u64> = pop
        .sh("ss -Htan | awk '{print $4}' | sort | uniq -c")
        .lines()
        .filter_map(|l| {
            let (n, key) = l.trim().split_once(' ')?;
            Some((key.to_string(), n.parse().ok()?))
        })
        .collect();
    assert_eq!(ours, theirs);
    let registry = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "127.0.0.1:5000" && g["listening"] == true && g["count"] == 31)
        .unwrap_or_else(|| panic!("the registry's listener and 30 accepted: {report}"));
    assert_eq!(registry["processes"][0]["comm"], "registry");
}
