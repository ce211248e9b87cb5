//! Stage 2b, owners as operators name them: a process's cgroup paths → its systemd unit,
//! container id and pod uid; the kubelet's `/var/log/pods/<namespace>_<name>_<uid>` directories
//! → the pod's namespace and name (no API server needed).
//!
//! Input: the lines of `/proc/PID/cgroup` (parsed by `procfs`) and a pods-log directory.
//! Output: a `Placement` per process. Pure apart from `PodDirectory::read`; the layouts
//! (cgroup v1 and v2, systemd and cgroupfs drivers, containerd, CRI-O, docker) are tested on
//! the fake files in `fixtures/cgroup/`.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use procfs::ProcessCGroup;
use serde::{Deserialize, Serialize};

/// A pod as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Where a process runs, from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The systemd unit of a host process: `image-cri-shim.service`, `session-3.scope`.
    pub unit: Option<String>,
    /// The container runtime's id of a container process (64 hex digits).
    pub container_id: Option<String>,
    /// The pod uid of a process in a kubepods cgroup.
    pub pod_uid: Option<String>,
}

/// The placement a process's cgroup lines say. Every line is read, the v2 line first, then
/// v1's `name=systemd` (it names the unit best), then the others; the first answer for each
/// field wins. Hybrid hosts have a bare `0::/` beside full v1 paths, so no line is trusted
/// to be the only one.
pub fn placement(groups: &[ProcessCGroup]) -> Placement {
    let rank = |g: &ProcessCGroup| {
        if g.hierarchy == 0 && g.controllers.is_empty() {
            0
        } else if g.controllers.iter().any(|c| c == "name=systemd") {
            1
        } else {
            2
        }
    };
    let mut ordered: Vec<&ProcessCGroup> = groups.iter().collect();
    ordered.sort_by_key(|g| rank(g));
    let mut out = Placement::default();
    for g in ordered {
        let p = from_path(&g.pathname);
        out.unit = out.unit.or(p.unit);
        out.container_id = out.container_id.or(p.container_id);
        out.pod_uid = out.pod_uid.or(p.pod_uid);
    }
    // A container's scope is not a unit an operator manages: it is named by its pod.
    if out.container_id.is_some() || out.pod_uid.is_some() {
        out.unit = None;
    }
    out
}

/// The placement one cgroup path says (a socket's cgroup, found by its id).
pub fn placement_of_path(path: &str) -> Placement {
    let mut p = from_path(path);
    if p.container_id.is_some() || p.pod_uid.is_some() {
        p.unit = None;
    }
    p
}

/// Where the cgroup-v2 hierarchy is mounted: `/sys/fs/cgroup` on v2 hosts, its `unified`
/// subdirectory on hybrid ones.
pub fn v2_root(sys_fs_cgroup: &Path) -> Option<PathBuf> {
    [sys_fs_cgroup.to_path_buf(), sys_fs_cgroup.join("unified")]
        .into_iter()
        .find(|p| p.join("cgroup.controllers").exists() || p.join("cgroup.procs").exists())
}

/// The paths (relative to `root`, starting with `/`) of the cgroup-v2 directories whose inode
/// (a cgroup's id) is in `wanted`; the walk stops once all are found.
pub fn paths_by_id(root: &Path, wanted: &HashSet<u64>) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if found.len() == wanted.len() {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if wanted.contains(&meta.ino()) {
            let rel = dir
                .strip_prefix(root)
                .map(|r| format!("/{}", r.display()))
                .unwrap_or_default();
            found.insert(meta.ino(), rel);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

/// Reads one cgroup path, component by component.
fn from_path(path: &str) -> Placement {
    let mut out = Placement::default();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if let Some(id) = container_scope(c) {
            out.container_id = Some(id.to_string());
        } else if is_container_id(c) {
            // cgroupfs driver: /kubepods/burstable/pod<uid>/<id>, /docker/<id>
            out.container_id = Some(c.to_string());
        } else if let Some(uid) = pod_component(c) {
            out.pod_uid = Some(uid);
        } else if c.ends_with(".service") || c.ends_with(".scope") {
            out.unit = Some(c.to_string());
        }
    }
    out
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`:
/// the id. `crio-conmon-<id>.scope` is CRI-O's monitor, not the container.
fn container_scope(c: &str) -> Option<&str> {
    let stem = c.strip_suffix(".scope")?;
    ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|prefix| stem.strip_prefix(prefix))
        .filter(|id| is_container_id(id))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `kubepods-burstable-pod<uid with _>.slice`, `kubepods-pod<uid>.slice` (systemd driver) or
/// `pod<uid>` (cgroupfs driver): the pod uid, with dashes.
fn pod_component(c: &str) -> Option<String> {
    let uid = if let Some(stem) = c.strip_suffix(".slice") {
        let at = stem.rfind("-pod")?;
        if !stem.starts_with("kubepods") {
            return None;
        }
        stem[at + 4..].replace('_', "-")
    } else {
        c.strip_prefix("pod")?.to_string()
    };
    let uuid_like = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    uuid_like.then_some(uid)
}

/// Pod uid → pod, from the kubelet's log directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDirectory(HashMap<String, PodRef>);

impl PodDirectory {
    /// Lists `root` (normally /var/log/pods); a missing directory (not a Kubernetes node, or
    /// not mounted into this container) names no pods.
    pub fn read(root: &Path) -> PodDirectory {
        let Ok(entries) = std::fs::read_dir(root) else {
            return PodDirectory::default();
        };
        PodDirectory(
            entries
                .filter_map(Result::ok)
                .filter_map(|e| parse_pod_dir(&e.file_name().to_string_lossy()))
                .map(|p| (p.uid.clone(), p))
                .collect(),
        )
    }

    /// The pod with this uid, if the kubelet has a log directory for it.
    pub fn get(&self, uid: &str) -> Option<&PodRef> {
        self.0.get(uid)
    }
}

/// `<namespace>_<name>_<uid>`: Kubernetes names cannot contain `_`, so the split is exact.
pub fn parse_pod_dir(name: &str) -> Option<PodRef> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || namespace.is_empty() || pod.is_empty() || uid.is_empty() {
        return None;
    }
    Some(PodRef {
        namespace: namespace.to_string(),
        name: pod.to_string(),
        uid: uid.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_split_into_namespace_name_uid() {
        let p =
            parse_pod_dir("kube-system_etcd-master1_5c4ac1f7-0b6e-4f4e-9d0a-2f3e4d5c6b7a").unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("kube-system", "etcd-master1")
        );
        assert_eq!(parse_pod_dir("no-underscores"), None);
        assert_eq!(parse_pod_dir("a_b_c_d"), None);
    }

    #[test]
    fn components_name_units_containers_and_pods() {
        assert_eq!(
            from_path("/system.slice/image-cri-shim.service")
                .unit
                .as_deref(),
            Some("image-cri-shim.service")
        );
        let id = "a".repeat(64);
        assert_eq!(
            container_scope(&format!("cri-containerd-{id}.scope")),
            Some(id.as_str())
        );
        assert_eq!(container_scope(&format!("crio-conmon-{id}.scope")), None);
        assert_eq!(
            pod_component("kubepods-besteffort-pod0c1f2a3b_4d5e_6f70_8192_a3b4c5d6e7f8.slice")
                .as_deref(),
            Some("0c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8")
        );
        assert_eq!(pod_component("kubepods-besteffort.slice"), None);
        assert_eq!(pod_component("podman.slice"), None);
    }
}
