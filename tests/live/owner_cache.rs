//! Watch mode's incremental owner map on real sockets: after the first (full) scan, a sample
//! reads no fd table when nothing is new; it finds new sockets by reading only the fd slots
//! that can hold them (the slots of closed sockets, then those past the highest fd) in the
//! process that gained sockets before; and it falls back to whole tables only when that is not
//! enough. The sockets belong to a helper process whose fds only the test moves. Loopback only,
//! no root needed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use shimcheck::collect::SocketSource;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::model::{Socket, StateSet, TcpState};
use shimcheck::procs::{OwnerCache, ProcScanner, RefreshCost, Refreshed};

/// A process holding both ends of loopback connections, told over stdin to `open N` more,
/// `close N` (the newest N), or `file` (open one file, not a socket); it answers `ok`.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const HOLDER: &str = r#"
import os, socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(128)
print(srv.getsockname()[1], flush=True)
pairs, files = [], []
for line in sys.stdin:
    cmd, n = line.split()
    for _ in range(int(n)):
        if cmd == "open":
            c = socket.create_connection(srv.getsockname()); a, _ = srv.accept(); pairs.append((c, a))
        elif cmd == "close":
            c, a = pairs.pop(); c.close(); a.close()
        elif cmd == "file":
            files.append(open("/dev/null"))
        elif cmd == "unfile":
            files.pop().close()
    print("ok", flush=True)
"#;

impl Holder {
    fn start() -> (Holder, u16) {
        let mut child = Command::new("python3")
            .args(["-c", HOLDER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut port = String::new();
        stdout.read_line(&mut port).unwrap();
        let port = port.trim().parse().unwrap();
        (
            Holder {
                child,
                stdin,
                stdout,
            },
            port,
        )
    }

    fn tell(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut ok = String::new();
        self.stdout.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "ok", "{cmd}");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The holder's sockets on `port`, as the kernel reports them.
fn sockets_on(port: u16) -> Vec<Socket> {
    let est: StateSet = [TcpState::Established].into_iter().collect();
    NetlinkSource::open()
        .unwrap()
        .sockets(est)
        .unwrap()
        .into_iter()
        .filter(|s| s.local().port() == port || s.remote().port() == port)
        .collect()
}

/// Refreshes and checks that `pid` holds every socket on `port`; returns the cost.
fn refresh(cache: &mut OwnerCache, port: u16, pid: u32, expect: usize) -> RefreshCost {
    let sockets = sockets_on(port);
    assert_eq!(sockets.len(), expect);
    refresh_with(cache, sockets, pid)
}

/// Refreshes with these sockets as the dump, and checks that `pid` holds each.
fn refresh_with(cache: &mut OwnerCache, sockets: Vec<Socket>, pid: u32) -> RefreshCost {
    let scanner = ProcScanner::new(Path::new("/proc"));
    let Refreshed { owners, cost, .. } = cache.refresh(&scanner, &sockets, 2).unwrap();
    for s in &sockets {
        assert_eq!(
            owners.owners(s.inode),
            [(s.inode, pid)],
            "{} -> {}",
            s.local(),
            s.remote()
        );
    }
    cost
}

#[test]
fn a_sample_reads_only_the_fd_slots_that_can_hold_new_sockets() {
    let (mut holder, port) = Holder::start();
    let pid = holder.child.id();
    let mut cache = OwnerCache::new();
    holder.tell("open 5");
    let first = refresh(&mut cache, port, pid, 10);
    assert!(first.full, "the first refresh is a full scan");

    // Nothing new: nothing is read.
    let cost = refresh(&mut cache, port, pid, 10);
    assert_eq!(
        (cost.full, cost.processes_read, cost.slots_read),
        (false, 0, 0)
    );

    // Three new connections, six new fds past the highest: six slots read and the seventh,
    // not open, ends the search. No whole table is read.
    holder.tell("open 3");
    let cost = refresh(&mut cache, port, pid, 16);
    assert_eq!((cost.processes_read, cost.slots_read), (0, 7));

    // Two connections closed and one opened: the new fds take the lowest free slots, two of
    // the four closed ones. The four are read again, then the slot past the highest.
    holder.tell("close 2");
    holder.tell("open 1");
    let cost = refresh(&mut cache, port, pid, 14);
    assert_eq!((cost.processes_read, cost.slots_read), (0, 5));

    // Two connections opened, the dump taken after the first only: reading the slots of the
    // first finds the second's too, though it is not in the dump yet.
    holder.tell("open 2");
    let mut all = sockets_on(port);
    assert_eq!(all.len(), 18);
    // The second connection's ends have the two highest inodes.
    all.sort_by_key(|s| s.inode);
    let early = all[..16].to_vec();
    let cost = refresh_with(&mut cache, early, pid);
    assert_eq!(cost.processes_read, 0);
    // The next dump shows the second connection: its holder is known, nothing is read.
    let cost = refresh_with(&mut cache, all, pid);
    assert_eq!((cost.processes_read, cost.slots_read), (0, 0));
    holder.tell("close 2");
    refresh(&mut cache, port, pid, 14);

    // A file opened before a connection, in the four slots the last two closed: read again
    // as slots of sockets that left the dump (the file, two sockets, one still free), then
    // the lowest free slot. The file's slot is remembered as "not a socket".
    holder.tell("file 1");
    holder.tell("open 1");
    let cost = refresh(&mut cache, port, pid, 16);
    assert_eq!((cost.processes_read, cost.slots_read), (0, 5));
    // The file closed, a connection opened: one end lands in the file's slot, which the slots
    // read do not include, so whole tables are read: those of processes started since (other
    // tests run beside this one), then the helper's.
    holder.tell("unfile 1");
    holder.tell("open 1");
    let cost = refresh(&mut cache, port, pid, 18);
    assert!(cost.processes_read >= 1, "{cost:?}");
}
