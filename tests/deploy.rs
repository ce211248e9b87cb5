//! The deployment artifacts (deploy/, Dockerfile, docs/deploy.md, docs/alerts.md): alert rules
//! checked and unit-tested by promtool, Kubernetes manifests validated by kubernetes-validate,
//! the Prometheus Operator resources checked against the DaemonSet and RBAC they rely on, the
//! systemd unit checked by systemd-analyze, and every flag they pass checked against
//! `shimcheck serve --help`.
//!
//! What ships beside the binary is checked too: `shimcheck completion` (bash completes with it)
//! and `shimcheck man` (man renders it without a warning).
//!
//! External tools: promtool (Debian package `prometheus`), kubernetes-validate (pip), python3
//! with PyYAML (to read YAML), systemd-analyze (package `systemd`), man (package `man-db`). When one is missing the
//! test says "skipped: ..." on stderr and passes, unless the environment variable CI is set:
//! then it fails and names what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const RULES: &str = "deploy/prometheus/rules.yaml";
const RULES_TEST: &str = "deploy/prometheus/rules.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/kubernetes/prometheusrule.yaml";
const KUBERNETES_DIR: &str = "deploy/kubernetes";
const SYSTEMD_UNIT: &str = "deploy/systemd/shimcheck.service";
const ALERTS_DOC: &str = "docs/alerts.md";
const RUNBOOK_BASE: &str = "https://github.com/shimcheck/shimcheck/blob/main/docs/alerts.md#";

/// The series `shimcheck serve` exports, with the labels of their own (target labels such as
/// `instance` come on top). An alert may only use these, and its description must name the
/// `process`, `endpoint` and `netns` labels of the series it fires on.
const METRICS: &[(&str, &[&str])] = &[
    (
        "shimcheck_connections",
        &["netns", "process", "endpoint", "side", "state"],
    ),
    (
        "shimcheck_finding",
        &["kind", "severity", "netns", "process", "endpoint"],
    ),
    (
        "shimcheck_idle_connections",
        &["netns", "process", "endpoint"],
    ),
    ("shimcheck_process_open_fds", &["process"]),
    ("shimcheck_process_max_fds", &["process"]),
    (
        "shimcheck_ephemeral_ports_used",
        &["netns", "source", "endpoint"],
    ),
    ("shimcheck_ephemeral_ports_range", &["netns"]),
    ("shimcheck_sockets", &["netns", "state"]),
    ("shimcheck_unattributed_sockets", &["netns"]),
    ("shimcheck_sample_duration_seconds", &[]),
    ("shimcheck_last_sample_timestamp_seconds", &[]),
    ("shimcheck_sample_interval_seconds", &[]),
    ("shimcheck_samples_total", &[]),
    ("shimcheck_sample_errors_total", &[]),
    ("shimcheck_build_info", &["version"]),
];

/// Kinds kubernetes-validate has no schema for (custom resources of the Prometheus Operator);
/// `operator_resources_fit_the_daemonset_and_rbac` checks them instead.
const CRD_KINDS: &[&str] = &["PodMonitor", "PrometheusRule"];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether a prerequisite is there; if not: under CI a failure naming what to install,
/// elsewhere a "skipped" note and `false`.
fn available(present: bool, what: &str, install: &str) -> bool {
    if present {
        return true;
    }
    let why = format!("{what} is not available (install it with: {install})");
    assert!(
        std::env::var_os("CI").is_none(),
        "{why}; CI is set, so this test fails instead of skipping"
    );
    eprintln!("skipped: {why}");
    false
}

fn have_promtool() -> bool {
    available(
        on_path("promtool"),
        "promtool",
        "apt-get install prometheus",
    )
}

fn have_kubernetes_validate() -> bool {
    available(
        on_path("kubernetes-validate"),
        "kubernetes-validate",
        "pip install kubernetes-validate",
    )
}

fn have_systemd_analyze() -> bool {
    available(
        on_path("systemd-analyze"),
        "systemd-analyze",
        "apt-get install systemd",
    )
}

fn have_yaml() -> bool {
    let present = on_path("python3")
        && Command::new("python3")
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|o| o.status.success());
    available(
        present,
        "python3 with PyYAML",
        "apt-get install python3-yaml, or pip install kubernetes-validate which brings it",
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document of `text`, as JSON (PyYAML's safe loader, through python3).
fn parse_yaml(text: &str, origin: &str) -> Vec<Value> {
    use std::io::Write;
    use std::process::Stdio;
    const TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
        json.dump(docs, sys.stdout)";
    let mut child = Command::new("python3")
        .args(["-c", TO_JSON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing to python3");
    let out = child.wait_with_output().expect("waiting for python3");
    assert!(
        out.status.success(),
        "{origin} is not valid YAML:\n{}",
        text_of(&out)
    );
    match serde_json::from_slice(&out.stdout).expect("python3 wrote JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    parse_yaml(&read(rel), rel)
}

fn yaml_doc(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no array at {pointer} in {v}"))
}

/// The rules of a rule file's groups.
fn rules_of(groups: &Value) -> Vec<Value> {
    groups
        .as_array()
        .expect("groups is a list")
        .iter()
        .flat_map(|g| array_at(g, "/rules").clone())
        .collect()
}

/// The alerting rules of rules.yaml.
fn alert_rules() -> Vec<Value> {
    let rules = rules_of(&yaml_doc(RULES)["groups"]);
    assert!(!rules.is_empty(), "{RULES} has no rules");
    for rule in &rules {
        assert!(
            rule.get("alert").is_some(),
            "{RULES}: only alerting rules are expected, found {rule}"
        );
    }
    rules
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn doc_anchors(rel: &str) -> BTreeSet<String> {
    read(rel)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// The `shimcheck_*` metric names an expression uses.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("shimcheck_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        found.insert(name);
    }
    found
}

fn manifests() -> Vec<(String, Value)> {
    let dir = repo().join(KUBERNETES_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("reading deploy/kubernetes")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {KUBERNETES_DIR}");
    files
        .iter()
        .flat_map(|p| {
            let rel = p
                .strip_prefix(repo())
                .expect("under the repo")
                .display()
                .to_string();
            yaml_docs(&rel).into_iter().map(move |d| (rel.clone(), d))
        })
        .collect()
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in {KUBERNETES_DIR}"))
}

fn container<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    array_at(daemonset, "/spec/template/spec/containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------------------

#[test]
fn rules_pass_promtool_check() {
    if !have_promtool() {
        return;
    }
    let out = run("promtool", &["check", "rules", RULES]);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text_of(&out)
    );
}

#[test]
fn rules_pass_their_unit_tests() {
    if !have_promtool() {
        return;
    }
    let out = run("promtool", &["test", "rules", RULES_TEST]);
    assert!(
        out.status.success(),
        "promtool test rules:\n{}",
        text_of(&out)
    );
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_case_in_the_unit_tests() {
    if !have_yaml() {
        return;
    }
    let tests = yaml_doc(RULES_TEST);
    assert_eq!(
        strings(&tests["rule_files"]),
        vec!["rules.yaml".to_owned()],
        "{RULES_TEST} must test rules.yaml"
    );
    // alert name -> (cases expecting alerts, cases expecting none)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for test in array_at(&tests, "/tests") {
        for case in array_at(test, "/alert_rule_test") {
            let name = str_at(case, "/alertname").to_owned();
            let firing = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if firing {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    let alerts: BTreeSet<String> = alert_rules()
        .iter()
        .map(|r| str_at(r, "/alert").to_owned())
        .collect();
    for alert in &alerts {
        let (firing, quiet) = cases.get(alert).copied().unwrap_or_default();
        assert!(firing > 0, "{RULES_TEST} has no case where {alert} fires");
        assert!(
            quiet > 0,
            "{RULES_TEST} has no case where {alert} stays quiet"
        );
    }
    for tested in cases.keys() {
        assert!(
            alerts.contains(tested),
            "{RULES_TEST} tests {tested}, which {RULES} does not define"
        );
    }
    // Every severity level of every alert fires somewhere.
    for rule in alert_rules() {
        let (alert, severity) = (str_at(&rule, "/alert"), str_at(&rule, "/labels/severity"));
        let fired = array_at(&tests, "/tests").iter().any(|t| {
            array_at(t, "/alert_rule_test").iter().any(|c| {
                c["alertname"] == alert
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|e| e["exp_labels"]["severity"] == severity))
            })
        });
        assert!(
            fired,
            "{RULES_TEST}: {alert} never fires with severity {severity}"
        );
    }
}

#[test]
fn every_alert_has_severity_annotations_and_a_runbook_that_exists() {
    if !have_yaml() {
        return;
    }
    let anchors = doc_anchors(ALERTS_DOC);
    let known: BTreeMap<&str, &[&str]> = METRICS.iter().copied().collect();
    for rule in alert_rules() {
        let alert = str_at(&rule, "/alert");
        let severity = str_at(&rule, "/labels/severity");
        assert!(
            ["warning", "critical"].contains(&severity),
            "{alert}: severity {severity:?} is neither warning nor critical"
        );
        assert!(
            rule.get("for").and_then(Value::as_str).is_some(),
            "{alert}: no `for:` duration"
        );
        let summary = str_at(&rule, "/annotations/summary");
        assert!(!summary.trim().is_empty(), "{alert}: empty summary");
        let description = str_at(&rule, "/annotations/description");
        let runbook = str_at(&rule, "/annotations/runbook_url");
        let fragment = runbook.strip_prefix(RUNBOOK_BASE).unwrap_or_else(|| {
            panic!("{alert}: runbook_url {runbook} is not under {RUNBOOK_BASE}")
        });
        assert!(
            anchors.contains(fragment),
            "{alert}: runbook_url anchor #{fragment} is not a heading of {ALERTS_DOC}"
        );

        // The description names where: the instance always, and the process, endpoint and
        // network namespace whenever the alert's series carry them.
        assert!(
            description.contains("$labels.instance"),
            "{alert}: the description does not name $labels.instance"
        );
        let expr = str_at(&rule, "/expr");
        for metric in metrics_in(expr) {
            let labels = known
                .get(metric.as_str())
                .unwrap_or_else(|| panic!("{alert}: {metric} is not a metric shimcheck exports"));
            for label in ["process", "endpoint", "netns"] {
                if labels.contains(&label) {
                    assert!(
                        description.contains(&format!("$labels.{label}")),
                        "{alert}: {metric} has a {label} label the description does not name"
                    );
                }
            }
        }
    }
}

/// Tests that need faster alerts rewrite the `for:` lines only: each must be a line of its
/// own, `for: <duration>`, one per rule.
#[test]
fn each_for_duration_is_a_line_of_its_own() {
    if !have_yaml() {
        return;
    }
    let is_duration = |s: &str| {
        let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit())
            && ["s", "m", "h", "d"].contains(&&s[digits.len()..])
    };
    let rules = read(RULES);
    let for_lines: Vec<&str> = rules
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("for:"))
        .map(|l| l.trim_start_matches("for:").trim())
        .collect();
    for value in &for_lines {
        assert!(
            is_duration(value),
            "{RULES}: `for: {value}` is not `for: <number><s|m|h|d>`"
        );
    }
    assert_eq!(
        for_lines.len(),
        alert_rules().len(),
        "{RULES}: expected one `for:` line per rule"
    );
}

#[test]
fn the_prometheusrule_carries_the_same_groups_as_rules_yaml() {
    if !have_yaml() {
        return;
    }
    let rules = yaml_doc(RULES);
    let resource = yaml_doc(PROMETHEUS_RULE);
    assert_eq!(resource["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(resource["kind"], "PrometheusRule");
    let keys: Vec<&String> = rules.as_object().expect("a mapping").keys().collect();
    assert_eq!(keys, vec!["groups"], "{RULES}: only `groups` at the top");
    assert!(
        resource["spec"]["groups"] == rules["groups"],
        "{PROMETHEUS_RULE}: spec.groups differ from {RULES}'s groups; regenerate it (recipe at its top)"
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

/// Built-in kinds strictly against the oldest Kubernetes the manifests support (1.30: the
/// `appArmorProfile` field) and against kubernetes-validate's newest; the only kinds allowed to
/// go unvalidated are the Prometheus Operator's.
#[test]
fn manifests_validate_strictly() {
    if !have_kubernetes_validate() || !have_yaml() {
        return;
    }
    let dir = repo().join(KUBERNETES_DIR);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading deploy/kubernetes")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            p.strip_prefix(repo())
                .expect("under the repo")
                .display()
                .to_string()
        })
        .collect();
    files.sort();
    for version in [Some("1.30.0"), None] {
        let mut args = vec!["--strict"];
        if let Some(v) = version {
            args.extend(["-k", v]);
        }
        args.extend(files.iter().map(String::as_str));
        let out = run("kubernetes-validate", &args);
        let report = text_of(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate {}:\n{report}",
            args.join(" ")
        );
        for line in report.lines() {
            if line.contains("Couldn't find schema") {
                assert!(
                    CRD_KINDS.iter().any(|k| line
                        .contains(&format!("kind {k} with api version monitoring.coreos.com/"))),
                    "kubernetes-validate could not check a built-in kind: {line}"
                );
            }
        }
        // Every built-in object really was validated.
        let passed = report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        let built_in = manifests()
            .iter()
            .filter(|(_, d)| !CRD_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
            .count();
        assert_eq!(
            passed,
            built_in,
            "kubernetes-validate {}:\n{report}",
            args.join(" ")
        );
    }
}

/// kubernetes-validate has no schemas for `PodMonitor` and `PrometheusRule`: check what the
/// `PodMonitor` relies on instead — field names of the operator's API, the pods, port and job
/// name — and that everything lives in namespace shimcheck.
#[test]
fn the_podmonitor_scrapes_the_sidecar_as_job_shimcheck() {
    if !have_yaml() {
        return;
    }
    let docs = manifests();
    for (file, doc) in &docs {
        let kind = str_at(doc, "/kind");
        let name = str_at(doc, "/metadata/name");
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
            assert_eq!(
                doc["metadata"]["namespace"], "shimcheck",
                "{file}: {kind} {name} is not in namespace shimcheck"
            );
        }
        if CRD_KINDS.contains(&kind) {
            assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{file}");
        }
    }
    let ds = find(&docs, "DaemonSet", "shimcheck");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let pm = find(&docs, "PodMonitor", "shimcheck");

    // Field names of monitoring.coreos.com/v1 PodMonitor (the subset a PodMonitor like this
    // one may use): a misspelt field would be dropped or refused by the API server.
    const SPEC_FIELDS: &[&str] = &[
        "jobLabel",
        "podTargetLabels",
        "podMetricsEndpoints",
        "selector",
        "namespaceSelector",
        "sampleLimit",
        "targetLimit",
        "attachMetadata",
        "scrapeClass",
    ];
    const ENDPOINT_FIELDS: &[&str] = &[
        "port",
        "portNumber",
        "path",
        "scheme",
        "params",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "honorTimestamps",
        "authorization",
        "tlsConfig",
        "relabelings",
        "metricRelabelings",
        "filterRunning",
        "followRedirects",
        "enableHttp2",
    ];
    for key in pm["spec"].as_object().expect("spec is a mapping").keys() {
        assert!(
            SPEC_FIELDS.contains(&key.as_str()),
            "PodMonitor: unknown spec.{key}"
        );
    }

    // It selects the DaemonSet's pods ...
    let selector = &pm["spec"]["selector"]["matchLabels"];
    let selector_map = selector
        .as_object()
        .expect("PodMonitor selects by matchLabels");
    assert!(!selector_map.is_empty());
    for (k, v) in selector_map {
        assert_eq!(
            &pod_labels[k], v,
            "PodMonitor selector {k}={v} misses the DaemonSet's pods"
        );
    }
    assert_eq!(
        &ds["spec"]["selector"]["matchLabels"], selector,
        "the PodMonitor and the DaemonSet select pods differently"
    );
    // ... names the job ShimcheckDown selects ...
    let job_label = str_at(pm, "/spec/jobLabel");
    let job = pod_labels[job_label]
        .as_str()
        .expect("jobLabel is a pod label");
    let down = alert_rules()
        .into_iter()
        .find(|r| r["alert"] == "ShimcheckDown")
        .expect("ShimcheckDown");
    assert!(
        str_at(&down, "/expr").contains(&format!("job=\"{job}\"")),
        "ShimcheckDown does not select the job the PodMonitor produces ({job})"
    );
    // ... scrapes the sidecar's named port over https ...
    let endpoints = array_at(pm, "/spec/podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    for key in ep.as_object().expect("endpoint is a mapping").keys() {
        assert!(
            ENDPOINT_FIELDS.contains(&key.as_str()),
            "PodMetricsEndpoint: unknown {key}"
        );
    }
    assert_eq!(ep["scheme"], "https");
    assert_eq!(ep["path"], "/metrics");
    let port = str_at(ep, "/port");
    let proxy = container(ds, "kube-rbac-proxy");
    let port_number = array_at(proxy, "/ports")
        .iter()
        .find(|p| p["name"] == port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("the kube-rbac-proxy container has no port named {port}"));
    let proxy_args = strings(&proxy["args"]);
    assert!(
        proxy_args
            .iter()
            .any(|a| a.starts_with("--secure-listen-address=")
                && a.ends_with(&format!(":{port_number}"))),
        "kube-rbac-proxy does not listen on port {port_number}: {proxy_args:?}"
    );
    // ... and keeps shimcheck's `endpoint` label from being renamed exported_endpoint.
    let drops_endpoint = ep["honorLabels"] == true
        || ep["relabelings"].as_array().is_some_and(|rs| {
            rs.iter()
                .any(|r| r["action"] == "labeldrop" && r["regex"] == "endpoint")
        });
    assert!(
        drops_endpoint,
        "the operator's `endpoint` target label would clash with shimcheck's"
    );
}

/// The PodMonitor's token belongs to an account that passes kube-rbac-proxy's
/// SubjectAccessReview, and the sidecar's own account may make that review.
#[test]
fn the_scraper_token_passes_the_sidecars_access_review() {
    if !have_yaml() {
        return;
    }
    let docs = manifests();
    let ds = find(&docs, "DaemonSet", "shimcheck");
    let pm = find(&docs, "PodMonitor", "shimcheck");
    let ep = &array_at(pm, "/spec/podMetricsEndpoints")[0];

    assert_eq!(ep["authorization"]["type"], "Bearer");
    assert_eq!(str_at(ep, "/authorization/credentials/key"), "token");
    let secret = find(
        &docs,
        "Secret",
        str_at(ep, "/authorization/credentials/name"),
    );
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    let account = (
        str_at(
            secret,
            "/metadata/annotations/kubernetes.io~1service-account.name",
        )
        .to_owned(),
        str_at(secret, "/metadata/namespace").to_owned(),
    );
    find(&docs, "ServiceAccount", &account.0);

    // What kube-rbac-proxy asks the API server, from its config file.
    let proxy_args = strings(&container(ds, "kube-rbac-proxy")["args"]);
    let config_file = proxy_args
        .iter()
        .find_map(|a| a.strip_prefix("--config-file="))
        .expect("kube-rbac-proxy --config-file");
    let key = Path::new(config_file)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("config file name");
    let mount = array_at(container(ds, "kube-rbac-proxy"), "/volumeMounts")
        .iter()
        .find(|m| Path::new(config_file).parent() == Some(Path::new(str_at(m, "/mountPath"))))
        .expect("the config file's directory is mounted");
    let volume = array_at(ds, "/spec/template/spec/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the config volume");
    let config_map = find(&docs, "ConfigMap", str_at(volume, "/configMap/name"));
    let config = parse_yaml(
        str_at(config_map, &format!("/data/{key}")),
        "the proxy config",
    )
    .pop()
    .expect("one document");
    let attrs = &config["authorization"]["resourceAttributes"];
    let (resource, subresource) = (str_at(attrs, "/resource"), str_at(attrs, "/subresource"));
    let (ns, object) = (str_at(attrs, "/namespace"), str_at(attrs, "/name"));
    assert_eq!(find(&docs, "Service", object)["metadata"]["namespace"], ns);

    let granted = docs.iter().any(|(_, binding)| {
        binding["kind"] == "RoleBinding"
            && binding["metadata"]["namespace"] == ns
            && service_account_subjects(binding).contains(&account)
            && array_at(
                find(&docs, "Role", str_at(binding, "/roleRef/name")),
                "/rules",
            )
            .iter()
            .any(|r| {
                strings(&r["resources"]).contains(&format!("{resource}/{subresource}"))
                    && strings(&r["verbs"]).contains(&"get".to_owned())
                    && strings(&r["resourceNames"]).contains(&object.to_owned())
            })
    });
    assert!(
        granted,
        "{account:?} may not get {resource}/{subresource} {ns}/{object}: kube-rbac-proxy would refuse the PodMonitor's scrapes"
    );

    let sidecar_account = (
        str_at(ds, "/spec/template/spec/serviceAccountName").to_owned(),
        str_at(ds, "/metadata/namespace").to_owned(),
    );
    let reviews = docs.iter().any(|(_, b)| {
        b["kind"] == "ClusterRoleBinding"
            && service_account_subjects(b).contains(&sidecar_account)
            && array_at(
                find(&docs, "ClusterRole", str_at(b, "/roleRef/name")),
                "/rules",
            )
            .iter()
            .filter(|r| strings(&r["verbs"]).contains(&"create".to_owned()))
            .flat_map(|r| strings(&r["resources"]))
            .collect::<BTreeSet<_>>()
            .is_superset(&BTreeSet::from([
                "tokenreviews".to_owned(),
                "subjectaccessreviews".to_owned(),
            ]))
    });
    assert!(
        reviews,
        "the DaemonSet's account may not create TokenReviews and SubjectAccessReviews"
    );
}

fn service_account_subjects(binding: &Value) -> Vec<(String, String)> {
    binding["subjects"]
        .as_array()
        .map(|subjects| {
            subjects
                .iter()
                .filter(|s| s["kind"] == "ServiceAccount")
                .map(|s| {
                    (
                        str_at(s, "/name").to_owned(),
                        str_at(s, "/namespace").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the DaemonSet promises in docs/deploy.md: not privileged, exactly three added
/// capabilities, AppArmor unconfined in both forms, the host's PID and network namespaces,
/// read-only mounts, every node, probes on /healthz where shimcheck listens.
#[test]
fn the_daemonset_runs_with_the_documented_privileges() {
    if !have_yaml() {
        return;
    }
    let docs = manifests();
    let ds = find(&docs, "DaemonSet", "shimcheck");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert!(
        array_at(pod, "/tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "the DaemonSet must tolerate every taint"
    );
    let c = container(ds, "shimcheck");
    let image = str_at(c, "/image");
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    assert!(
        !tag.is_empty() && tag != "latest" && !tag.contains('/'),
        "image {image} is not pinned"
    );
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), vec!["ALL".to_owned()]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let expected: BTreeSet<String> = ["SYS_PTRACE", "DAC_READ_SEARCH", "SYS_ADMIN"]
        .map(str::to_owned)
        .into();
    assert_eq!(added, expected);
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");
    let annotation = format!(
        "container.apparmor.security.beta.kubernetes.io/{}",
        str_at(c, "/name")
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"][annotation.as_str()],
        "unconfined"
    );

    let args = strings(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    assert!(args.contains(&"--all-netns".to_owned()));
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .expect("--listen=ADDR:PORT");
    let (host, port) = listen.rsplit_once(':').expect("ADDR:PORT");
    assert_eq!(
        host, "127.0.0.1",
        "shimcheck itself must listen on loopback only"
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert_eq!(get["host"], host, "{probe}");
        assert_eq!(get["port"].to_string(), port, "{probe}");
    }
    let proxy_args = strings(&container(ds, "kube-rbac-proxy")["args"]);
    assert!(
        proxy_args.contains(&format!("--upstream=http://{listen}/")),
        "kube-rbac-proxy does not forward to {listen}: {proxy_args:?}"
    );

    let volumes: BTreeMap<&str, &Value> = array_at(pod, "/volumes")
        .iter()
        .map(|v| (str_at(v, "/name"), v))
        .collect();
    let mut host_paths = BTreeSet::new();
    for mount in array_at(c, "/volumeMounts") {
        let volume = volumes[str_at(mount, "/name")];
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            assert_eq!(
                mount["readOnly"], true,
                "hostPath {path} must be mounted read-only"
            );
            host_paths.insert(path.to_owned());
        }
    }
    assert_eq!(
        host_paths,
        ["/var/log/pods", "/sys/fs/cgroup"]
            .map(str::to_owned)
            .into(),
    );
    let requests = &c["resources"]["requests"];
    assert_eq!(
        (requests["cpu"].as_str(), requests["memory"].as_str()),
        (Some("50m"), Some("64Mi"))
    );
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
}

// ---------------------------------------------------------------------------------------
// systemd, image, and the command line they use
// ---------------------------------------------------------------------------------------

#[test]
fn the_systemd_unit_verifies_and_keeps_proc_visible() {
    let unit = read(SYSTEMD_UNIT);
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let value = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    // Hardening that would hide other processes, their sockets or namespaces.
    for (key, blinding) in [
        ("PrivateNetwork", "yes"),
        ("PrivateUsers", "yes"),
        ("ProcSubset", "pid"),
        ("ProtectProc", "invisible"),
        ("ProtectProc", "noaccess"),
        ("ProtectProc", "ptraceable"),
        ("RestrictNamespaces", "yes"),
        ("ProtectControlGroups", "private"),
        ("ProtectControlGroups", "strict"),
    ] {
        assert_ne!(
            value(key),
            Some(blinding),
            "{SYSTEMD_UNIT}: {key}={blinding} blinds shimcheck"
        );
    }
    let caps = "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SYS_ADMIN";
    assert_eq!(value("CapabilityBoundingSet"), Some(caps));
    assert_eq!(value("AmbientCapabilities"), Some(caps));
    assert_eq!(value("NoNewPrivileges"), Some("yes"));
    let exec = value("ExecStart").expect("ExecStart");
    assert!(
        exec.contains(" serve ") && exec.contains("--listen 127.0.0.1:10188"),
        "{SYSTEMD_UNIT}: ExecStart is not `serve` on 127.0.0.1:10188: {exec}"
    );
    if exec.contains("--all-netns") {
        assert!(
            value("RestrictNamespaces").is_none_or(|v| v.split_whitespace().any(|n| n == "net"))
        );
    }

    if !have_systemd_analyze() {
        return;
    }
    // verify wants ExecStart's binary to exist: point it at the one cargo built.
    let dir = std::env::temp_dir().join(format!("shimcheck-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("shimcheck.service");
    let (program, _) = exec.split_once(' ').expect("ExecStart has arguments");
    std::fs::write(
        &path,
        unit.replace(program, env!("CARGO_BIN_EXE_shimcheck")),
    )
    .expect("writing the unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("running systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let report = text_of(&out);
    assert!(
        out.status.success() && !report.contains("shimcheck.service"),
        "systemd-analyze verify {SYSTEMD_UNIT}:\n{report}"
    );
}

#[test]
fn the_dockerfile_builds_a_static_binary_into_an_empty_image() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let last_from = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    assert_eq!(*last_from, "FROM scratch");
    assert!(lines.contains(&r#"ENTRYPOINT ["/shimcheck"]"#));
    assert!(lines.contains(&r#"CMD ["serve", "--all-netns"]"#));
    assert!(dockerfile.contains("target-feature=+crt-static"));
    // What the build stage copies must exist.
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                repo().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
        }
    }
}

/// Every `serve` option the deployment files pass exists in `shimcheck serve --help`.
#[test]
fn deployment_files_use_only_existing_serve_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_shimcheck"))
        .args(["serve", "--help"])
        .output()
        .expect("running shimcheck");
    assert!(
        out.status.success(),
        "shimcheck serve --help:\n{}",
        text_of(&out)
    );
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let options: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();

    // (file, option) for every option that follows `serve` on a command line ...
    let mut used: Vec<(&str, String)> = Vec::new();
    for file in [SYSTEMD_UNIT, "Dockerfile", "docs/deploy.md"] {
        for line in read(file).lines() {
            let words = line
                .split(|c: char| c.is_whitespace() || "\"`,[]".contains(c))
                .skip_while(|w| *w != "serve")
                .filter(|w| w.starts_with("--"));
            used.extend(words.map(|w| (file, w.to_owned())));
        }
    }
    // ... and in the DaemonSet's args, one per line after `- serve`.
    let daemonset = "deploy/kubernetes/daemonset.yaml";
    let args: Vec<String> = read(daemonset)
        .lines()
        .skip_while(|l| l.trim() != "- serve")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- --").map(|o| format!("--{o}")))
        .collect();
    assert!(!args.is_empty(), "{daemonset}: no options after `- serve`");
    used.extend(args.into_iter().map(|a| (daemonset, a)));

    for (file, word) in &used {
        let option = word.split('=').next().unwrap_or(word);
        assert!(
            options.contains(option),
            "{file} passes {option} to `shimcheck serve`, which has no such option"
        );
    }
}

fn shimcheck(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shimcheck"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shimcheck {args:?}: {}",
        text_of(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What bash's completion offers for the words typed so far, the last one being completed.
fn bash_completes(words: &[&str]) -> Vec<String> {
    let script = shimcheck(&["completion", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shimcheck.bash");
    std::fs::write(&path, script).unwrap();
    let line = words.join(" ");
    let probe = format!(
        "source {}; COMP_WORDS=({line}); COMP_CWORD={}; COMP_LINE='{line}'; \
         COMP_POINT={}; _shimcheck shimcheck '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display(),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = run("bash", &["-c", &probe]);
    assert!(out.status.success(), "bash: {}", text_of(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_subcommands_and_option_values() {
    assert_eq!(bash_completes(&["shimcheck", "po"]), ["ports"]);
    let by = bash_completes(&["shimcheck", "ports", "--by", "p"]);
    assert_eq!(
        by.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["pair", "peer", "pod", "port", "process"])
    );
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let script = shimcheck(&["completion", shell]);
        for word in ["ports", "snapshot", "serve", "all-netns", "interval"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
}

#[test]
fn the_man_page_renders_without_warnings() {
    if !available(on_path("man"), "man", "apt-get install man-db") {
        return;
    }
    let page = shimcheck(&["man"]);
    assert!(page.is_ascii(), "raw UTF-8 in roff reads as garbage");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shimcheck.1");
    std::fs::write(&path, page).unwrap();
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&path)
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "man: {stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    for section in [
        "SHIMCHECK PORTS",
        "--all-netns",
        "SHIMCHECK SERVE",
        "EXIT STATUS",
    ] {
        assert!(text.contains(section), "the page lacks {section}");
    }
    assert!(
        text.lines().all(|l| l.chars().count() <= 80),
        "wider than MANWIDTH"
    );
}
