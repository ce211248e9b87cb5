//! Known culprits: data, one entry per program whose leak shimcheck recognises by name. The
//! detector attaches the entry's diagnosis and remediation to any finding about a process of
//! that name. Adding the next culprit is adding one entry here (and a row in the "Known
//! culprits" table of docs/detection.md).

/// A program with a known connection-leak bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Culprit {
    /// The process name (`comm`) to match.
    pub comm: &'static str,
    /// What is wrong, one sentence fragment the finding's message ends with.
    pub bug: &'static str,
    /// What to do.
    pub remediation: &'static str,
}

/// Every known culprit.
pub const CULPRITS: &[Culprit] = &[Culprit {
    comm: "image-cri-shim",
    bug: "image-cri-shim before v4.2.0 leaks one registry connection per image lookup",
    remediation: "replace /usr/bin/image-cri-shim with v4.2.0 or later on every node and run \
                  `systemctl restart image-cri-shim`",
}];

/// The culprit entry for a process name, if it is a known one.
pub fn lookup(comm: &str) -> Option<&'static Culprit> {
    CULPRITS.iter().find(|c| c.comm == comm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_cri_shim_is_known_and_names_its_fix() {
        let c = lookup("image-cri-shim").unwrap();
        assert!(c.bug.contains("before v4.2.0"));
        assert!(c.remediation.contains("systemctl restart image-cri-shim"));
        assert!(lookup("registry").is_none());
    }
}
