//! The /proc/net/tcp{,6} fallback, on tables captured from a namespace with the same kind of
//! population as the netlink fixtures (`fixtures/procnet/`).

use std::path::PathBuf;

use shimcheck::collect::SocketSource;
use shimcheck::collect::procnet::ProcNetSource;
use shimcheck::model::{StateSet, TcpState};

fn source() -> ProcNetSource {
    ProcNetSource::new(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/procnet"))
}

#[test]
fn both_tables_are_read_and_states_filtered_here() {
    let est: StateSet = [TcpState::Established].into_iter().collect();
    let sockets = source().sockets(est).unwrap();
    assert!(sockets.iter().all(|s| s.state == TcpState::Established));
    let v4 = sockets
        .iter()
        .filter(|s| s.local().to_string() == "127.0.0.1:5000")
        .count();
    let v6 = sockets
        .iter()
        .filter(|s| s.local().to_string() == "[::1]:8443")
        .count();
    assert_eq!((v4, v6), (4, 2));
    // The text tables have no cookies and no tcp_info: absent, not zero.
    assert!(
        sockets
            .iter()
            .all(|s| s.cookie().is_none() && s.tcp_info.is_none())
    );
    assert!(sockets.iter().all(|s| s.inode != 0));

    let all = source().sockets(StateSet::all()).unwrap();
    assert_eq!(
        all.iter().filter(|s| s.state == TcpState::Listen).count(),
        3
    );
    assert_eq!(
        all.iter().filter(|s| s.state == TcpState::FinWait2).count(),
        1
    );
    assert_eq!(
        all.iter()
            .filter(|s| s.state == TcpState::CloseWait)
            .count(),
        1
    );
}

#[test]
fn a_missing_table_names_the_file() {
    let mut src = ProcNetSource::new(&PathBuf::from("/nonexistent"));
    let err = src.sockets(StateSet::all()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/net/tcp"), "{err}");
}
