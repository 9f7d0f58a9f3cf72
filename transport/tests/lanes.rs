//! Lanes: queue pairs of a soft device driven on other threads than the device's, each its own socket in the
//! device's reuseport group, reached by the kernel's steering of their QPNs. Two lanes on two threads, each
//! carrying a connection made by the device's connection manager with a device that has none: SENDs both
//! ways, the target's pattern of RDMA WRITE and READ into the peer's region, verified; stats while connected
//! and back at zero after; the lanes' threads end when the device closes.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nvme_proto::rdma_cm::{CmAccept, CmRequest};
use transport::soft::device::{CompletionQueue, ConnectionOptions, Device, DeviceEvent, SoftConfig};
use transport::soft::rc::{Access, RecvWr, SendOp, SendWr, WcStatus};

fn device(last: u8) -> Device {
    let mut config = SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
    config.port = 0;
    Device::open(config).expect("open soft device")
}

async fn event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event()).await.expect("event").expect("open")
}

async fn complete(cq: &CompletionQueue) -> transport::soft::device::Completion {
    tokio::time::timeout(Duration::from_secs(30), cq.next()).await.expect("completion within 30 s")
}

/// Runs a lane on a thread of its own, as a poll group does.
fn run_lane(lane: transport::Lane) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(lane.run());
    })
}

#[tokio::test]
async fn two_lanes_carry_connections_made_by_the_device() {
    let (host, target) = (device(1), device(2));
    let (pd_host, pd_target) = (host.alloc_pd().await.unwrap(), target.alloc_pd().await.unwrap());
    target.listen(4420, 16).await.unwrap();
    let lanes = [target.open_lane().await.expect("lane 1"), target.open_lane().await.expect("lane 2")];
    let ids: Vec<usize> = lanes.iter().map(|l| l.id()).collect();
    assert_eq!(ids, [1, 2]);
    let threads: Vec<_> = lanes.into_iter().map(run_lane).collect();

    let mut pairs = Vec::new();
    for (i, &lane) in ids.iter().enumerate() {
        let (cq_host, cq_target) = (CompletionQueue::new(), CompletionQueue::new());
        let qh = host.create_qp(&pd_host, &cq_host, &cq_host).await.unwrap();
        let request = CmRequest { recfmt: 0, qid: i as u16, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes();
        let conn_h =
            host.connect(&qh, target.local_addr(), 4420, ConnectionOptions::default(), &request).await.unwrap();
        let DeviceEvent::ConnectRequest { conn: conn_t, .. } = event(&target).await else { panic!("request") };
        let qt = target.create_qp_on_lane(lane, &pd_target, &cq_target, &cq_target).await.unwrap();
        assert_ne!(qt.qpn & 0x80_0000, 0, "a lane's QPN carries the lane bit: {:#x}", qt.qpn);
        for slot in 0..4 {
            qt.post_recv(RecvWr::new(slot, vec![0; 4096])).unwrap();
        }
        let accept = CmAccept { recfmt: 0, crqsize: 32 }.to_bytes();
        target.accept(conn_t, &qt, ConnectionOptions::default(), &accept).await.unwrap();
        assert!(matches!(event(&host).await, DeviceEvent::Established { conn, .. } if conn == conn_h));
        assert!(
            matches!(event(&target).await, DeviceEvent::Established { conn, qpn, .. } if conn == conn_t && qpn == qt.qpn)
        );
        pairs.push((qh, qt, cq_host, cq_target, conn_h));
    }
    let s = target.stats().await.unwrap();
    assert_eq!(s.queue_pairs, 2, "{s:?}");

    for (i, (qh, qt, cq_host, cq_target, _)) in pairs.iter().enumerate() {
        // A command capsule in, a response out, as NVMe/RDMA does.
        let capsule = vec![i as u8 + 1; 64];
        qh.post_recv(RecvWr::new(50, vec![0; 64])).unwrap();
        qh.post_send(SendWr::new(1, SendOp::Send, capsule.clone())).unwrap();
        let got = complete(cq_target).await.wc;
        assert_eq!((got.status, got.byte_len), (WcStatus::Success, 64));
        assert_eq!(&got.buf[..64], &capsule[..]);
        assert_eq!(complete(cq_host).await.wc.status, WcStatus::Success);
        // The target's data moves: a WRITE into the host's region and the response behind it, then a READ back.
        let region = host.register(&pd_host, vec![0; 256 << 10], Access::REMOTE_ALL).await.unwrap();
        let data: Vec<u8> = (0..256 << 10).map(|n: u32| (n * 7 + i as u32) as u8).collect();
        let write = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
        qt.post_send(SendWr::new(2, write, data.clone())).unwrap();
        qt.post_send(SendWr::new(3, SendOp::Send, vec![9; 16])).unwrap();
        let w = complete(cq_target).await.wc;
        assert_eq!((w.wr_id, w.status), (2, WcStatus::Success));
        assert_eq!(complete(cq_target).await.wc.status, WcStatus::Success);
        let response = complete(cq_host).await.wc;
        assert_eq!((response.wr_id, response.status, response.byte_len), (50, WcStatus::Success, 16));
        let read = SendOp::RdmaRead { remote_addr: region.keys.addr, rkey: region.keys.rkey };
        qt.post_send(SendWr::new(4, read, vec![0; 256 << 10])).unwrap();
        let r = complete(cq_target).await.wc;
        assert_eq!((r.wr_id, r.status), (4, WcStatus::Success));
        assert!(r.buf == data, "READ returns what the WRITE put there");
        assert!(host.deregister(region).await.unwrap() == data);
    }

    for (qh, qt, _, _, conn_h) in &pairs {
        host.disconnect(*conn_h).await.unwrap();
        host.destroy_qp(qh).await.unwrap();
        target.destroy_qp(qt).await.unwrap();
    }
    let s = target.stats().await.unwrap();
    assert_eq!(s.queue_pairs, 0, "{s:?}");
    assert!(s.packets_received > 0 && s.packets_sent > 0, "{s:?}");
    // Closing the device stops its lanes.
    tokio::task::spawn_blocking(move || target.close()).await.unwrap();
    for t in threads {
        t.join().expect("lane thread");
    }
}

#[tokio::test]
async fn a_lane_of_no_device_is_refused() {
    let d = device(3);
    let pd = d.alloc_pd().await.unwrap();
    let cq = CompletionQueue::new();
    assert!(d.create_qp_on_lane(1, &pd, &cq, &cq).await.is_err(), "no lane 1 was opened");
    assert!(d.create_qp_on_lane(0, &pd, &cq, &cq).await.is_err());
}

/// The host's pattern: its queue pair on a lane exposes a region registered on that lane, and the peer
/// (a device with no lanes) WRITEs into it and READs from it; the lane's memory shows in the device's stats
/// and holds the domain until it is given back.
#[tokio::test]
async fn a_lane_serves_its_own_regions_to_the_peer() {
    let (host, target) = (device(4), device(5));
    let (pd_host, pd_target) = (host.alloc_pd().await.unwrap(), target.alloc_pd().await.unwrap());
    target.listen(4420, 16).await.unwrap();
    let lane = host.open_lane().await.expect("lane");
    let id = lane.id();
    let thread = run_lane(lane);
    let (cq_host, cq_target) = (CompletionQueue::new(), CompletionQueue::new());
    let qh = host.create_qp_on_lane(id, &pd_host, &cq_host, &cq_host).await.unwrap();
    let request = CmRequest { recfmt: 0, qid: 1, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes();
    let conn_h = host.connect(&qh, target.local_addr(), 4420, ConnectionOptions::default(), &request).await.unwrap();
    let DeviceEvent::ConnectRequest { conn: conn_t, .. } = event(&target).await else { panic!("request") };
    let qt = target.create_qp(&pd_target, &cq_target, &cq_target).await.unwrap();
    let accept = CmAccept { recfmt: 0, crqsize: 32 }.to_bytes();
    target.accept(conn_t, &qt, ConnectionOptions::default(), &accept).await.unwrap();
    assert!(matches!(event(&host).await, DeviceEvent::Established { conn, .. } if conn == conn_h));
    assert!(matches!(event(&target).await, DeviceEvent::Established { .. }));

    let data: Vec<u8> = (0..64u32 << 10).map(|n| (n * 13) as u8).collect();
    let region = host.register_on_lane(id, &pd_host, vec![0; 64 << 10], Access::REMOTE_ALL).await.unwrap();
    let s = host.stats().await.unwrap();
    assert_eq!((s.regions, s.region_bytes), (1, 64 << 10), "{s:?}");
    assert!(host.dealloc_pd(pd_host).await.is_err(), "a lane's region keeps its domain");
    let write = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qt.post_send(SendWr::new(1, write, data.clone())).unwrap();
    assert_eq!(complete(&cq_target).await.wc.status, WcStatus::Success);
    let read = SendOp::RdmaRead { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qt.post_send(SendWr::new(2, read, vec![0; 64 << 10])).unwrap();
    let r = complete(&cq_target).await.wc;
    assert_eq!(r.status, WcStatus::Success);
    assert!(r.buf == data, "READ returns what the WRITE put in the lane's region");
    assert!(host.deregister_on_lane(id, region).await.unwrap() == data);
    assert_eq!(host.stats().await.unwrap().regions, 0);

    // A region of the device itself is not the lane's: the peer's WRITE to it is refused.
    let device_region = host.register(&pd_host, vec![0; 4096], Access::REMOTE_ALL).await.unwrap();
    let write = SendOp::RdmaWrite { remote_addr: device_region.keys.addr, rkey: device_region.keys.rkey };
    qt.post_send(SendWr::new(3, write, vec![1; 4096])).unwrap();
    assert_eq!(complete(&cq_target).await.wc.status, WcStatus::RemoteAccess);
    assert!(host.deregister(device_region).await.unwrap().iter().all(|&b| b == 0), "untouched");

    host.disconnect(conn_h).await.unwrap();
    host.destroy_qp(&qh).await.unwrap();
    target.destroy_qp(&qt).await.unwrap();
    assert_eq!(host.stats().await.unwrap().queue_pairs, 0);
    tokio::task::spawn_blocking(move || host.close()).await.unwrap();
    thread.join().expect("lane thread");
}

/// A poll group's pattern: one shared receive queue on a lane, three queue pairs of that lane taking their
/// capsules from it — each capsule lands in the next posted buffer, whichever queue pair it came on, and a
/// buffer given back serves any of them; a queue pair's own receives are refused; an SRQ of another lane or an
/// unknown one is refused; it is counted in the stats, busy while queue pairs use it, and gone after.
#[tokio::test]
async fn a_lane_shares_one_receive_queue_among_its_queue_pairs() {
    let (host, target) = (device(7), device(8));
    let (pd_host, pd_target) = (host.alloc_pd().await.unwrap(), target.alloc_pd().await.unwrap());
    target.listen(4420, 16).await.unwrap();
    let (lane, other) = (target.open_lane().await.expect("lane"), target.open_lane().await.expect("lane 2"));
    let (id, other_id) = (lane.id(), other.id());
    let threads = [run_lane(lane), run_lane(other)];
    let srq = target.create_srq_on_lane(id, &pd_target).await.expect("srq on a lane");
    let foreign = target.create_srq_on_lane(other_id, &pd_target).await.expect("srq on lane 2");
    for slot in 0..2u64 {
        srq.post_recv(RecvWr::new(100 + slot, vec![0; 128])).unwrap();
    }
    assert_eq!(target.stats().await.unwrap().shared_receive_queues, 2);
    let cq = CompletionQueue::new();
    assert!(
        target.create_qp_on_lane_with_srq(other_id, &pd_target, &cq, &cq, &srq).await.is_err(),
        "another lane's SRQ"
    );

    let mut pairs = Vec::new();
    for i in 0..3u16 {
        let (cq_host, cq_target) = (CompletionQueue::new(), CompletionQueue::new());
        let qh = host.create_qp(&pd_host, &cq_host, &cq_host).await.unwrap();
        let request = CmRequest { recfmt: 0, qid: i, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes();
        host.connect(&qh, target.local_addr(), 4420, ConnectionOptions::default(), &request).await.unwrap();
        let DeviceEvent::ConnectRequest { conn, .. } = event(&target).await else { panic!("request") };
        let qt = target.create_qp_on_lane_with_srq(id, &pd_target, &cq_target, &cq_target, &srq).await.unwrap();
        // Its receives come from the shared queue: one of its own comes straight back failed.
        qt.post_recv(RecvWr::new(1, vec![0; 64])).unwrap();
        let refused = complete(&cq_target).await.wc;
        assert!(refused.wr_id == 1 && refused.status != WcStatus::Success, "{refused:?}");
        target
            .accept(conn, &qt, ConnectionOptions::default(), &CmAccept { recfmt: 0, crqsize: 32 }.to_bytes())
            .await
            .unwrap();
        assert!(matches!(event(&host).await, DeviceEvent::Established { .. }));
        assert!(matches!(event(&target).await, DeviceEvent::Established { .. }));
        pairs.push((qh, qt, cq_host, cq_target));
    }
    // Six capsules over three queue pairs through two shared buffers, each handed back after use.
    for round in 0..2u8 {
        for (i, (qh, _, cq_host, cq_target)) in pairs.iter().enumerate() {
            let capsule = vec![round * 10 + i as u8 + 1; 64];
            qh.post_send(SendWr::new(1, SendOp::Send, capsule.clone())).unwrap();
            let got = complete(cq_target).await.wc;
            assert_eq!((got.status, got.byte_len), (WcStatus::Success, 64), "round {round}, queue pair {i}");
            assert!((100..102).contains(&got.wr_id), "a shared buffer: {}", got.wr_id);
            assert_eq!(&got.buf[..64], &capsule[..]);
            assert_eq!(complete(cq_host).await.wc.status, WcStatus::Success);
            srq.post_recv(RecvWr::new(got.wr_id, got.buf)).unwrap();
        }
    }
    assert!(target.destroy_srq(&srq).await.is_err(), "busy while queue pairs use it");
    for (qh, qt, _, _) in &pairs {
        host.destroy_qp(qh).await.unwrap();
        target.destroy_qp(qt).await.unwrap();
    }
    let back = target.destroy_srq(&srq).await.expect("destroyed once unused");
    assert_eq!(back.len(), 2, "both buffers were posted again");
    target.destroy_srq(&foreign).await.unwrap();
    assert_eq!(target.stats().await.unwrap().shared_receive_queues, 0);
    assert!(target.create_qp_on_lane_with_srq(id, &pd_target, &cq, &cq, &srq).await.is_err(), "a destroyed SRQ");
    tokio::task::spawn_blocking(move || target.close()).await.unwrap();
    for t in threads {
        t.join().expect("lane thread");
    }
}
