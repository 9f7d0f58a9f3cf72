//! The UDP source port of RoCEv2 packets, as Linux derives it.
//!
//! RoCEv2 puts entropy for ECMP in the UDP source port, taken from the 20-bit flow label
//! (`rdma_flow_label_to_udp_sport`, range 0xC000..=0xFFFF). For connections made by rdma_cm the flow label
//! comes from the CM path record, which cma computes from the connection's TCP-style port pair
//! (`cma_get_roce_udp_flow_label`: `sport * 31 + dport`), and both ends use it. QPs without a flow label —
//! rxe's QP1, which carries the CM MADs — use rxe's hash of the QP number (`rxe_qp_init_req`).

/// Lowest source port RoCEv2 uses (`IB_ROCE_UDP_ENCAP_VALID_PORT_MIN`).
pub const SOURCE_PORT_MIN: u16 = 0xc000;
const FLOW_LABEL_MASK: u32 = 0x000f_ffff;
const GOLDEN_RATIO_32: u32 = 0x61c8_8647;

/// `rdma_flow_label_to_udp_sport`.
pub const fn from_flow_label(flow_label: u32) -> u16 {
    let fl = flow_label & FLOW_LABEL_MASK;
    let low = (fl & 0x3fff) ^ ((fl & 0xf_c000) >> 14);
    (low as u16) | SOURCE_PORT_MIN
}

/// The flow label rdma_cm puts in the path record of a RoCE connection between these rdma_cm ports
/// (`cma_get_roce_udp_flow_label` for IPv4, or IPv6 without a flow label of its own).
pub const fn cm_flow_label(src_port: u16, dst_port: u16) -> u32 {
    (src_port as u32).wrapping_mul(31).wrapping_add(dst_port as u32) & FLOW_LABEL_MASK
}

/// `rdma_calc_flow_label`: the flow label for a QP pair when nothing else provides one.
pub const fn qp_pair_flow_label(local_qpn: u32, remote_qpn: u32) -> u32 {
    let mut v = local_qpn as u64 * remote_qpn as u64;
    v ^= v >> 20;
    v ^= v >> 40;
    (v as u32) & FLOW_LABEL_MASK
}

/// rxe's default for a QP's source port before a path sets one: `0xC000 + (hash_32(qpn, 14) & 0x3fff)`.
pub const fn rxe_default(qpn: u32) -> u16 {
    SOURCE_PORT_MIN + ((qpn.wrapping_mul(GOLDEN_RATIO_32) >> 18) & 0x3fff) as u16
}
