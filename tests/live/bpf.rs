//! The BPF fd walk against the /proc walk, live: on the same population (a listener shared by
//! forked workers, clients split over processes, a process holding sockets from several
//! threads, IPv6, CLOSE_WAIT, idle fd holders, processes born and gone by the hundred) both
//! paths give the same report in every grouping; without the capabilities to load BPF the
//! /proc path runs and nothing else changes.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::{FORKER, Population, nobody_args, shimcheck_bin, without_deltas};

fn population() -> Population {
    Population::start(&json!({
        "servers": [
            {"name": "registry", "addr": "127.0.0.1", "port": 5000, "workers": 3},
            {"name": "v6server", "addr": "::1", "port": 8443},
            {"name": "hangup", "addr": "127.0.0.1", "port": 7000, "close_accepted": true}
        ],
        "clients": [
            {"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 30, "procs": 2},
            {"name": "kubelet", "connect": "127.0.0.1:5000", "count": 5},
            {"name": "v6client", "connect": "[::1]:8443", "count": 4},
            {"name": "leaky-closer", "connect": "127.0.0.1:7000", "count": 3}
        ],
        "idle": {"procs": 1, "files": 50}
    }))
}

/// Four threads of one process, each opening 3 connections to the registry and holding them:
/// the sockets are the process's, whichever thread opened them.
const THREADED: &str = r#"
import socket, threading, time, sys
held = []
def work():
    for _ in range(3):
        held.append(socket.create_connection(("127.0.0.1", 5000)))
    time.sleep(3600)
threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
for t in threads: t.start()
while len(held) < 12: time.sleep(0.01)
print("ready", flush=True)
sys.stdin.read()
"#;

fn run(pop: &Population, args: &[&str]) -> Value {
    pop.report(args)
}

/// Whether this host lets shimcheck load the walk: it says so in every report.
fn bpf_here(pop: &Population) -> bool {
    let r = run(pop, &[]);
    let here = r["attribution"] == "bpf";
    if !here {
        // CI runs as root on a kernel with BTF (5.8+): the fast path must be there.
        assert!(
            std::env::var_os("CI").is_none(),
            "no BPF attribution under CI: {}",
            r["warnings"]
        );
        eprintln!(
            "skipped: the BPF walk cannot be loaded here: {}",
            r["warnings"]
        );
    }
    here
}

#[test]
fn both_paths_give_the_same_report_in_every_grouping() {
    skip_unless_live!();
    let pop = population();
    let _threads = pop.script(THREADED);
    if !bpf_here(&pop) {
        return;
    }
    for by in ["port", "process", "peer", "pair", "pod"] {
        for states in ["established", "all"] {
            let args = ["--by", by, "--state", states, "--top", "0"];
            let kernel = run(&pop, &args);
            let mut procfs_args = args.to_vec();
            procfs_args.push("--no-bpf");
            let procfs = run(&pop, &procfs_args);
            let what = format!("--by {by} --state {states}");
            assert_eq!(kernel["attribution"], "bpf", "{what}");
            assert_eq!(procfs["attribution"], "procfs", "{what}");
            assert_eq!(kernel["totals"], procfs["totals"], "{what}");
            assert_eq!(kernel["groups"], procfs["groups"], "{what}");
            assert_eq!(kernel["warnings"], procfs["warnings"], "{what}");
            assert_eq!(kernel["findings"], procfs["findings"], "{what}");
            assert_eq!(
                kernel["totals"]["unattributed"],
                procfs["totals"]["unattributed"]
            );
        }
    }
    // The threads' 12 connections are the threaded process's, on both paths.
    let by_process = run(&pop, &["--by", "process", "--top", "0"]);
    let python = by_process["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["comm"] == "python3" && g["count"] == 12);
    assert!(python.is_some(), "{by_process}");
    // The registry's listener, shared by its 3 workers, is one socket held by each.
    let all = run(&pop, &["--state", "listen", "--top", "0"]);
    let listener = all["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "127.0.0.1:5000")
        .unwrap();
    assert_eq!(listener["count"], 1);
    assert_eq!(listener["processes"].as_array().unwrap().len(), 3);
}

/// `now` and `then` hold the same groups; else the ones only one of them has.
fn same(now: &[Value], then: &[Value], what: &str) {
    let only = |a: &[Value], b: &[Value]| -> Vec<String> {
        a.iter()
            .filter(|g| !b.contains(g))
            .map(|g| format!("{} {} {}", g["key"], g["count"], g["peer_processes"]))
            .collect()
    };
    assert!(
        now == then,
        "{what}: only now {:?}, only before {:?}",
        only(now, then),
        only(then, now)
    );
}

#[test]
fn processes_exiting_mid_walk_leave_the_stable_groups_exact_in_one_shot_and_watch() {
    skip_unless_live!();
    let pop = population();
    if !bpf_here(&pop) {
        return;
    }
    let quiet = run(&pop, &["--by", "pair", "--top", "0"]);
    // A watch's groups carry their change since the last sample too: left out.
    let stable = |r: &Value| -> Vec<Value> {
        without_deltas(&r["groups"])
            .into_iter()
            // The population's processes: not the forker and its children (by port, or "?"
            // for one gone before its name was read), nor the sockets they close between the
            // dump and the walk (unattributed, as they should be).
            .filter(|g| {
                g["pid"].is_u64()
                    && g["comm"] != "python3"
                    && g["comm"] != "?"
                    && g["remote_port"] != 6000
            })
            .collect()
    };
    let _forker = pop.script(FORKER);
    for _ in 0..5 {
        let r = run(&pop, &["--by", "pair", "--top", "0"]);
        assert_eq!(r["attribution"], "bpf");
        same(&stable(&r), &stable(&quiet), "one shot");
    }
    let mut samples = 0;
    let code = crate::support::watch(
        &pop,
        &[
            "--by",
            "pair",
            "--top",
            "0",
            "--interval",
            "300ms",
            "--count",
            "5",
        ],
        |r, _| {
            samples += 1;
            assert_eq!(r["attribution"], "bpf", "sample {samples}");
            same(&stable(r), &stable(&quiet), &format!("sample {samples}"));
        },
    );
    assert!(matches!(code, Some(0 | 1)), "{code:?}");
    assert_eq!(samples, 5);
}

#[test]
fn without_the_capabilities_to_load_it_the_proc_walk_runs_and_nothing_else_changes() {
    skip_unless_live!();
    let pop = population();
    if !bpf_here(&pop) {
        return;
    }
    let root = run(&pop, &["--by", "pair", "--top", "0"]);
    let out = Command::new("nsenter")
        .args(["-t", &pop.ns_pid.to_string(), "-n"])
        .args(nobody_args("+sys_ptrace,+dac_read_search"))
        .args(["ports", "-o", "json", "--by", "pair", "--top", "0"])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let capped: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(capped["attribution"], "procfs");
    assert_eq!(capped["groups"], root["groups"]);
    assert_eq!(capped["totals"], root["totals"]);
    assert_eq!(
        capped["warnings"],
        json!([]),
        "no warning: a host without the fast path"
    );
    assert_eq!(root["warnings"], json!([]));
}

#[test]
fn a_refused_load_falls_back_to_the_proc_walk_with_one_warning() {
    skip_unless_live!();
    let pop = population();
    if !bpf_here(&pop) {
        return;
    }
    let good = run(&pop, &["--by", "pair", "--top", "0"]);
    let mut cmd = pop.command(shimcheck_bin().to_str().unwrap());
    cmd.args([
        "ports",
        "--watch",
        "--interval",
        "200ms",
        "--count",
        "3",
        "-o",
        "json",
    ])
    .args(["--by", "pair", "--top", "0"]);
    // bpf(2) refused, as a container runtime's default seccomp profile does.
    crate::support::refuse_syscall(&mut cmd, libc::SYS_bpf, None);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
    assert_eq!(
        stderr.matches("cannot load the BPF fd walk").count(),
        1,
        "one warning for the whole watch: {stderr}"
    );
    let mut samples = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        samples += 1;
        assert_eq!(r["attribution"], "procfs");
        assert_eq!(
            without_deltas(&r["groups"]),
            without_deltas(&good["groups"]),
            "sample {samples}"
        );
        let w = r["warnings"].to_string();
        assert!(
            w.contains("cannot load the BPF fd walk (bpf(BPF_PROG_LOAD): Permission denied"),
            "{w}"
        );
    }
    assert_eq!(samples, 3);
}
