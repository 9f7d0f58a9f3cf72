//! The kernel's connection-manager ABI (`/dev/infiniband/rdma_cm`, `rdma_user_cm.h`, ABI version 4): commands
//! as bytes, and the responses the kernel writes back, parsed. Sans-IO: the syscalls are in `ffi`.
//!
//! We speak it ourselves rather than through librdmacm because librdmacm opens a device context of its own
//! for every device an id touches and closes it only when it sees the device gone from a non-empty device
//! list: on a host whose only RDMA device is removed it never does, and a device without context
//! disassociation (rxe, siw) then cannot finish its removal while the process lives. With this module the
//! provider opens the one device context it uses and closes it when the device goes away.
//!
//! Every command is a header (`cmd: u32, in: u16, out: u16`) followed by its fixed-size body; a command with
//! a reply carries the address of a buffer the kernel fills (`response`). Integers are native-endian; port
//! numbers inside socket addresses are big-endian as always.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Command numbers.
pub mod cmd {
    pub const CREATE_ID: u32 = 0;
    pub const DESTROY_ID: u32 = 1;
    pub const RESOLVE_ROUTE: u32 = 4;
    pub const CONNECT: u32 = 6;
    pub const LISTEN: u32 = 7;
    pub const ACCEPT: u32 = 8;
    pub const REJECT: u32 = 9;
    pub const DISCONNECT: u32 = 10;
    pub const INIT_QP_ATTR: u32 = 11;
    pub const GET_EVENT: u32 = 12;
    pub const QUERY: u32 = 19;
    pub const BIND: u32 = 20;
    pub const RESOLVE_ADDR: u32 = 21;
}

/// Event numbers (`enum rdma_cm_event_type`, the same in the kernel and in librdmacm).
pub mod event {
    pub const ADDR_RESOLVED: u32 = 0;
    pub const ADDR_ERROR: u32 = 1;
    pub const ROUTE_RESOLVED: u32 = 2;
    pub const ROUTE_ERROR: u32 = 3;
    pub const CONNECT_REQUEST: u32 = 4;
    pub const CONNECT_RESPONSE: u32 = 5;
    pub const CONNECT_ERROR: u32 = 6;
    pub const UNREACHABLE: u32 = 7;
    pub const REJECTED: u32 = 8;
    pub const ESTABLISHED: u32 = 9;
    pub const DISCONNECTED: u32 = 10;
    pub const DEVICE_REMOVAL: u32 = 11;
    pub const ADDR_CHANGE: u32 = 14;
    pub const TIMEWAIT_EXIT: u32 = 15;
}

/// `RDMA_PS_TCP`: reliable-connected ids in the IP port space.
const PS_TCP: u16 = 0x0106;
/// `IBV_QPT_RC`.
const QPT_RC: u8 = 2;
const QUERY_ADDR: u32 = 0;
const MAX_PRIVATE_DATA: usize = 256;
/// `struct __kernel_sockaddr_storage`.
const SOCKADDR_STORAGE: usize = 128;
/// `struct rdma_ucm_conn_param`.
const CONN_PARAM_LEN: usize = 272;

pub const CREATE_ID_RESP_LEN: usize = 4;
pub const DESTROY_ID_RESP_LEN: usize = 4;
/// `struct rdma_ucm_query_addr_resp`.
pub const QUERY_ADDR_RESP_LEN: usize = 280;
/// Where its `ibdev_index` sits.
const IBDEV_INDEX_AT: usize = 272;
/// `struct ib_uverbs_qp_attr`.
pub const QP_ATTR_RESP_LEN: usize = 144;
/// `struct rdma_ucm_event_resp`.
pub const EVENT_RESP_LEN: usize = 336;

/// A value this ABI cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("private data of {0} bytes does not fit a connection-manager message (at most 255 here)")]
    PrivateDataTooLong(usize),
}

/// Private data's length as the one byte the ABI has for it.
fn private_data_len(data: &[u8]) -> Result<u8, EncodeError> {
    u8::try_from(data.len()).map_err(|_| EncodeError::PrivateDataTooLong(data.len()))
}

/// A command body under construction.
struct Body(Vec<u8>);

impl Body {
    fn new(len: usize) -> Body {
        Body(vec![0; len])
    }
    fn u8(mut self, at: usize, v: u8) -> Body {
        self.0[at] = v;
        self
    }
    fn u16(mut self, at: usize, v: u16) -> Body {
        self.0[at..at + 2].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u32(mut self, at: usize, v: u32) -> Body {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Body {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, at: usize, v: &[u8]) -> Body {
        self.0[at..at + v.len()].copy_from_slice(v);
        self
    }
    /// The command: header, then this body.
    fn command(self, op: u32, out: usize) -> Vec<u8> {
        let mut c = Vec::with_capacity(8 + self.0.len());
        c.extend_from_slice(&op.to_ne_bytes());
        c.extend_from_slice(&(self.0.len() as u16).to_ne_bytes());
        c.extend_from_slice(&(out as u16).to_ne_bytes());
        c.extend_from_slice(&self.0);
        c
    }
}

/// A socket address as `struct sockaddr_in` / `sockaddr_in6` bytes, and its length.
pub fn sockaddr(addr: SocketAddr) -> Vec<u8> {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = vec![0; 16];
            b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            b
        }
        SocketAddr::V6(a) => {
            let mut b = vec![0; 28];
            b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_ne_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            b
        }
    }
}

/// Reads a socket address the kernel wrote; `None` for a family other than IPv4 and IPv6, or too few bytes.
pub fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn create_id(uid: u64, response: u64) -> Vec<u8> {
    Body::new(24)
        .u64(0, uid)
        .u64(8, response)
        .u16(16, PS_TCP)
        .u8(18, QPT_RC)
        .command(cmd::CREATE_ID, CREATE_ID_RESP_LEN)
}

pub fn destroy_id(response: u64, id: u32) -> Vec<u8> {
    Body::new(16).u64(0, response).u32(8, id).command(cmd::DESTROY_ID, DESTROY_ID_RESP_LEN)
}

pub fn bind(id: u32, addr: SocketAddr) -> Vec<u8> {
    let sa = sockaddr(addr);
    Body::new(8 + SOCKADDR_STORAGE).u32(0, id).u16(4, sa.len() as u16).bytes(8, &sa).command(cmd::BIND, 0)
}

pub fn resolve_addr(id: u32, src: Option<SocketAddr>, dst: SocketAddr, timeout_ms: u32) -> Vec<u8> {
    let src = src.map(sockaddr).unwrap_or_default();
    let dst = sockaddr(dst);
    Body::new(16 + 2 * SOCKADDR_STORAGE)
        .u32(0, id)
        .u32(4, timeout_ms)
        .u16(8, src.len() as u16)
        .u16(10, dst.len() as u16)
        .bytes(16, &src)
        .bytes(16 + SOCKADDR_STORAGE, &dst)
        .command(cmd::RESOLVE_ADDR, 0)
}

pub fn resolve_route(id: u32, timeout_ms: u32) -> Vec<u8> {
    Body::new(8).u32(0, id).u32(4, timeout_ms).command(cmd::RESOLVE_ROUTE, 0)
}

/// The buffer a QUERY (addr) reply goes into: a kernel that does not report device indexes leaves the index
/// "unknown" (all ones), as it is preset here.
pub fn query_addr_response() -> Vec<u8> {
    let mut b = vec![0; QUERY_ADDR_RESP_LEN];
    b[IBDEV_INDEX_AT..IBDEV_INDEX_AT + 4].fill(0xff);
    b
}

pub fn query_addr(response: u64, id: u32) -> Vec<u8> {
    Body::new(16).u64(0, response).u32(8, id).u32(12, QUERY_ADDR).command(cmd::QUERY, QUERY_ADDR_RESP_LEN)
}

pub fn listen(id: u32, backlog: u32) -> Vec<u8> {
    Body::new(8).u32(0, id).u32(4, backlog).command(cmd::LISTEN, 0)
}

/// What one side sends in a connect or an accept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnParam {
    pub qp_num: u32,
    pub private_data: Vec<u8>,
    pub srq: bool,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
}

impl ConnParam {
    /// `struct rdma_ucm_conn_param`, marked valid.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let len = private_data_len(&self.private_data)?;
        Ok(Body::new(CONN_PARAM_LEN)
            .u32(0, self.qp_num & 0xff_ffff)
            .bytes(8, &self.private_data)
            .u8(264, len)
            .u8(265, u8::from(self.srq))
            .u8(266, self.responder_resources)
            .u8(267, self.initiator_depth)
            .u8(268, 1)
            .u8(269, self.retry_count.min(7))
            .u8(270, self.rnr_retry_count.min(7))
            .u8(271, 1)
            .0)
    }

    fn parse(b: &[u8]) -> ConnParam {
        let len = usize::from(b[264]).min(MAX_PRIVATE_DATA);
        ConnParam {
            qp_num: u32_at(b, 0) & 0xff_ffff,
            private_data: b[8..8 + len].to_vec(),
            srq: b[265] != 0,
            responder_resources: b[266],
            initiator_depth: b[267],
            retry_count: b[269],
            rnr_retry_count: b[270],
        }
    }
}

pub fn connect(id: u32, param: &ConnParam) -> Result<Vec<u8>, EncodeError> {
    let p = param.encode()?;
    Ok(Body::new(CONN_PARAM_LEN + 16).bytes(0, &p).u32(CONN_PARAM_LEN, id).command(cmd::CONNECT, 0))
}

/// An accept: with parameters on the passive side; without, the active side's "ready to use" after a connect
/// response (what librdmacm's `rdma_establish` sends).
pub fn accept(uid: u64, id: u32, param: Option<&ConnParam>) -> Result<Vec<u8>, EncodeError> {
    let p = param.map(ConnParam::encode).transpose()?.unwrap_or_else(|| vec![0; CONN_PARAM_LEN]);
    Ok(Body::new(8 + CONN_PARAM_LEN + 16).u64(0, uid).bytes(8, &p).u32(8 + CONN_PARAM_LEN, id).command(cmd::ACCEPT, 0))
}

pub fn reject(id: u32, private_data: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let len = private_data_len(private_data)?;
    // Reason 0: the kernel sends "consumer defined" with our private data.
    Ok(Body::new(8 + MAX_PRIVATE_DATA).u32(0, id).u8(4, len).bytes(8, private_data).command(cmd::REJECT, 0))
}

pub fn disconnect(id: u32) -> Vec<u8> {
    Body::new(4).u32(0, id).command(cmd::DISCONNECT, 0)
}

pub fn init_qp_attr(response: u64, id: u32, qp_state: u32) -> Vec<u8> {
    Body::new(16).u64(0, response).u32(8, id).u32(12, qp_state).command(cmd::INIT_QP_ATTR, QP_ATTR_RESP_LEN)
}

pub fn get_event(response: u64) -> Vec<u8> {
    Body::new(8).u64(0, response).command(cmd::GET_EVENT, EVENT_RESP_LEN)
}

pub fn created_id(resp: &[u8]) -> u32 {
    u32_at(resp, 0)
}

/// Where an id is bound: the device (`node_guid` as the kernel stores it, big-endian, and its index) and port,
/// and both ends' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub node_guid: u64,
    pub port_num: u8,
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub ibdev_index: u32,
}

impl AddrInfo {
    pub fn parse(b: &[u8]) -> AddrInfo {
        let src_len = usize::from(u16_at(b, 12)).min(SOCKADDR_STORAGE);
        let dst_len = usize::from(u16_at(b, 14)).min(SOCKADDR_STORAGE);
        AddrInfo {
            node_guid: u64_at(b, 0),
            port_num: b[8],
            src: parse_sockaddr(&b[16..16 + src_len]),
            dst: parse_sockaddr(&b[144..144 + dst_len]),
            ibdev_index: u32_at(b, IBDEV_INDEX_AT),
        }
    }

    /// Whether the id is on a device at all (an id bound to an address no RDMA device serves is not).
    pub fn has_device(&self) -> bool {
        self.node_guid != 0
    }
}

/// `struct ib_uverbs_ah_attr`, field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AhAttr {
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

impl AhAttr {
    fn parse(b: &[u8]) -> AhAttr {
        AhAttr {
            dgid: b[0..16].try_into().expect("16 bytes"),
            flow_label: u32_at(b, 16),
            sgid_index: b[20],
            hop_limit: b[21],
            traffic_class: b[22],
            dlid: u16_at(b, 24),
            sl: b[26],
            src_path_bits: b[27],
            static_rate: b[28],
            is_global: b[29],
            port_num: b[30],
        }
    }
}

/// `struct ib_uverbs_qp_attr`: the attributes a queue pair needs for a state of this connection, and which of
/// them apply (`mask`, the same bits as `ibv_qp_attr_mask`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QpAttrs {
    pub mask: u32,
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub ah_attr: AhAttr,
    pub alt_ah_attr: AhAttr,
    pub cap: [u32; 5],
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
}

impl QpAttrs {
    pub fn parse(b: &[u8]) -> QpAttrs {
        let w = |i: usize| u32_at(b, 4 * i);
        QpAttrs {
            // Bits above IBV_QP_DEST_QPN were kernel-internal in some kernels; user space has no use for them.
            mask: w(0) & ((1 << 21) - 1),
            qp_state: w(1),
            cur_qp_state: w(2),
            path_mtu: w(3),
            path_mig_state: w(4),
            qkey: w(5),
            rq_psn: w(6),
            sq_psn: w(7),
            dest_qp_num: w(8),
            qp_access_flags: w(9),
            ah_attr: AhAttr::parse(&b[40..72]),
            alt_ah_attr: AhAttr::parse(&b[72..104]),
            cap: [u32_at(b, 104), u32_at(b, 108), u32_at(b, 112), u32_at(b, 116), u32_at(b, 120)],
            pkey_index: u16_at(b, 124),
            alt_pkey_index: u16_at(b, 126),
            en_sqd_async_notify: b[128],
            sq_draining: b[129],
            max_rd_atomic: b[130],
            max_dest_rd_atomic: b[131],
            min_rnr_timer: b[132],
            port_num: b[133],
            timeout: b[134],
            retry_cnt: b[135],
            rnr_retry: b[136],
            alt_port_num: b[137],
            alt_timeout: b[138],
        }
    }
}

/// `struct rdma_ucm_event_resp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `uid` the id was created (or accepted) with; for a connect request, the listener's.
    pub uid: u64,
    /// The kernel's handle of the id the event is for; for a connect request, the new id's.
    pub id: u32,
    pub kind: u32,
    pub status: i32,
    /// For connect requests, responses, establishment and rejects: the peer's parameters.
    pub conn: Option<ConnParam>,
}

impl Event {
    pub fn parse(b: &[u8]) -> Event {
        let kind = u32_at(b, 12);
        let carries_conn =
            matches!(kind, event::CONNECT_REQUEST | event::CONNECT_RESPONSE | event::ESTABLISHED | event::REJECTED);
        Event {
            uid: u64_at(b, 0),
            id: u32_at(b, 8),
            kind,
            status: u32_at(b, 16) as i32,
            conn: carries_conn.then(|| ConnParam::parse(&b[20..20 + CONN_PARAM_LEN])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(c: &[u8]) -> (u32, u16, u16) {
        (u32_at(c, 0), u16_at(c, 4), u16_at(c, 6))
    }

    #[test]
    fn command_sizes_are_the_kernel_structs() {
        let a: SocketAddr = "198.18.0.1:4420".parse().unwrap();
        // Sizes of the rdma_ucm_* structs in rdma_user_cm.h (ABI 4), plus the 8-byte header.
        assert_eq!(header(&create_id(1, 2)), (cmd::CREATE_ID, 24, 4));
        assert_eq!(header(&destroy_id(2, 3)), (cmd::DESTROY_ID, 16, 4));
        assert_eq!(header(&bind(3, a)), (cmd::BIND, 136, 0));
        assert_eq!(header(&resolve_addr(3, None, a, 100)), (cmd::RESOLVE_ADDR, 272, 0));
        assert_eq!(header(&resolve_route(3, 100)), (cmd::RESOLVE_ROUTE, 8, 0));
        assert_eq!(header(&query_addr(9, 3)), (cmd::QUERY, 16, 280));
        assert_eq!(header(&listen(3, 128)), (cmd::LISTEN, 8, 0));
        assert_eq!(header(&connect(3, &ConnParam::default()).unwrap()), (cmd::CONNECT, 288, 0));
        assert_eq!(header(&accept(7, 3, None).unwrap()), (cmd::ACCEPT, 296, 0));
        assert_eq!(header(&reject(3, &[]).unwrap()), (cmd::REJECT, 264, 0));
        assert_eq!(header(&disconnect(3)), (cmd::DISCONNECT, 4, 0));
        assert_eq!(header(&init_qp_attr(9, 3, 2)), (cmd::INIT_QP_ATTR, 16, 144));
        assert_eq!(header(&get_event(9)), (cmd::GET_EVENT, 8, 336));
        for c in [create_id(1, 2), bind(3, a), connect(3, &ConnParam::default()).unwrap()] {
            assert_eq!(c.len(), 8 + usize::from(header(&c).1));
        }
    }

    #[test]
    fn bind_carries_a_sockaddr_in_with_its_length() {
        let c = bind(5, "198.18.0.1:4420".parse().unwrap());
        let body = &c[8..];
        assert_eq!(u32_at(body, 0), 5);
        assert_eq!(u16_at(body, 4), 16);
        assert_eq!(&body[8..16], &[libc::AF_INET as u8, 0, 0x11, 0x44, 198, 18, 0, 1]);
    }

    #[test]
    fn connect_parameters_sit_where_the_kernel_reads_them() {
        let p = ConnParam {
            qp_num: 0x1234_5678,
            private_data: vec![0xaa; 32],
            srq: true,
            responder_resources: 16,
            initiator_depth: 8,
            retry_count: 9,
            rnr_retry_count: 7,
        };
        let c = connect(42, &p).unwrap();
        let body = &c[8..];
        assert_eq!(u32_at(body, 0), 0x34_5678, "a queue pair number has 24 bits");
        assert_eq!(&body[8..40], &[0xaa; 32][..]);
        assert_eq!(
            &body[264..272],
            &[32, 1, 16, 8, 1, 7, 7, 1],
            "len, srq, resp res, init depth, flow, retry, rnr, valid"
        );
        assert_eq!(u32_at(body, 272), 42);
        let a = accept(0xdead_beef_0000_0001, 42, Some(&p)).unwrap();
        assert_eq!(u64_at(&a[8..], 0), 0xdead_beef_0000_0001);
        assert_eq!(a[8 + 8 + 271], 1, "valid");
        assert_eq!(u32_at(&a[8..], 280), 42);
        let establish = accept(0, 42, None).unwrap();
        assert_eq!(establish[8 + 8 + 271], 0, "no parameters: the active side's RTU");
    }

    #[test]
    fn oversized_private_data_is_an_error_not_a_truncation() {
        let p = ConnParam { private_data: vec![0; 300], ..ConnParam::default() };
        assert_eq!(connect(1, &p), Err(EncodeError::PrivateDataTooLong(300)));
        assert_eq!(reject(1, &[0; 256]), Err(EncodeError::PrivateDataTooLong(256)));
    }

    #[test]
    fn a_connect_request_event_parses() {
        let mut b = vec![0u8; EVENT_RESP_LEN];
        b[0..8].copy_from_slice(&77u64.to_ne_bytes());
        b[8..12].copy_from_slice(&5u32.to_ne_bytes());
        b[12..16].copy_from_slice(&event::CONNECT_REQUEST.to_ne_bytes());
        b[20..24].copy_from_slice(&0x11u32.to_ne_bytes());
        b[28..30].copy_from_slice(&[1, 2]);
        b[20 + 264] = 2;
        b[20 + 266] = 16;
        b[20 + 267] = 8;
        b[20 + 269] = 7;
        b[20 + 270] = 6;
        let e = Event::parse(&b);
        assert_eq!((e.uid, e.id, e.kind, e.status), (77, 5, event::CONNECT_REQUEST, 0));
        let c = e.conn.unwrap();
        assert_eq!((c.qp_num, c.private_data, c.responder_resources, c.initiator_depth), (0x11, vec![1, 2], 16, 8));
        assert_eq!((c.retry_count, c.rnr_retry_count), (7, 6));
        b[12..16].copy_from_slice(&event::DISCONNECTED.to_ne_bytes());
        assert_eq!(Event::parse(&b).conn, None);
    }

    #[test]
    fn addresses_and_queue_pair_attributes_parse() {
        let mut b = vec![0u8; QUERY_ADDR_RESP_LEN];
        b[0..8].copy_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes());
        b[8] = 1;
        b[12..14].copy_from_slice(&16u16.to_ne_bytes());
        b[14..16].copy_from_slice(&16u16.to_ne_bytes());
        b[16..32].copy_from_slice(&sockaddr("198.18.0.1:4420".parse().unwrap()));
        b[144..160].copy_from_slice(&sockaddr("198.18.0.2:50000".parse().unwrap()));
        b[272..276].copy_from_slice(&3u32.to_ne_bytes());
        let a = AddrInfo::parse(&b);
        assert!(a.has_device());
        assert_eq!((a.port_num, a.ibdev_index), (1, 3));
        assert_eq!(a.src, Some("198.18.0.1:4420".parse().unwrap()));
        assert_eq!(a.dst, Some("198.18.0.2:50000".parse().unwrap()));
        // A kernel that writes no index leaves the preset "unknown".
        let unwritten = query_addr_response();
        assert_eq!((unwritten.len(), AddrInfo::parse(&unwritten).ibdev_index), (QUERY_ADDR_RESP_LEN, u32::MAX));

        let mut q = vec![0u8; QP_ATTR_RESP_LEN];
        q[0..4].copy_from_slice(&(1u32 | 1 << 7 | 1 << 22).to_ne_bytes());
        q[4..8].copy_from_slice(&3u32.to_ne_bytes());
        q[32..36].copy_from_slice(&0x99u32.to_ne_bytes());
        q[40] = 0xfe;
        q[40 + 29] = 1;
        q[131] = 16;
        q[133] = 1;
        let attrs = QpAttrs::parse(&q);
        assert_eq!(attrs.mask, 1 | 1 << 7, "kernel-only bits dropped");
        assert_eq!((attrs.qp_state, attrs.dest_qp_num, attrs.max_dest_rd_atomic, attrs.port_num), (3, 0x99, 16, 1));
        assert_eq!((attrs.ah_attr.dgid[0], attrs.ah_attr.is_global), (0xfe, 1));
        assert_eq!(parse_sockaddr(&[0; 16]), None);
    }
}
