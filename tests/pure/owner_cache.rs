//! Watch mode's incremental owner map (`procs::OwnerCache`) on a fake /proc tree in a temporary
//! directory: between full scans a sample reads only where new sockets can be, so a socket a
//! process gains without a new inode (inherited, passed over a unix socket) waits for the next
//! full scan, which runs at most every `FULL_SCAN_EVERY` samples and `FULL_SCAN_AFTER`.

use std::path::Path;

use shimcheck::model::{Socket, TcpState};
use shimcheck::procs::{FULL_SCAN_EVERY, OwnerCache, ProcScanner};

use crate::support::builders::sock;

/// `pid` holds socket `inode` on fd `fd` in the fake tree at `root`.
fn hold(root: &Path, pid: u32, fd: u32, inode: u64) {
    let dir = root.join(format!("{pid}/fd"));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(format!("socket:[{inode}]"), dir.join(fd.to_string())).unwrap();
}

fn sockets(inodes: &[u64]) -> Vec<Socket> {
    inodes
        .iter()
        .map(|&inode| {
            sock(
                TcpState::Established,
                &format!("10.0.0.1:{}", 30000 + inode),
                "10.0.0.2:5000",
                inode,
            )
        })
        .collect()
}

fn holders(owners: &shimcheck::model::OwnerIndex, inode: u64) -> Vec<u32> {
    owners.owners(inode).iter().map(|&(_, pid)| pid).collect()
}

#[test]
fn a_socket_passed_to_another_process_waits_for_the_full_scan_which_waits_for_its_time() {
    let dir = tempfile::tempdir().unwrap();
    hold(dir.path(), 10, 3, 501);
    hold(dir.path(), 11, 3, 502);
    let scanner = ProcScanner::new(dir.path());
    let mut cache = OwnerCache::new();
    let first = cache.refresh(&scanner, &sockets(&[501, 502]), 1).unwrap();
    assert!(first.cost.full, "the first refresh is a full scan");
    assert_eq!(holders(&first.owners, 501), [10]);

    // 11 receives 501 over a unix socket: no new inode, nothing for a search to look for.
    hold(dir.path(), 11, 4, 501);
    // More samples than FULL_SCAN_EVERY, all within a second: FULL_SCAN_AFTER has not passed.
    for n in 0..FULL_SCAN_EVERY + 5 {
        let r = cache.refresh(&scanner, &sockets(&[501, 502]), 1).unwrap();
        assert!(!r.cost.full, "sample {n} ran a full scan");
        assert_eq!(holders(&r.owners, 501), [10], "sample {n}");
        let same = cache.refresh_same(&scanner, 1).unwrap();
        assert!(same.owners.is_none(), "sample {n}: nothing changed");
    }
    // A full scan (a new cache's first) sees both holders.
    let full = OwnerCache::new()
        .refresh(&scanner, &sockets(&[501, 502]), 1)
        .unwrap();
    assert_eq!(holders(&full.owners, 501), [10, 11]);
}

#[test]
fn a_new_socket_is_found_between_full_scans_and_an_exited_holder_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    hold(dir.path(), 10, 3, 501);
    hold(dir.path(), 11, 3, 502);
    let scanner = ProcScanner::new(dir.path());
    let mut cache = OwnerCache::new();
    cache.refresh(&scanner, &sockets(&[501, 502]), 1).unwrap();
    hold(dir.path(), 11, 4, 503);
    let r = cache
        .refresh(&scanner, &sockets(&[501, 502, 503]), 1)
        .unwrap();
    assert!(!r.cost.full);
    assert_eq!(holders(&r.owners, 503), [11]);
    // 10 exits: its socket is no longer held by anyone visible.
    std::fs::remove_dir_all(dir.path().join("10")).unwrap();
    let same = cache.refresh_same(&scanner, 1).unwrap();
    let owners = same.owners.expect("a holder exited: the owners changed");
    assert!(holders(&owners, 501).is_empty());
    assert_eq!(holders(&owners, 503), [11]);
}
