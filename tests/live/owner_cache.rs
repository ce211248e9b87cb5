//! Watch mode's incremental owner map on real sockets: after the first (full) scan, a sample
//! reads no fd table when nothing is new, and finds new sockets in the process that gained
//! sockets before without reading the others. Loopback only, no root needed.

use std::net::{TcpListener, TcpStream};
use std::path::Path;

use shimcheck::collect::SocketSource;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::model::{Socket, StateSet, TcpState};
use shimcheck::procs::{OwnerCache, ProcScanner, Refreshed};

/// This test's own sockets, as the kernel reports them.
fn my_sockets(port: u16) -> Vec<Socket> {
    let est: StateSet = [TcpState::Established].into_iter().collect();
    NetlinkSource::open()
        .unwrap()
        .sockets(est)
        .unwrap()
        .into_iter()
        .filter(|s| s.local.port() == port || s.remote.port() == port)
        .collect()
}

#[test]
fn a_sample_reads_only_the_fd_tables_it_needs() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut keep = Vec::new();
    for _ in 0..5 {
        keep.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        keep.push(listener.accept().unwrap().0);
    }
    let me = std::process::id();
    let scanner = ProcScanner::new(Path::new("/proc"));
    let mut cache = OwnerCache::new();

    let sockets = my_sockets(port);
    assert_eq!(sockets.len(), 10);
    let Refreshed {
        owners: index,
        fds,
        cost,
        ..
    } = cache.refresh(&scanner, &sockets, 2, false).unwrap();
    assert!(cost.full, "the first refresh is a full scan");
    assert!(
        sockets
            .iter()
            .all(|s| index.owners(s.inode).iter().any(|&(_, pid)| pid == me))
    );
    assert!(fds[&me].open >= 10);

    // Nothing new: no fd table is read.
    let cost = cache.refresh(&scanner, &sockets, 2, false).unwrap().cost;
    assert_eq!((cost.full, cost.processes_read), (false, 0));

    // Three new connections: found in this process, which gained sockets before, first.
    for _ in 0..3 {
        keep.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        keep.push(listener.accept().unwrap().0);
    }
    let sockets = my_sockets(port);
    assert_eq!(sockets.len(), 16);
    let Refreshed {
        owners: index,
        cost,
        ..
    } = cache.refresh(&scanner, &sockets, 2, false).unwrap();
    assert_eq!((cost.full, cost.processes_read), (false, 1));
    assert!(
        sockets
            .iter()
            .all(|s| index.owners(s.inode).iter().any(|&(_, pid)| pid == me))
    );

    // Closed sockets leave the map with the dump; the rest keep their owner.
    keep.truncate(4);
    let sockets = my_sockets(port);
    let Refreshed {
        owners: index,
        cost,
        ..
    } = cache.refresh(&scanner, &sockets, 2, false).unwrap();
    assert_eq!(cost.processes_read, 0);
    assert!(
        sockets
            .iter()
            .filter(|s| s.state == TcpState::Established)
            .all(|s| !index.owners(s.inode).is_empty())
    );
}
