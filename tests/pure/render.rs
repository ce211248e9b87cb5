//! The table as a person sees it, snapshotted at a fixed width (insta), from synthetic samples.

use shimcheck::aggregate::{GroupBy, Query};
use shimcheck::detect::{self, DetectConfig};
use shimcheck::join::Joined;
use shimcheck::model::{OwnerIndex, Sample, Socket, TcpState};
use shimcheck::render;

use crate::support::builders::{self, HOST_NS, ProcessWith, SocketWith, process, query, sock};

/// The leak case in small: registry 2811 on :5000 with 60 idle connections from
/// image-cri-shim 4242, kubelet 700 talking to the apiserver, and a process named with an
/// escape sequence holding two CLOSE_WAIT sockets.
fn sample() -> Sample {
    let mut sockets = Vec::new();
    let mut pairs = Vec::new();
    let mut add = |state: TcpState, local: String, remote: &str, pid: u32, idle_ms: u32| {
        let inode = sockets.len() as u64 + 1;
        sockets.push(sock(state, &local, remote, inode).idle(idle_ms));
        pairs.push((inode, pid));
    };
    add(
        TcpState::Listen,
        "0.0.0.0:5000".into(),
        "0.0.0.0:0",
        2811,
        0,
    );
    add(TcpState::Listen, "[::]:6443".into(), "[::]:0", 900, 0);
    for i in 0..60 {
        let port = 41000 + i;
        add(
            TcpState::Established,
            format!("10.0.0.101:{port}"),
            "10.0.0.101:5000",
            4242,
            400_000,
        );
        add(
            TcpState::Established,
            "10.0.0.101:5000".into(),
            &format!("10.0.0.101:{port}"),
            2811,
            400_000,
        );
    }
    for i in 0..3 {
        add(
            TcpState::Established,
            format!("[::1]:{}", 50000 + i),
            "[::1]:6443",
            700,
            10,
        );
        add(
            TcpState::Established,
            "[::1]:6443".into(),
            &format!("[::1]:{}", 50000 + i),
            900,
            10,
        );
    }
    add(
        TcpState::CloseWait,
        "127.0.0.1:33000".into(),
        "127.0.0.1:7000",
        666,
        0,
    );
    add(
        TcpState::CloseWait,
        "127.0.0.1:33001".into(),
        "127.0.0.1:7000",
        666,
        0,
    );
    let names = [
        (2811, "registry"),
        (4242, "image-cri-shim"),
        (700, "kubelet"),
        (900, "kube-apiserver"),
        (666, "evil\u{1b}[31m"),
    ];
    builders::sample()
        .at(1_795_000_000)
        .sockets(sockets)
        .owners(pairs)
        .processes(names.iter().map(|&(pid, comm)| process(pid, comm)))
        .build()
}

fn table(by: GroupBy, states: &[TcpState], top: Option<usize>) -> String {
    let s = sample();
    let q = Query {
        top,
        ..query(by, states)
    };
    let j = Joined::new(&s);
    let mut report = shimcheck::aggregate::aggregate(&j, &q);
    report.findings = detect::findings(&j, None, &DetectConfig::default());
    let mut out = Vec::new();
    render::table::render(&report, &mut out, Some(110)).unwrap();
    assert!(!out.contains(&0x1b), "a raw ESC reached the table");
    String::from_utf8(out).unwrap()
}

#[test]
fn by_port_marks_servers_names_both_ends_and_lists_findings() {
    insta::assert_snapshot!(table(GroupBy::Port, &[TcpState::Established], Some(4)));
}

#[test]
fn by_pair_with_several_states() {
    insta::assert_snapshot!(table(
        GroupBy::Pair,
        &[TcpState::Established, TcpState::CloseWait],
        Some(6)
    ));
}

#[test]
fn by_process_escapes_hostile_names() {
    let t = table(GroupBy::Process, &[TcpState::CloseWait], None);
    assert!(t.contains("evil\\x1b[31m(666)"), "{t}");
    insta::assert_snapshot!(t);
}

#[test]
fn an_empty_report_says_so() {
    insta::assert_snapshot!(table(GroupBy::Peer, &[TcpState::SynSent], None));
}

// ---- Every group-by, wrapped at 100 columns and unwrapped (a pipe), on a busier node ----

/// A master node with something of everything a table must show:
/// - registry (2811) on 0.0.0.0:5000 with 12 connections from image-cri-shim (2811249), one
///   from another node nobody visible holds, and 3 in TIME_WAIT;
/// - kubelet (700) → kube-apiserver (900) on [::1]:6443, twice;
/// - five php-fpm workers (101-105), one connection each to a database off the node;
/// - gunicorn (300) and three workers sharing one inherited connection to redis;
/// - a process named with an escape sequence, connected to the registry over loopback and
///   holding 2 CLOSE_WAIT sockets to a port nobody serves any more.
fn busy_node() -> Sample {
    let mut sockets = vec![
        sock(TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
        sock(TcpState::Listen, "[::]:6443", "[::]:0", 2),
    ];
    let mut pairs = vec![(1, 2811), (2, 900)];
    let mut inode = 10;
    let mut link = |sockets: &mut Vec<Socket>, client: &str, server: &str, c: u32, s: u32| {
        sockets.push(sock(TcpState::Established, client, server, inode));
        sockets.push(sock(TcpState::Established, server, client, inode + 1));
        pairs.extend([(inode, c), (inode + 1, s)]);
        inode += 2;
    };
    for i in 0..12 {
        let client = format!("10.0.0.101:{}", 40001 + i);
        link(&mut sockets, &client, "10.0.0.101:5000", 2_811_249, 2811);
    }
    for i in 0..2 {
        let client = format!("[::1]:{}", 50001 + i);
        link(&mut sockets, &client, "[::1]:6443", 700, 900);
    }
    link(&mut sockets, "127.0.0.1:45000", "127.0.0.1:5000", 666, 2811);
    for pid in 101..=105u32 {
        let client = format!("10.0.0.101:{}", 33000 + pid);
        sockets.push(sock(
            TcpState::Established,
            &client,
            "10.0.0.5:3306",
            u64::from(pid) * 10,
        ));
        pairs.push((u64::from(pid) * 10, pid));
    }
    sockets.push(sock(
        TcpState::Established,
        "10.0.0.101:36000",
        "10.0.0.6:6379",
        3000,
    ));
    pairs.extend([(3000, 300), (3000, 301), (3000, 302), (3000, 303)]);
    sockets.extend([
        sock(
            TcpState::Established,
            "10.0.0.101:5000",
            "10.0.0.7:45000",
            99,
        ),
        sock(TcpState::TimeWait, "10.0.0.101:5000", "10.0.0.101:39000", 0),
        sock(TcpState::TimeWait, "10.0.0.101:5000", "10.0.0.101:39001", 0),
        sock(TcpState::TimeWait, "10.0.0.101:5000", "10.0.0.101:39002", 0),
        sock(
            TcpState::CloseWait,
            "127.0.0.1:33000",
            "127.0.0.1:7000",
            660,
        ),
        sock(
            TcpState::CloseWait,
            "127.0.0.1:33001",
            "127.0.0.1:7000",
            661,
        ),
    ]);
    pairs.extend([(660, 666), (661, 666)]);
    let mut names: Vec<(u32, String, String)> = vec![
        (2811, "registry".into(), "/usr/bin/registry serve /etc/docker/registry/config.yml".into()),
        (2_811_249, "image-cri-shim".into(), "/usr/bin/image-cri-shim --file=/etc/image-cri-shim.yaml".into()),
        (700, "kubelet".into(), "/usr/bin/kubelet --config=/var/lib/kubelet/config.yaml --kubeconfig=/etc/kubernetes/kubelet.conf".into()),
        (900, "kube-apiserver".into(), "kube-apiserver --advertise-address=10.0.0.101 --secure-port=6443".into()),
        (666, "evil\u{1b}[31m".into(), "./evil\u{1b}[31m --steal\u{7}".into()),
    ];
    names.extend((101..=105).map(|pid| (pid, "php-fpm".into(), "php-fpm: pool www".into())));
    names.extend((300..=303).map(|pid| {
        (
            pid,
            "gunicorn".into(),
            "/usr/bin/python3 /usr/local/bin/gunicorn app:app -w 3".into(),
        )
    }));
    builders::sample()
        .at(1_795_600_000)
        .host_netns(HOST_NS)
        .sockets(sockets)
        .owners(pairs)
        .processes(
            names
                .into_iter()
                .map(|(pid, comm, cmdline)| process(pid, &comm).cmdline(&cmdline)),
        )
        .build()
}

const SHOWN: [TcpState; 3] = [
    TcpState::Established,
    TcpState::TimeWait,
    TcpState::CloseWait,
];

/// The report `shimcheck ports --by BY --state ... --top TOP` prints (no findings: those have
/// their own snapshots above), checked for raw control characters.
fn busy_table(by: GroupBy, states: &[TcpState], top: Option<usize>, width: Option<u16>) -> String {
    let s = busy_node();
    let q = Query {
        top,
        ..query(by, states)
    };
    let report = shimcheck::ports_report(&s, &q);
    let mut out = Vec::new();
    render::table::render(&report, &mut out, width).unwrap();
    assert!(
        !out.iter().any(|&b| b == 0x1b || b == 0x07),
        "a raw control character reached the table"
    );
    String::from_utf8(out).unwrap()
}

#[test]
fn busy_by_port_wrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Port, &SHOWN, Some(8), Some(100)));
}

#[test]
fn busy_by_port_unwrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Port, &SHOWN, Some(8), None));
}

#[test]
fn busy_by_process_wrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Process, &SHOWN, None, Some(100)));
}

#[test]
fn busy_by_process_unwrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Process, &SHOWN, None, None));
}

#[test]
fn busy_by_peer_wrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Peer, &SHOWN, Some(6), Some(100)));
}

#[test]
fn busy_by_peer_unwrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Peer, &SHOWN, Some(6), None));
}

#[test]
fn busy_by_pair_wrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Pair, &SHOWN, Some(8), Some(100)));
}

#[test]
fn busy_by_pair_unwrapped() {
    insta::assert_snapshot!(busy_table(GroupBy::Pair, &SHOWN, Some(8), None));
}

#[test]
fn one_state_has_no_states_column() {
    let t = busy_table(GroupBy::Port, &[TcpState::Established], Some(3), None);
    assert!(!t.contains("STATES"), "{t}");
    insta::assert_snapshot!(t);
}

#[test]
fn a_hostile_name_is_shown_escaped_in_every_column_it_reaches() {
    for by in [
        GroupBy::Port,
        GroupBy::Process,
        GroupBy::Peer,
        GroupBy::Pair,
    ] {
        for width in [Some(100), None] {
            let t = busy_table(by, &SHOWN, None, width);
            assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{by:?}: {t}");
            assert!(t.contains("evil\\x1b[31m(666)"), "{by:?} {width:?}: {t}");
        }
    }
    // Its command line, in full, unwrapped.
    let t = busy_table(GroupBy::Process, &SHOWN, None, None);
    assert!(t.contains("./evil\\x1b[31m --steal\\x07"), "{t}");
    // As the holder of the other end of the registry's loopback connection.
    let t = busy_table(GroupBy::Port, &SHOWN, None, None);
    let line = t.lines().find(|l| l.contains("127.0.0.1:5000")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words[words.len() - 2..],
        ["registry(2811)", "evil\\x1b[31m(666)"],
        "{line}"
    );
}

#[test]
fn top_says_how_many_groups_it_left_out() {
    let t = busy_table(GroupBy::Port, &SHOWN, Some(2), None);
    assert!(
        t.contains("... 24 more groups not shown (--top 0 shows all 26)\n"),
        "{t}"
    );
    let all = busy_table(GroupBy::Port, &SHOWN, Some(0), None);
    assert!(!all.contains("more groups not shown"), "{all}");
    assert_eq!(
        all.lines().count(),
        1 + 26 + 1,
        "header, every group, totals"
    );
}

#[test]
fn an_empty_report_names_the_states_it_looked_for() {
    let t = busy_table(
        GroupBy::Port,
        &[TcpState::SynSent, TcpState::LastAck],
        Some(20),
        Some(100),
    );
    assert_eq!(
        t,
        "no TCP sockets match (syn-sent, last-ack)\n\
         0 sockets (syn-sent, last-ack): 0 attributed to a process, 0 unattributed\n"
    );
}

#[test]
fn json_of_a_small_report() {
    let s = busy_node();
    let q = Query {
        port: Some(5000),
        top: Some(2),
        ..query(GroupBy::Port, &[TcpState::Established, TcpState::CloseWait])
    };
    let report = shimcheck::ports_report(&s, &q);
    let mut out = Vec::new();
    render::json::render(&report, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with("}\n"));
    insta::assert_snapshot!(text);
}

/// Checks a table fitted to `width` against the same report unwrapped: one line per row (no
/// cell split across lines), every word (address, `name(pid)`, count) whole or shortened with
/// `…` from a whole one, and no line wider than the terminal.
fn assert_whole_words(by: GroupBy, states: &[TcpState], width: u16, first_column_only: bool) {
    let unwrapped = busy_table(by, states, None, None);
    let whole: std::collections::HashSet<&str> = unwrapped.split_whitespace().collect();
    let t = busy_table(by, states, None, Some(width));
    for line in t.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // A row's first line starts with its key; continuation lines start with blanks.
        let checked = if first_column_only {
            match line.chars().nth(1) {
                Some(c) if c != ' ' => &words[..1],
                _ => &[][..],
            }
        } else {
            &words[..]
        };
        for word in checked {
            if *word == "…" {
                continue;
            }
            let shortened_from_whole = word.split_once('…').is_some_and(|(head, _)| {
                whole
                    .iter()
                    .any(|w| w.starts_with(head) && w.len() > head.len())
            });
            assert!(
                whole.contains(word) || shortened_from_whole,
                "{by:?} at {width} columns split a word: {word}\n{t}"
            );
        }
    }
    let rows = |t: &str| t.lines().filter(|l| l.starts_with(' ')).count();
    assert_eq!(rows(&t), rows(&unwrapped), "a row split across lines\n{t}");
    // The table's lines, not the footer's sentences.
    let widest = t
        .lines()
        .filter(|l| l.starts_with(' '))
        .map(|l| l.chars().count())
        .max()
        .unwrap();
    assert!(
        widest <= usize::from(width),
        "{by:?}: {widest} columns\n{t}"
    );
}

#[test]
fn wrapping_never_splits_an_address_a_name_or_a_count_where_they_fit() {
    for by in [
        GroupBy::Port,
        GroupBy::Process,
        GroupBy::Peer,
        GroupBy::Pair,
    ] {
        assert_whole_words(by, &SHOWN, 100, false);
    }
    // The leak as `shimcheck ports` shows it needs 84 columns: address 18 (the header), side 6,
    // count 5, `image-cri-shim(2811249)` twice, 2 blanks between columns.
    assert_whole_words(GroupBy::Port, &[TcpState::Established], 84, false);
    assert_whole_words(GroupBy::Pair, &[TcpState::Established], 84, false);
}

#[test]
fn a_terminal_too_narrow_for_whole_names_still_never_splits_a_key() {
    // Names may break here (nothing else fits), but the table stays within the terminal and
    // the key column (`10.0.0.101:33101`, not `10.0.0.101:3310` + `1`) stays whole.
    for by in [GroupBy::Port, GroupBy::Peer, GroupBy::Pair] {
        assert_whole_words(by, &[TcpState::Established], 72, true);
        assert_whole_words(by, &SHOWN, 80, true);
    }
}

/// `--all-netns`: image-cri-shim talks to a registry on 127.0.0.1:5000 in three namespaces, one
/// named after its pod, one with no name, one an `ip netns` name with an escape sequence.
fn three_namespaces(by: GroupBy) -> String {
    let mut s = busy_node();
    for (i, ns) in [111u64, 222, 333].into_iter().enumerate() {
        s.sockets.push(
            sock(
                TcpState::Established,
                "127.0.0.1:41000",
                "127.0.0.1:5000",
                7000 + i as u64,
            )
            .netns(ns),
        );
    }
    s.netns_names
        .insert(111, "kube-system/registry-master1".into());
    s.netns_names.insert(333, "lab\u{1b}[2J".into());
    let pairs = s
        .owners
        .pairs()
        .iter()
        .copied()
        .chain((7000..7003).map(|inode| (inode, 2_811_249)))
        .collect();
    s.owners = OwnerIndex::from_pairs(pairs, s.owners.processes.clone());
    let q = Query {
        port: Some(41000),
        ..query(by, &[TcpState::Established])
    };
    let mut out = Vec::new();
    render::table::render(&shimcheck::ports_report(&s, &q), &mut out, None).unwrap();
    assert!(!out.contains(&0x1b), "a raw ESC reached the table");
    String::from_utf8(out).unwrap()
}

#[test]
fn an_endpoint_in_another_namespace_says_which() {
    let endpoints = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().find(|w| w.contains('@')))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        endpoints(&three_namespaces(GroupBy::Port)),
        [
            "127.0.0.1:41000@kube-system/registry-master1",
            "127.0.0.1:41000@net:[222]",
            "127.0.0.1:41000@lab\\x1b[2J",
        ]
    );
    let remote = [
        "127.0.0.1:5000@kube-system/registry-master1",
        "127.0.0.1:5000@net:[222]",
        "127.0.0.1:5000@lab\\x1b[2J",
    ];
    assert_eq!(endpoints(&three_namespaces(GroupBy::Peer)), remote);
    let pairs = three_namespaces(GroupBy::Pair);
    assert_eq!(endpoints(&pairs), remote, "{pairs}");
    insta::assert_snapshot!(pairs);
}

/// `--color always`: severities and growth in colour; plain otherwise; and at 80 columns every
/// line fits, findings wrapped at spaces with a hanging indent, no name cut.
#[test]
fn colour_only_when_asked_and_findings_fit_the_terminal() {
    use shimcheck::render::table::Style;
    let s = sample();
    let q = query(GroupBy::Port, &[TcpState::Established]);
    let j = Joined::new(&s);
    let mut report = shimcheck::aggregate::aggregate(&j, &q);
    report.findings = detect::findings(&j, None, &DetectConfig::default());
    report.sample = Some(2);
    for g in &mut report.groups {
        g.delta = Some(3);
        g.delta_total = Some(0);
    }
    let draw = |style: Style| {
        let mut out = Vec::new();
        render::table::render(&report, &mut out, style).unwrap();
        String::from_utf8(out).unwrap()
    };
    let coloured = draw(Style {
        width: Some(80),
        color: true,
    });
    assert!(
        coloured.contains("\x1b[1;31mCRITICAL\x1b[0m idle:"),
        "{coloured}"
    );
    assert!(coloured.contains("\x1b[33m+3\x1b[0m"), "{coloured}");
    let plain = draw(Style {
        width: Some(80),
        color: false,
    });
    assert!(!plain.contains('\x1b'), "{plain}");
    assert_eq!(
        plain,
        coloured
            .replace("\x1b[1;31m", "")
            .replace("\x1b[33m", "")
            .replace("\x1b[0m", "")
    );
    for line in plain.lines() {
        assert!(line.chars().count() <= 80, "wider than 80: {line}");
    }
    let findings = &plain[plain.find("finding:").unwrap()..];
    assert!(findings.contains("\n    "), "a hanging indent: {findings}");
    for name in ["image-cri-shim(4242)", "10.0.0.101:5000", "registry(2811)"] {
        assert!(
            findings.contains(name),
            "{name} cut across lines: {findings}"
        );
    }
    // Piped: one line per finding, whatever its length.
    let piped = draw(Style::default());
    assert!(piped.lines().any(|l| l.chars().count() > 80));
}

#[test]
fn no_color_and_pipes_turn_colour_off_and_always_turns_it_on() {
    use shimcheck::cli::ColorWhen;
    use std::ffi::OsStr;
    assert!(ColorWhen::Auto.colored(true, None));
    assert!(!ColorWhen::Auto.colored(false, None), "piped");
    assert!(
        !ColorWhen::Auto.colored(true, Some(OsStr::new("1"))),
        "NO_COLOR"
    );
    assert!(
        ColorWhen::Auto.colored(true, Some(OsStr::new(""))),
        "an empty NO_COLOR is unset"
    );
    assert!(ColorWhen::Always.colored(false, Some(OsStr::new("1"))));
    assert!(!ColorWhen::Never.colored(true, None));
}

/// The value of the series of family `name` whose labels include all of `labels`.
fn series_value(
    families: &shimcheck::render::metrics::Families,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let family = families.0.iter().find(|f| f.name == name)?;
    family
        .series
        .iter()
        .find(|(have, _)| {
            labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        })
        .map(|(_, v)| *v)
}

#[test]
fn metrics_count_each_socket_once_and_a_still_sample_judges_only_the_idle_clocks_again() {
    use shimcheck::render::metrics::{self, SocketCounts};
    let cfg = DetectConfig::default();
    let s = sample();
    let families = metrics::families(&Joined::new(&s), &[], &cfg, 500);
    let conn = |process: &str, endpoint: &str, side: &str, state: &str| {
        let labels = [
            ("process", process),
            ("endpoint", endpoint),
            ("side", side),
            ("state", state),
        ];
        series_value(&families, "shimcheck_connections", &labels)
    };
    assert_eq!(
        conn("image-cri-shim", "10.0.0.101:5000", "client", "established"),
        Some(60.0)
    );
    assert_eq!(
        conn("registry", "10.0.0.101:5000", "server", "established"),
        Some(60.0)
    );
    assert_eq!(
        conn("kubelet", "[::1]:6443", "client", "established"),
        Some(3.0)
    );
    assert_eq!(
        conn("kube-apiserver", "[::1]:6443", "server", "established"),
        Some(3.0)
    );
    assert_eq!(
        conn("evil\u{1b}[31m", "127.0.0.1:7000", "client", "close_wait"),
        Some(2.0)
    );
    let idle = |families: &metrics::Families, process: &str| {
        series_value(
            families,
            "shimcheck_idle_connections",
            &[("process", process)],
        )
    };
    assert_eq!(idle(&families, "image-cri-shim"), Some(60.0));
    assert_eq!(idle(&families, "registry"), Some(60.0));
    assert_eq!(idle(&families, "kubelet"), None, "10 ms idle is not idle");
    let total = |state: &str| series_value(&families, "shimcheck_sockets", &[("state", state)]);
    assert_eq!(
        [total("listen"), total("established"), total("close_wait")],
        [Some(2.0), Some(126.0), Some(2.0)]
    );
    let ports = |endpoint: &str| {
        series_value(
            &families,
            "shimcheck_ephemeral_ports_used",
            &[("endpoint", endpoint)],
        )
    };
    assert_eq!(
        [
            ports("10.0.0.101:5000"),
            ports("[::1]:6443"),
            ports("127.0.0.1:7000")
        ],
        [Some(60.0), Some(3.0), Some(2.0)]
    );
    assert!(
        families
            .0
            .iter()
            .find(|f| f.name == "shimcheck_unattributed_sockets")
            .is_some_and(|f| f.series.is_empty())
    );
    // Five minutes later with nothing moved: the counts of the sample before, its clocks
    // brought forward, give what counting the later sample anew gives; kubelet's connections
    // are idle now.
    let mut later = s.clone();
    later.tcp_info_age_ms = 300_000;
    let kept = SocketCounts::new(&Joined::new(&s), &cfg);
    let reused = metrics::families_of(&later, &kept, &[], 500);
    assert_eq!(
        reused,
        metrics::families(&Joined::new(&later), &[], &cfg, 500)
    );
    assert_eq!(idle(&reused, "kubelet"), Some(3.0));
}
