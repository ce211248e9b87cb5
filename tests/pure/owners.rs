//! Owners as operators name them: systemd units, container ids and pods from fake cgroup files
//! (`fixtures/cgroup/`: v1 and v2, systemd and cgroupfs drivers, containerd, CRI-O, docker)
//! and a fake kubelet log directory (`fixtures/pods/`).

use std::path::PathBuf;

use procfs::FromBufRead;
use shimcheck::aggregate::GroupBy;
use shimcheck::cgroup::{self, Placement, PodDirectory};
use shimcheck::model::{OwnerIndex, TcpState};
use shimcheck::procs::ProcScanner;
use shimcheck::sample::{cgroup_places, name_namespaces};

use crate::support::builders::{self, SocketWith, query, sock};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path)
}

fn placement_of(file: &str) -> Placement {
    let text = std::fs::read(fixture(&format!("cgroup/{file}.cgroup"))).unwrap();
    let groups = procfs::ProcessCGroups::from_buf_read(&text[..]).unwrap();
    cgroup::placement(&groups.0)
}

const U1: &str = "0c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8";
const U2: &str = "5c4ac1f7-0b6e-4f4e-9d0a-2f3e4d5c6b7a";
const U3: &str = "9e8d7c6b-5a49-4838-2716-0f1e2d3c4b5a";
const U4: &str = "11111111-2222-3333-4444-555555555555";

fn id(pair: &str) -> String {
    pair.repeat(32)
}

fn placed(unit: Option<&str>, container: Option<String>, pod: Option<&str>) -> Placement {
    Placement {
        unit: unit.map(str::to_string),
        container_id: container,
        pod_uid: pod.map(str::to_string),
    }
}

#[test]
fn every_cgroup_layout_names_its_unit_container_or_pod() {
    let cases = [
        (
            "v2-systemd-service",
            placed(Some("image-cri-shim.service"), None, None),
        ),
        (
            "v2-systemd-containerd-pod",
            placed(None, Some(id("a1")), Some(U1)),
        ),
        (
            "v2-systemd-crio-pod",
            placed(None, Some(id("b2")), Some(U2)),
        ),
        // CRI-O's monitor lives in the pod but is not the container.
        ("v2-systemd-crio-conmon", placed(None, None, Some(U2))),
        ("v2-cgroupfs-pod", placed(None, Some(id("c3")), Some(U3))),
        (
            "v2-systemd-docker-plain",
            placed(None, Some(id("d4")), None),
        ),
        (
            "v2-user-session",
            placed(Some("session-3.scope"), None, None),
        ),
        ("v2-root", placed(None, None, None)),
        // v1 beside a bare v2 line (hybrid hosts): the v1 paths still count.
        (
            "v1-cgroupfs-docker-pod",
            placed(None, Some(id("e5")), Some(U4)),
        ),
        (
            "v1-systemd-service",
            placed(Some("kubelet.service"), None, None),
        ),
        (
            "v1-systemd-docker-guaranteed-pod",
            placed(None, Some(id("d4")), Some(U1)),
        ),
    ];
    for (file, want) in cases {
        assert_eq!(placement_of(file), want, "{file}");
    }
}

#[test]
fn pods_are_named_from_the_kubelet_log_directory() {
    let pods = PodDirectory::read(&fixture("pods"));
    let p = pods.get(U2).unwrap();
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
        ("kube-system", "etcd-master1", U2)
    );
    assert_eq!(pods.get(U1).unwrap().name, "web-7d4b9c-x2x9q");
    assert!(pods.get(U4).is_none(), "no log directory, no name");
    assert_eq!(
        PodDirectory::read(&fixture("no-such-dir")),
        PodDirectory::default()
    );
}

#[test]
fn processes_carry_their_unit_container_and_pod_into_the_report() {
    let scanner = ProcScanner::with_pods(&fixture("proc/shared"), &fixture("pods"));
    let shim = scanner.process(4242).unwrap();
    assert_eq!(
        (shim.place.unit.as_deref(), shim.place.pod.as_ref()),
        (Some("image-cri-shim.service"), None)
    );
    let web = scanner.process(4243).unwrap();
    assert_eq!(web.container_id, Some(id("a1")));
    assert_eq!(
        web.place.pod.as_ref().map(|p| p.name.as_str()),
        Some("web-7d4b9c-x2x9q")
    );

    let sock = |local, remote, inode| sock(TcpState::Established, local, remote, inode);
    let sockets = vec![
        sock("127.0.0.1:5000", "127.0.0.1:40001", 1001),
        sock("127.0.0.1:5000", "127.0.0.1:40002", 1002),
        sock("127.0.0.1:40001", "127.0.0.1:5000", 2001),
        sock("10.0.0.5:41000", "10.96.0.1:443", 3001),
        sock("127.0.0.1:40009", "127.0.0.1:6443", 8888),
    ];
    let scan = scanner.socket_fds(1, false).unwrap();
    let owners = scanner.index(
        scan.pairs,
        sockets.iter().map(|s| s.inode),
        std::iter::empty(),
    );
    let sample = builders::sample()
        .hostname("node1")
        .sockets(sockets)
        .owner_index(owners)
        .scan(scan.stats)
        .build();
    let q = |by| query(by, &[TcpState::Established]);
    let by_pod = shimcheck::ports_report(&sample, &q(GroupBy::Pod));
    let groups: Vec<(&str, usize)> = by_pod
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.count))
        .collect();
    assert_eq!(
        groups,
        [
            ("unit registry.service", 2),
            ("(unattributed)", 1),
            ("unit image-cri-shim.service", 1),
            ("pod default/web-7d4b9c-x2x9q", 1)
        ]
    );
    let v = serde_json::to_value(&by_pod.groups[3]).unwrap();
    assert_eq!(v["pod"]["namespace"], "default");
    assert_eq!(v["pod"]["uid"], U1);
    assert!(v["unit"].is_null());

    // Process entries carry unit, container_id and pod (null where not applicable).
    let by_port = shimcheck::ports_report(&sample, &q(GroupBy::Port));
    let web_group = by_port
        .groups
        .iter()
        .find(|g| g.key == "10.0.0.5:41000")
        .unwrap();
    let entry = serde_json::to_value(&web_group.processes[0]).unwrap();
    assert_eq!(entry["container_id"], id("a1"));
    assert_eq!(entry["pod"]["name"], "web-7d4b9c-x2x9q");
    assert!(entry["unit"].is_null());
    let mut out = Vec::new();
    shimcheck::render::table::render(&by_port, &mut out, None).unwrap();
    let table = String::from_utf8(out).unwrap();
    assert!(table.contains("POD / UNIT"), "{table}");
    assert!(
        table.contains("default/web-7d4b9c-x2x9q") && table.contains("registry.service"),
        "{table}"
    );
}

/// The inode of a directory in the fake cgroup-v2 tree: its cgroup id.
fn cgroup_id(rel: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(fixture("cgroupfs").join(rel)).unwrap())
}

#[test]
fn sockets_no_visible_process_holds_are_named_by_their_cgroup() {
    let pod_scope = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        U1.replace('-', "_"),
        id("a1")
    );
    let unit_id = cgroup_id("system.slice/image-cri-shim.service");
    let pod_id = cgroup_id(&pod_scope);
    let root = cgroup::v2_root(&fixture("cgroupfs")).unwrap();
    let wanted = [unit_id, pod_id].into_iter().collect();
    let paths = cgroup::paths_by_id(&root, &wanted);
    assert_eq!(paths[&unit_id], "/system.slice/image-cri-shim.service");
    assert_eq!(paths[&pod_id], format!("/{pod_scope}"));

    // An unprivileged view: nobody visibly holds these sockets, their cgroups still say whose.
    let sock =
        |local, inode, id| sock(TcpState::Established, local, "127.0.0.1:5000", inode).cgroup(id);
    let sockets = vec![
        sock("127.0.0.1:40001", 70001, unit_id),
        sock("127.0.0.1:40002", 70002, unit_id),
        sock("127.0.0.1:40003", 70003, pod_id),
        sock("127.0.0.1:40004", 70004, 999_999_999),
    ];
    let scanner = ProcScanner::with_pods(&fixture("proc/shared"), &fixture("pods"));
    let owners = OwnerIndex::default();
    let places = cgroup_places(&scanner, &fixture("cgroupfs"), &sockets, &owners);
    assert_eq!(places.len(), 2);
    let sample = builders::sample()
        .hostname("node1")
        .sockets(sockets)
        .owner_index(owners)
        .cgroup_places(places)
        .build();
    let q = query(GroupBy::Pod, &[TcpState::Established]);
    let r = shimcheck::ports_report(&sample, &q);
    let groups: Vec<(&str, usize, usize)> = r
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.count, g.processes.len()))
        .collect();
    assert_eq!(
        groups,
        [
            ("unit image-cri-shim.service", 2, 0),
            ("(unattributed)", 1, 0),
            ("pod default/web-7d4b9c-x2x9q", 1, 0)
        ]
    );
    assert_eq!(
        r.totals.unattributed, 4,
        "named by cgroup, still not held by a visible process"
    );
}

#[test]
fn a_namespace_is_named_after_the_pod_living_in_it() {
    let scanner = ProcScanner::with_pods(&fixture("proc/shared"), &fixture("pods"));
    let targets = [
        shimcheck::collect::netns::Target {
            inode: 42,
            path: PathBuf::from("/nonexistent"),
            pid: Some(4243),
        },
        shimcheck::collect::netns::Target {
            inode: 43,
            path: PathBuf::from("/nonexistent"),
            pid: Some(4242),
        },
    ];
    let names = name_namespaces(&scanner, 7, &targets);
    assert_eq!(
        names.get(&42).map(String::as_str),
        Some("default/web-7d4b9c-x2x9q")
    );
    assert_eq!(
        names.get(&43),
        None,
        "a host service's namespace has no pod to be named after"
    );
}
