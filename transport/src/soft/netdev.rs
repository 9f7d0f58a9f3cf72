//! Watches the network device a soft device sits on, over rtnetlink, and reports what a kernel RDMA device
//! would: the link going down or up (PORT_ERR / PORT_ACTIVE), the device's address going away or coming back
//! (ADDR_CHANGE), the netdev being deleted (DEVICE_REMOVAL).

use std::net::IpAddr;

use futures_util::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

/// What changed about the netdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetdevEvent {
    PortActive,
    PortError,
    AddressRemoved,
    AddressAdded,
    Removed,
    /// The netdev's MTU changed (to this many bytes).
    MtuChanged(u32),
}

/// The netdev holding an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netdev {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    /// The link-layer (MAC) address; `None` on links without a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// The address entry (address, prefix) that covers the device's address.
    pub entry: (IpAddr, u8),
}

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("rtnetlink: {0}")]
    Netlink(String),
    #[error("no network interface holds {0}")]
    NoInterface(IpAddr),
    #[error("no network interface named {0:?} with an address")]
    NoSuchName(String),
}

fn covers(entry: IpAddr, prefix: u8, addr: IpAddr) -> bool {
    match (entry, addr) {
        (IpAddr::V4(e), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - prefix.min(32) as u32).unwrap_or(0);
            u32::from(e) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(e), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - prefix.min(128) as u32).unwrap_or(0);
            u128::from(e) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
    msg.attributes.iter().find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None }).or_else(
        || msg.attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None }),
    )
}

fn link_up(msg: &LinkMessage) -> bool {
    msg.header.flags.contains(LinkFlags::Up) && msg.header.flags.contains(LinkFlags::Running)
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
}

fn link_mtu(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
}

fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes
        .iter()
        .find_map(|a| if let LinkAttribute::Address(m) = a { m.as_slice().try_into().ok() } else { None })
}

async fn addresses(handle: &rtnetlink::Handle) -> Result<Vec<AddressMessage>, NetdevError> {
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.next().await {
        out.push(msg.map_err(|e| NetdevError::Netlink(e.to_string()))?);
    }
    Ok(out)
}

async fn link(handle: &rtnetlink::Handle, index: u32) -> Result<LinkMessage, NetdevError> {
    let mut stream = handle.link().get().match_index(index).execute();
    match stream.next().await {
        Some(Ok(msg)) => Ok(msg),
        Some(Err(e)) => Err(NetdevError::Netlink(e.to_string())),
        None => Err(NetdevError::Netlink(format!("link {index} vanished"))),
    }
}

/// Finds the netdev whose address covers `addr` (an exact address first, then a prefix: 127.0.0.2 is on
/// `lo` through 127.0.0.1/8).
pub async fn resolve(handle: &rtnetlink::Handle, addr: IpAddr) -> Result<Netdev, NetdevError> {
    let all = addresses(handle).await?;
    let entry_of = |m: &AddressMessage| address_of(m).map(|ip| (ip, m.header.prefix_len));
    let found = all
        .iter()
        .find(|m| address_of(m) == Some(addr))
        .or_else(|| all.iter().find(|m| entry_of(m).is_some_and(|(ip, p)| covers(ip, p, addr))))
        .ok_or(NetdevError::NoInterface(addr))?;
    let index = found.header.index;
    let entry = entry_of(found).ok_or(NetdevError::NoInterface(addr))?;
    let l = link(handle, index).await?;
    Ok(Netdev {
        index,
        name: link_name(&l).unwrap_or_default(),
        mtu: link_mtu(&l).unwrap_or(1500),
        up: link_up(&l),
        mac: link_mac(&l),
        entry,
    })
}

/// The first IPv4 address (else IPv6) of the netdev named `name`.
pub async fn address_of_name(name: &str) -> Result<IpAddr, NetdevError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetdevError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let result = async {
        let mut links = handle.link().get().match_name(name.to_owned()).execute();
        let index = match links.next().await {
            Some(Ok(l)) => l.header.index,
            _ => return Err(NetdevError::NoSuchName(name.to_owned())),
        };
        let all = addresses(&handle).await?;
        let mine: Vec<IpAddr> = all.iter().filter(|m| m.header.index == index).filter_map(address_of).collect();
        mine.iter().find(|a| a.is_ipv4()).or(mine.first()).copied().ok_or(NetdevError::NoSuchName(name.to_owned()))
    }
    .await;
    task.abort();
    result
}

/// Resolves the netdev of `addr` and watches it until it is removed or `events` is closed. Returns the
/// netdev as found; the watch runs as a task on the current runtime.
pub async fn watch(addr: IpAddr, events: mpsc::UnboundedSender<NetdevEvent>) -> Result<Netdev, NetdevError> {
    let groups = [MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr];
    let (conn, handle, mut messages) =
        rtnetlink::new_multicast_connection(&groups).map_err(|e| NetdevError::Netlink(e.to_string()))?;
    let conn_task = tokio::spawn(conn);
    let netdev = match resolve(&handle, addr).await {
        Ok(n) => n,
        Err(e) => {
            conn_task.abort();
            return Err(e);
        }
    };
    let (index, entry) = (netdev.index, netdev.entry);
    let mut up = netdev.up;
    let mut mtu = netdev.mtu;
    let mut present = true;
    tokio::spawn(async move {
        let _handle = handle; // keeps the connection's request side alive
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(msg) = msg.payload else { continue };
            let event = match msg {
                RouteNetlinkMessage::NewLink(l) if l.header.index == index => {
                    if let Some(now) = link_mtu(&l).filter(|m| *m != mtu) {
                        mtu = now;
                        if events.send(NetdevEvent::MtuChanged(now)).is_err() {
                            break;
                        }
                    }
                    let now_up = link_up(&l);
                    if now_up == up {
                        continue;
                    }
                    up = now_up;
                    if up { NetdevEvent::PortActive } else { NetdevEvent::PortError }
                }
                RouteNetlinkMessage::DelLink(l) if l.header.index == index => {
                    let _ = events.send(NetdevEvent::Removed);
                    break;
                }
                RouteNetlinkMessage::DelAddress(a)
                    if a.header.index == index && present && address_of(&a) == Some(entry.0) =>
                {
                    present = false;
                    NetdevEvent::AddressRemoved
                }
                RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == index
                        && !present
                        && address_of(&a).is_some_and(|ip| covers(ip, a.header.prefix_len, addr)) =>
                {
                    present = true;
                    NetdevEvent::AddressAdded
                }
                _ => continue,
            };
            if events.send(event).is_err() {
                break;
            }
        }
        conn_task.abort();
    });
    Ok(netdev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cover() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(covers(v4("127.0.0.1"), 8, v4("127.0.0.2")));
        assert!(!covers(v4("127.0.0.1"), 8, v4("128.0.0.1")));
        assert!(covers(v4("198.18.0.1"), 24, v4("198.18.0.1")));
        assert!(!covers(v4("198.18.0.1"), 32, v4("198.18.0.2")));
        assert!(covers(v4("10.0.0.0"), 0, v4("1.2.3.4")));
        assert!(covers(v4("fd00::1"), 64, v4("fd00::2")));
        assert!(!covers(v4("fd00::1"), 64, v4("127.0.0.1")));
    }

    #[tokio::test]
    async fn loopback_is_found() {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        let lo = resolve(&handle, "127.0.0.2".parse().unwrap()).await.unwrap();
        assert_eq!((lo.name.as_str(), lo.up), ("lo", true));
        assert!(lo.mtu >= 1500);
        assert_eq!(address_of_name("lo").await.unwrap(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(matches!(address_of_name("no-such-netdev0").await, Err(NetdevError::NoSuchName(_))));
    }
}
