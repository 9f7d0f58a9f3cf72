//! The requester and completer of an RC QP: turns send work requests into request packets, retransmits what
//! was not acknowledged, and retires requests in posting order as ACKs and READ responses arrive.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::psn;
use super::{RcConfig, rnr_timer};
use crate::soft::wire::ext::{NakCode, Reth, Syndrome};
use crate::soft::wire::{Bth, Opcode, PacketRepr};
use crate::work_request::{SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion};

/// Request at least one ACK per this many packets of a long message (rxe's RXE_MAX_PKT_PER_ACK).
const PACKETS_PER_ACK_REQUEST: u32 = 64;

#[derive(Debug)]
struct Entry {
    wr: SendWr,
    first_psn: u32,
    /// PSNs the request consumes: its packets, or for a READ the response packets.
    npkts: u32,
    /// Packets transmitted in the current pass (a READ request counts as all of them).
    sent: u32,
    /// READ: response packets received in order.
    read_pkts: u32,
    done: bool,
}

impl Entry {
    fn is_read(&self) -> bool {
        matches!(self.wr.op, SendOp::RdmaRead { .. })
    }
    fn last_psn(&self) -> u32 {
        psn::add(self.first_psn, self.npkts - 1)
    }
}

#[derive(Debug)]
pub struct Requester {
    dest_qpn: u32,
    mtu: usize,
    window: u32,
    max_rd_atomic: u32,
    retry_init: u8,
    rnr_init: u8,
    ack_timeout: Duration,
    sq: VecDeque<Entry>,
    /// PSN of the next request posted.
    next_psn: u32,
    /// Every PSN up to and including this one is acknowledged.
    acked_psn: u32,
    retry_left: u8,
    rnr_left: u8,
    /// Retransmission deadline while packets are unacknowledged.
    timer: Option<Instant>,
    /// After an RNR NAK: resume at this PSN once the deadline passes.
    rnr_wait: Option<(Instant, u32)>,
    /// The retransmission pass in progress: from the PSN it rewound to, through the highest PSN sent before
    /// it. NAKs for packets already resent in this pass are stale (the responder sent them before our resend
    /// reached it) and are ignored; real losses in the pass are left to the timer.
    pass: Option<(u32, u32)>,
    since_ack_request: u32,
    /// A response in sequence range arrived since the timer was last armed: the peer is alive even if what
    /// it sent did not let us advance (a lost first READ response, say), so a timeout retries without
    /// spending the retry count.
    heard_from_peer: bool,
}

impl Requester {
    pub fn new(config: &RcConfig) -> Requester {
        Requester {
            dest_qpn: config.dest_qpn,
            mtu: config.mtu,
            window: config.window.max(1),
            max_rd_atomic: config.max_rd_atomic.max(1) as u32,
            retry_init: config.retry_cnt.min(7),
            rnr_init: config.rnr_retry.min(7),
            ack_timeout: config.ack_timeout,
            sq: VecDeque::new(),
            next_psn: config.send_psn & crate::soft::wire::MASK_24,
            acked_psn: psn::sub(config.send_psn, 1),
            retry_left: config.retry_cnt.min(7),
            rnr_left: config.rnr_retry.min(7),
            timer: None,
            rnr_wait: None,
            pass: None,
            since_ack_request: 0,
            heard_from_peer: false,
        }
    }

    pub fn outstanding(&self) -> usize {
        self.sq.len()
    }

    pub fn post(&mut self, wr: SendWr) {
        let npkts = (wr.buf.len().div_ceil(self.mtu)).max(1) as u32;
        let first_psn = self.next_psn;
        self.next_psn = psn::add(self.next_psn, npkts);
        self.sq.push_back(Entry { wr, first_psn, npkts, sent: 0, read_pkts: 0, done: false });
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timer, self.rnr_wait) {
            (Some(t), Some((r, _))) => Some(t.min(r)),
            (t, r) => t.or(r.map(|(r, _)| r)),
        }
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.rnr_wait.is_some() {
            return None;
        }
        let mut reads_in_flight = 0;
        let index = self.sq.iter().position(|e| {
            if e.is_read() && e.sent > 0 && !e.done {
                reads_in_flight += 1;
            }
            !e.done && e.sent < e.npkts
        })?;
        let entry = &self.sq[index];
        if entry.is_read() && reads_in_flight >= self.max_rd_atomic {
            return None;
        }
        let next = if entry.is_read() {
            psn::add(entry.first_psn, entry.read_pkts)
        } else {
            psn::add(entry.first_psn, entry.sent)
        };
        if psn::diff(next, self.unacknowledged_psn()) >= self.window as i32 {
            return None;
        }
        let packet = self.build(index);
        let entry = &mut self.sq[index];
        entry.sent = if entry.is_read() { entry.npkts } else { entry.sent + 1 };
        if self.timer.is_none() {
            self.timer = Some(now + self.ack_timeout);
        }
        Some(packet)
    }

    fn build(&mut self, index: usize) -> Vec<u8> {
        let mtu = self.mtu;
        let entry = &self.sq[index];
        let total = entry.wr.buf.len();
        if let SendOp::RdmaRead { remote_addr, rkey } = entry.wr.op {
            let offset = entry.read_pkts as usize * mtu;
            let mut p =
                PacketRepr::new(Bth::new(Opcode::RcRdmaReadRequest, 0, psn::add(entry.first_psn, entry.read_pkts)));
            p.bth.ack_req = true;
            p.reth = Some(Reth { va: remote_addr.wrapping_add(offset as u64), rkey, len: (total - offset) as u32 });
            let out = emit(p, self.dest_qpn, mtu);
            self.since_ack_request = 0;
            return out;
        }
        let i = entry.sent;
        let (first, last) = (i == 0, i + 1 == entry.npkts);
        let start = i as usize * mtu;
        let payload = &entry.wr.buf[start..(start + mtu).min(total)];
        use Opcode::*;
        let opcode = match (entry.wr.op, first, last) {
            (SendOp::Send, true, true) => RcSendOnly,
            (SendOp::SendWithImm(_), true, true) => RcSendOnlyWithImmediate,
            (SendOp::SendWithInv(_), true, true) => RcSendOnlyWithInvalidate,
            (SendOp::Send | SendOp::SendWithImm(_) | SendOp::SendWithInv(_), true, false) => RcSendFirst,
            (SendOp::Send | SendOp::SendWithImm(_) | SendOp::SendWithInv(_), false, false) => RcSendMiddle,
            (SendOp::Send, false, true) => RcSendLast,
            (SendOp::SendWithImm(_), false, true) => RcSendLastWithImmediate,
            (SendOp::SendWithInv(_), false, true) => RcSendLastWithInvalidate,
            (SendOp::RdmaWrite { .. }, true, true) => RcRdmaWriteOnly,
            (SendOp::RdmaWriteWithImm { .. }, true, true) => RcRdmaWriteOnlyWithImmediate,
            (SendOp::RdmaWrite { .. } | SendOp::RdmaWriteWithImm { .. }, true, false) => RcRdmaWriteFirst,
            (SendOp::RdmaWrite { .. } | SendOp::RdmaWriteWithImm { .. }, false, false) => RcRdmaWriteMiddle,
            (SendOp::RdmaWrite { .. }, false, true) => RcRdmaWriteLast,
            (SendOp::RdmaWriteWithImm { .. }, false, true) => RcRdmaWriteLastWithImmediate,
            (SendOp::RdmaRead { .. }, _, _) => unreachable!("handled above"),
        };
        let mut p = PacketRepr::new(Bth::new(opcode, 0, psn::add(entry.first_psn, i)));
        p.payload = payload;
        p.bth.solicited = last && entry.wr.solicited;
        let headers = opcode.headers();
        match entry.wr.op {
            SendOp::RdmaWrite { remote_addr, rkey } | SendOp::RdmaWriteWithImm { remote_addr, rkey, .. }
                if headers.reth =>
            {
                p.reth = Some(Reth { va: remote_addr, rkey, len: total as u32 });
            }
            _ => {}
        }
        if headers.imm {
            p.imm = match entry.wr.op {
                SendOp::SendWithImm(imm) | SendOp::RdmaWriteWithImm { imm, .. } => Some(imm),
                _ => None,
            };
        }
        if headers.ieth {
            p.ieth = match entry.wr.op {
                SendOp::SendWithInv(rkey) => Some(rkey),
                _ => None,
            };
        }
        let since = self.since_ack_request + 1;
        p.bth.ack_req = last || since >= PACKETS_PER_ACK_REQUEST;
        let ack_req = p.bth.ack_req;
        let out = emit(p, self.dest_qpn, mtu);
        self.since_ack_request = if ack_req { 0 } else { since };
        out
    }

    pub fn handle_timeout(&mut self, now: Instant, completions: &mut VecDeque<WorkCompletion>) -> Result<(), WcStatus> {
        if let Some((deadline, resume)) = self.rnr_wait {
            if now >= deadline {
                self.rnr_wait = None;
                self.rewind(resume);
            }
        }
        if let Some(deadline) = self.timer {
            if now >= deadline {
                self.timer = None;
                if !self.unacknowledged() {
                    return Ok(());
                }
                if !std::mem::take(&mut self.heard_from_peer) {
                    if self.retry_left == 0 {
                        return self.fail_front(WcStatus::RetryExceeded, completions);
                    }
                    self.retry_left -= 1;
                }
                self.rewind(psn::add(self.acked_psn, 1));
            }
        }
        Ok(())
    }

    pub fn handle_response(
        &mut self,
        now: Instant,
        p: &PacketRepr<'_>,
        completions: &mut VecDeque<WorkCompletion>,
    ) -> Result<(), WcStatus> {
        let q = p.bth.psn;
        // A response for a PSN we never sent is noise (stale ones are recognised below).
        if psn::diff(q, psn::sub(self.next_psn, 1)) > 0 {
            return Ok(());
        }
        self.heard_from_peer = true;
        if p.bth.opcode.is_read_response() {
            return self.handle_read_response(now, p, completions);
        }
        let Some(aeth) = p.aeth else { return Ok(()) };
        match aeth.syndrome {
            Syndrome::Ack { .. } => {
                self.acknowledge(now, q, completions);
            }
            Syndrome::RnrNak { timer } => {
                self.acknowledge(now, psn::sub(q, 1), completions);
                if self.rnr_left == 0 {
                    return self.fail_containing(q, WcStatus::RnrRetryExceeded, completions);
                }
                if self.rnr_init != 7 {
                    self.rnr_left -= 1;
                }
                self.timer = None;
                self.rnr_wait = Some((now + rnr_timer(timer), q));
            }
            Syndrome::Nak(NakCode::PsnSequenceError) => {
                let progressed = self.acknowledge(now, psn::sub(q, 1), completions);
                // During an RNR wait these NAK the packets that followed the refused one: the wait decides. A NAK
                // that tells nothing new about a packet already resent is stale.
                if self.rnr_wait.is_none() && (progressed || !self.resent_in_pass(q)) {
                    self.rewind(q);
                }
            }
            Syndrome::Nak(code) => {
                self.acknowledge(now, psn::sub(q, 1), completions);
                let status = match code {
                    NakCode::RemoteAccessError => WcStatus::RemoteAccess,
                    NakCode::RemoteOperationalError => WcStatus::RemoteOperation,
                    _ => WcStatus::RemoteInvalidRequest,
                };
                return self.fail_containing(q, status, completions);
            }
            Syndrome::Reserved(_) => {}
        }
        Ok(())
    }

    fn handle_read_response(
        &mut self,
        now: Instant,
        p: &PacketRepr<'_>,
        completions: &mut VecDeque<WorkCompletion>,
    ) -> Result<(), WcStatus> {
        let q = p.bth.psn;
        let Some(index) = self.sq.iter().position(|e| e.is_read() && !e.done && psn::within(q, e.first_psn, e.npkts))
        else {
            return Ok(()); // a duplicate of a READ already complete
        };
        let first_psn = self.sq[index].first_psn;
        // A READ response means every request before the READ was executed.
        self.acknowledge(now, psn::sub(first_psn, 1), completions);
        let Some(index) = self.sq.iter().position(|e| e.first_psn == first_psn && !e.done) else { return Ok(()) };
        let mtu = self.mtu;
        let entry = &mut self.sq[index];
        let expected = psn::add(entry.first_psn, entry.read_pkts);
        let gap = psn::diff(q, expected);
        if gap < 0 {
            return Ok(());
        }
        if gap > 0 {
            // Responses were lost: ask again from the first missing one, once per pass.
            if !self.resent_in_pass(expected) {
                self.rewind(expected);
            }
            return Ok(());
        }
        let offset = entry.read_pkts as usize * mtu;
        let want = (entry.wr.buf.len() - offset).min(mtu);
        if p.payload.len() != want {
            // The responder sent a packet of the wrong size: the data cannot be trusted.
            return self.fail_containing(q, WcStatus::BadResponse, completions);
        }
        entry.wr.buf[offset..offset + want].copy_from_slice(p.payload);
        entry.read_pkts += 1;
        if entry.read_pkts == entry.npkts {
            entry.done = true;
            let last = entry.last_psn();
            self.acknowledge(now, last, completions);
        } else if self.sq.iter().position(|e| !e.done) == Some(index) {
            // The oldest open request: its in-order responses acknowledge their PSNs.
            self.acked_psn = q;
            self.progress(now);
        } else {
            self.progress(now);
        }
        Ok(())
    }

    /// Everything up to `q` is acknowledged: retire what that completes. Returns whether anything advanced.
    fn acknowledge(&mut self, now: Instant, q: u32, completions: &mut VecDeque<WorkCompletion>) -> bool {
        if psn::diff(q, self.acked_psn) <= 0 {
            self.retire(completions);
            return false;
        }
        let mut ack_to = q;
        for entry in self.sq.iter_mut().filter(|e| !e.done) {
            if psn::diff(q, entry.first_psn) < 0 {
                break;
            }
            if entry.is_read() {
                // The responder went past this READ but its data is missing: responses were lost.
                ack_to = psn::sub(psn::add(entry.first_psn, entry.read_pkts), 1);
                entry.sent = 0;
                break;
            }
            if psn::diff(q, entry.last_psn()) >= 0 {
                entry.done = true;
            } else {
                break;
            }
        }
        let advanced = psn::diff(ack_to, self.acked_psn) > 0;
        if advanced {
            self.acked_psn = ack_to;
            self.progress(now);
        }
        self.retire(completions);
        advanced
    }

    fn progress(&mut self, now: Instant) {
        self.retry_left = self.retry_init;
        self.rnr_left = self.rnr_init;
        if self.pass.is_some_and(|(_, end)| psn::diff(self.acked_psn, end) >= 0) {
            self.pass = None;
        }
        self.timer = self.unacknowledged().then(|| now + self.ack_timeout);
    }

    /// The first PSN not yet acknowledged; READ data received in order counts as acknowledged.
    fn unacknowledged_psn(&self) -> u32 {
        match self.sq.iter().find(|e| !e.done) {
            Some(e) if e.is_read() => psn::add(e.first_psn, e.read_pkts),
            Some(e) => {
                let next = psn::add(self.acked_psn, 1);
                if psn::diff(next, e.first_psn) > 0 { next } else { e.first_psn }
            }
            None => self.next_psn,
        }
    }

    /// Whether `q` was already sent again by the retransmission pass in progress.
    fn resent_in_pass(&self, q: u32) -> bool {
        let Some((start, _)) = self.pass else { return false };
        if psn::diff(q, start) < 0 {
            return false;
        }
        self.sq.iter().filter(|e| !e.done).any(|e| {
            psn::within(q, e.first_psn, e.npkts)
                && if e.is_read() { e.sent > 0 } else { e.sent > psn::diff(q, e.first_psn) as u32 }
        })
    }

    /// The highest PSN transmitted so far in the current pass (or before it).
    fn highest_sent(&self) -> u32 {
        self.sq
            .iter()
            .rev()
            .find(|e| e.sent > 0 || e.done)
            .map(|e| if e.is_read() || e.done { e.last_psn() } else { psn::add(e.first_psn, e.sent - 1) })
            .unwrap_or(self.acked_psn)
    }

    fn unacknowledged(&self) -> bool {
        self.sq.iter().any(|e| !e.done && e.sent > 0)
    }

    /// Retransmit from `from`: every unfinished request at or after it is sent again.
    fn rewind(&mut self, from: u32) {
        let end = self.highest_sent();
        self.pass = Some((from, if psn::diff(end, from) > 0 { end } else { from }));
        self.since_ack_request = 0;
        for entry in self.sq.iter_mut().filter(|e| !e.done) {
            let d = psn::diff(from, entry.first_psn);
            if entry.is_read() {
                if d < entry.npkts as i32 {
                    entry.sent = 0;
                }
            } else if d <= 0 {
                entry.sent = 0;
            } else if (d as u32) < entry.npkts {
                entry.sent = entry.sent.min(d as u32);
            }
        }
    }

    fn retire(&mut self, completions: &mut VecDeque<WorkCompletion>) {
        while self.sq.front().is_some_and(|e| e.done) {
            let entry = self.sq.pop_front().expect("front exists");
            completions.push_back(completion(entry.wr, WcStatus::Success));
        }
    }

    fn fail_front(&mut self, status: WcStatus, completions: &mut VecDeque<WorkCompletion>) -> Result<(), WcStatus> {
        self.retire(completions);
        if let Some(entry) = self.sq.pop_front() {
            completions.push_back(completion(entry.wr, status));
        }
        Err(status)
    }

    fn fail_containing(
        &mut self,
        q: u32,
        status: WcStatus,
        completions: &mut VecDeque<WorkCompletion>,
    ) -> Result<(), WcStatus> {
        self.retire(completions);
        if let Some(i) = self.sq.iter().position(|e| psn::within(q, e.first_psn, e.npkts)) {
            // Requests before it that are still open are READs whose data never arrived: they cannot succeed.
            for entry in self.sq.drain(..i).collect::<Vec<_>>() {
                completions.push_back(completion(entry.wr, WcStatus::WrFlush));
            }
            let entry = self.sq.pop_front().expect("index found");
            completions.push_back(completion(entry.wr, status));
        } else if let Some(entry) = self.sq.pop_front() {
            completions.push_back(completion(entry.wr, status));
        }
        Err(status)
    }

    /// QP error: every request still queued completes with a flush error.
    pub fn flush(&mut self, completions: &mut VecDeque<WorkCompletion>) {
        self.timer = None;
        self.rnr_wait = None;
        for entry in self.sq.drain(..) {
            completions.push_back(completion(entry.wr, WcStatus::WrFlush));
        }
    }
}

fn emit(mut p: PacketRepr<'_>, dest_qpn: u32, mtu: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(mtu + 64);
    p.bth.dest_qp = dest_qpn;
    // Cannot fail: the headers follow the opcode and every field was built in range.
    p.emit(&mut out).expect("requester builds well-formed packets");
    out
}

fn completion(wr: SendWr, status: WcStatus) -> WorkCompletion {
    let opcode: WcOpcode = wr.opcode();
    let byte_len = if status == WcStatus::Success { wr.buf.len() as u32 } else { 0 };
    // A READ's data lands in the segments; a SEND's or WRITE's segments are handed back as posted.
    let filled = if opcode == WcOpcode::RdmaRead { byte_len as usize } else { 0 };
    WorkCompletion::new(wr.wr_id, status, opcode, byte_len, wr.buf, wr.sg_list, filled)
}
