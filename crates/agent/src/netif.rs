//! The network interface PyTorch's Gloo collectives use. Gloo picks its interface by resolving the
//! host's name, which on many hosts gives loopback (Debian's `127.0.1.1 host` line, or a name no
//! DNS knows), and a job across hosts then fails to connect: torchrun users set
//! GLOO_SOCKET_IFNAME by hand. The agent knows the address its peers reach it at (`--addr`), so
//! it names that address's interface, unless the job's spec or the node's own environment chose
//! one.

use std::net::{IpAddr, ToSocketAddrs};

/// The interface holding `addr` (an address or a host name), or None where none does.
pub fn interface_of(addr: &str) -> Option<String> {
    let ip: IpAddr =
        addr.parse().ok().or_else(|| (addr, 0).to_socket_addrs().ok()?.next().map(|a| a.ip()))?;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read and then free, once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() && found.is_none() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        if let Some(have) = unsafe { sockaddr_ip(entry.ifa_addr) } {
            if have == ip {
                // SAFETY: ifa_name is a NUL-terminated string owned by the list.
                found =
                    Some(unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }.to_string_lossy().into_owned());
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated, after its last use.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The IP address of an interface address entry, if it is one.
///
/// # Safety
/// `sa` is null or points to a sockaddr of the family it names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match (*sa).sa_family as libc::c_int {
        libc::AF_INET => {
            let v4 = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
        }
        libc::AF_INET6 => {
            let v6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::from(v6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// GLOO_SOCKET_IFNAME for a rank: the agent's interface, where the job and the node set none.
pub fn rank_env(
    interface: Option<&str>,
    job_env: &[(String, String)],
    node_has_it: bool,
) -> Vec<(String, String)> {
    let name = proto::env::GLOO_SOCKET_IFNAME;
    match interface {
        Some(i) if !node_has_it && !job_env.iter().any(|(k, _)| k == name) => {
            vec![(name.to_string(), i.to_string())]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_an_address_no_interface_holds_is_not() {
        assert_eq!(interface_of("127.0.0.1").as_deref(), Some("lo"));
        // TEST-NET-3 (RFC 5737): no host holds it.
        assert_eq!(interface_of("203.0.113.77"), None);
    }

    #[test]
    fn the_job_and_the_node_choose_first() {
        let job = vec![("GLOO_SOCKET_IFNAME".to_string(), "ib0".to_string())];
        assert_eq!(
            rank_env(Some("eth0"), &[], false),
            vec![("GLOO_SOCKET_IFNAME".to_string(), "eth0".to_string())]
        );
        assert!(rank_env(Some("eth0"), &job, false).is_empty());
        assert!(rank_env(Some("eth0"), &[], true).is_empty());
        assert!(rank_env(None, &[], false).is_empty());
    }
}
