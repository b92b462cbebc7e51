//! Who may change rules: root, the daemon's own user, or members of the
//! configured admin group, identified by the peer credentials the kernel
//! attaches to the Unix socket (SO_PEERCRED). Anyone who can connect (socket
//! mode 0660 by default) may acquire and read.

use std::fs;

/// The credentials of a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The admin policy.
#[derive(Debug, Clone, Copy)]
pub struct Authorizer {
    daemon_uid: u32,
    admin_gid: Option<u32>,
}

impl Authorizer {
    pub fn new(admin_gid: Option<u32>) -> Authorizer {
        Authorizer {
            daemon_uid: nix::unistd::geteuid().as_raw(),
            admin_gid,
        }
    }

    /// Whether `peer` may change rules. Supplementary groups are read from
    /// `/proc/<pid>/status` (only on admin requests, never on the hot path).
    pub fn may_administer(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.daemon_uid {
            return true;
        }
        let Some(admin) = self.admin_gid else {
            return false;
        };
        peer.gid == admin
            || peer
                .pid
                .is_some_and(|pid| supplementary_groups(pid).contains(&admin))
    }

    /// The refusal message for a peer that may not administer.
    pub fn refusal(&self, peer: &Peer, what: &str) -> String {
        let group = match self.admin_group_name() {
            Some(g) => format!(", or a member of group {g}"),
            None => String::new(),
        };
        format!(
            "uid {} may not {what}: rule changes need root, the daemon's user (uid {}){group}; \
             run rlctl as one of them (e.g. with sudo)",
            peer.uid, self.daemon_uid
        )
    }

    fn admin_group_name(&self) -> Option<String> {
        let gid = self.admin_gid?;
        Some(
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |g| g.name),
        )
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_own_user_administer_others_do_not() {
        let a = Authorizer {
            daemon_uid: 1000,
            admin_gid: Some(50),
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        assert!(a.may_administer(&peer(0, 0)));
        assert!(a.may_administer(&peer(1000, 1000)));
        assert!(a.may_administer(&peer(2000, 50)));
        assert!(!a.may_administer(&peer(2000, 2000)));
        let no_group = Authorizer {
            daemon_uid: 1000,
            admin_gid: None,
        };
        assert!(!no_group.may_administer(&peer(2000, 50)));
    }

    #[test]
    fn reads_our_own_groups() {
        let me = std::process::id() as i32;
        let groups = supplementary_groups(me);
        let expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(groups, expected);
    }
}
