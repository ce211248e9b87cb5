//! Which procfs mounts hide processes from shimcheck (`privilege::hiding_mode`), from
//! mountinfo lines as the kernel writes them, old option spellings included.

use std::path::Path;

use procfs::FromBufRead;
use procfs::process::MountInfos;
use shimcheck::privilege::{hiding_mode, listed};

const MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
40 22 0:35 / /proc rw,relatime - proc proc rw,hidepid=invisible
41 1 0:36 / /host/proc rw,relatime - proc proc rw,hidepid=2,gid=1500
42 1 0:37 / /mnt/noaccess rw,relatime - proc proc rw,hidepid=noaccess
43 1 0:38 / /mnt/ptraceable rw,relatime - proc proc rw,hidepid=ptraceable
44 1 0:39 / /mnt/tmp rw,relatime - tmpfs tmpfs rw,hidepid=invisible
";

fn mounts() -> MountInfos {
    MountInfos::from_buf_read(MOUNTINFO.as_bytes()).unwrap()
}

#[test]
fn the_last_proc_mount_at_the_root_decides() {
    assert_eq!(
        hiding_mode(&mounts(), Path::new("/proc"), &[0]).as_deref(),
        Some("hidepid=invisible"),
        "the hidepid mount stacked over the plain one"
    );
}

#[test]
fn the_old_numeric_spelling_hides_too_unless_shimcheck_is_in_the_gid_group() {
    let root = Path::new("/host/proc");
    assert_eq!(
        hiding_mode(&mounts(), root, &[65534]).as_deref(),
        Some("hidepid=2")
    );
    assert_eq!(hiding_mode(&mounts(), root, &[65534, 1500]), None);
}

#[test]
fn noaccess_lists_processes_and_is_left_to_the_denied_count() {
    assert_eq!(
        hiding_mode(&mounts(), Path::new("/mnt/noaccess"), &[0]),
        None
    );
    assert_eq!(
        hiding_mode(&mounts(), Path::new("/mnt/ptraceable"), &[0]).as_deref(),
        Some("hidepid=ptraceable")
    );
}

#[test]
fn only_a_procfs_counts_and_an_unmounted_root_hides_nothing() {
    assert_eq!(hiding_mode(&mounts(), Path::new("/mnt/tmp"), &[0]), None);
    assert_eq!(hiding_mode(&mounts(), Path::new("/srv/proc"), &[0]), None);
}

#[test]
fn capabilities_are_listed_as_a_sentence_says_them() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(listed(&names(&[])), "");
    assert_eq!(listed(&names(&["CAP_A"])), "CAP_A");
    assert_eq!(listed(&names(&["CAP_A", "CAP_B"])), "CAP_A and CAP_B");
    assert_eq!(
        listed(&names(&["CAP_A", "CAP_B", "CAP_C"])),
        "CAP_A, CAP_B and CAP_C"
    );
}
