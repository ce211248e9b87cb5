//! Fuzz target: the cgroup path and pod-directory name parsers (stage 2) on arbitrary text,
//! one name per line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = shimcheck::cgroup::placement_of_path(line);
        let _ = shimcheck::cgroup::parse_pod_dir(line);
    }
});
