//! Who may change rules: root, the daemon's own user, or members of the
//! configured admin group (primary or supplementary), decided from the
//! credentials the kernel attaches to the Unix socket at connect
//! (SO_PEERCRED for uid/gid, SO_PEERGROUPS for supplementary groups), never
//! from `/proc` later, where a reused pid or `ProtectProc=invisible` would
//! decide instead. Anyone who can connect (socket mode 0660 by default) may
//! acquire and read.

use std::os::fd::AsRawFd;

/// The credentials of a connected peer, as they were at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The admin group is among the peer's supplementary groups.
    pub in_admin_group: bool,
}

/// The admin policy.
#[derive(Debug, Clone)]
pub struct Authorizer {
    daemon_uid: u32,
    admin_gid: Option<u32>,
    /// The admin group's name for refusal messages, looked up once (a
    /// lookup may ask NSS, LDAP or sssd: not once per refused request).
    admin_group_name: Option<String>,
}

impl Authorizer {
    pub fn new(admin_gid: Option<u32>) -> Authorizer {
        Authorizer {
            daemon_uid: nix::unistd::geteuid().as_raw(),
            admin_gid,
            admin_group_name: admin_gid.map(group_name),
        }
    }

    /// The credentials of a just-accepted connection.
    ///
    /// # Errors
    /// The kernel would not say who the peer is.
    pub fn peer_of(&self, stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let c = stream.peer_cred()?;
        let in_admin_group = self
            .admin_gid
            .is_some_and(|admin| peer_groups(stream.as_raw_fd()).contains(&admin));
        Ok(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            in_admin_group,
        })
    }

    /// Whether `peer` may change rules.
    pub fn may_administer(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.daemon_uid {
            return true;
        }
        let Some(admin) = self.admin_gid else {
            return false;
        };
        peer.gid == admin || peer.in_admin_group
    }

    /// The refusal message for a peer that may not administer.
    pub fn refusal(&self, peer: &Peer, what: &str) -> String {
        let group = match &self.admin_group_name {
            Some(g) => format!(", or a member of group {g}"),
            None => String::new(),
        };
        format!(
            "uid {} may not {what}: rule changes need root, the daemon's user (uid {}){group}; \
             run rlctl as one of them (e.g. with sudo)",
            peer.uid, self.daemon_uid
        )
    }
}

/// The name of group `gid` (its number when it has none).
fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// The peer's supplementary groups as the kernel recorded them at connect
/// (SO_PEERGROUPS, Linux 4.13+); empty if unavailable.
fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = nix::libc::socklen_t::try_from(groups.len() * 4).unwrap_or(0);
        // SAFETY: `groups` is a writable buffer of `len` bytes and `len` is a
        // valid out-parameter; the kernel writes at most `len` bytes.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                nix::libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return groups;
        }
        let too_small = std::io::Error::last_os_error().raw_os_error() == Some(nix::libc::ERANGE);
        let needed = len as usize / 4;
        if too_small && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_own_user_administer_others_do_not() {
        let a = Authorizer {
            daemon_uid: 1000,
            admin_gid: Some(50),
            admin_group_name: Some("ops".into()),
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
            in_admin_group: false,
        };
        assert!(a.may_administer(&peer(0, 0)));
        assert!(a.may_administer(&peer(1000, 1000)));
        assert!(a.may_administer(&peer(2000, 50)));
        assert!(!a.may_administer(&peer(2000, 2000)));
        let no_group = Authorizer {
            daemon_uid: 1000,
            admin_gid: None,
            admin_group_name: None,
        };
        assert!(!no_group.may_administer(&peer(2000, 50)));
        // A supplementary group, as recorded at connect.
        let member = Peer {
            in_admin_group: true,
            ..peer(2000, 2000)
        };
        assert!(a.may_administer(&member));
        assert!(!no_group.may_administer(&member));
    }

    #[tokio::test]
    async fn the_kernel_reports_our_groups_at_connect() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let mut groups = peer_groups(a.as_raw_fd());
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.sort_unstable();
        expected.sort_unstable();
        assert_eq!(groups, expected);
    }
}
