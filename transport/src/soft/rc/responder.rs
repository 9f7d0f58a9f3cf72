//! The responder of an RC QP: checks each request's PSN, executes it once (SEND into a posted receive, RDMA
//! WRITE and READ through [`RemoteMemory`]), and answers with ACKs, NAKs and READ responses.

use std::collections::VecDeque;

use super::RcConfig;
use super::memory::RemoteMemory;
use super::psn;
use crate::soft::wire::ext::{Aeth, NakCode, Syndrome};
use crate::soft::wire::opcode::Position;
use crate::soft::wire::{Bth, MASK_24, Opcode, PacketRepr};
use crate::work_request::{RecvWr, WcOpcode, WcStatus, WorkCompletion};

/// READ requests remembered for answering duplicates (IBTA: at least max_dest_rd_atomic).
const READ_HISTORY: usize = 32;

#[derive(Debug)]
struct RecvInProgress {
    wr: RecvWr,
    len: usize,
}

#[derive(Debug)]
struct WriteInProgress {
    rkey: u32,
    next_addr: u64,
    remaining: u64,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct ReadRecord {
    first_psn: u32,
    npkts: u32,
    va: u64,
    rkey: u32,
    len: u32,
}

#[derive(Debug)]
enum Output {
    Ack {
        psn: u32,
        msn: u32,
    },
    Nak {
        psn: u32,
        syndrome: Syndrome,
        msn: u32,
    },
    /// READ responses: data snapshotted when the request executed. `replay` marks answers to a duplicate
    /// request, which take no new responder resource.
    Read {
        first_psn: u32,
        data: Vec<u8>,
        next: u32,
        npkts: u32,
        msn: u32,
        replay: bool,
    },
}

#[derive(Debug)]
pub struct Responder {
    dest_qpn: u32,
    max_dest_rd_atomic: usize,
    mtu: usize,
    min_rnr_timer: u8,
    epsn: u32,
    msn: u32,
    rq: VecDeque<RecvWr>,
    recv: Option<RecvInProgress>,
    write: Option<WriteInProgress>,
    /// A sequence-error NAK went out for the current gap; stay quiet until the expected PSN arrives.
    nak_sent: bool,
    reads: VecDeque<ReadRecord>,
    output: VecDeque<Output>,
    /// The NAK that put the QP in error, still to be sent.
    final_nak: Option<Output>,
}

/// A request that breaks the QP: the NAK to answer with and the local status to flush with.
struct Fatal(NakCode);

impl Responder {
    pub fn new(config: &RcConfig) -> Responder {
        Responder {
            dest_qpn: config.dest_qpn,
            max_dest_rd_atomic: config.max_dest_rd_atomic.max(1) as usize,
            mtu: config.mtu,
            min_rnr_timer: config.min_rnr_timer,
            epsn: config.recv_psn & MASK_24,
            msn: 0,
            rq: VecDeque::new(),
            recv: None,
            write: None,
            nak_sent: false,
            reads: VecDeque::new(),
            output: VecDeque::new(),
            final_nak: None,
        }
    }

    pub fn post(&mut self, wr: RecvWr) {
        self.rq.push_back(wr);
    }

    pub fn posted(&self) -> usize {
        self.rq.len() + self.recv.is_some() as usize
    }

    pub fn handle_request(
        &mut self,
        p: &PacketRepr<'_>,
        memory: &mut dyn RemoteMemory,
        srq: Option<&mut VecDeque<RecvWr>>,
        completions: &mut VecDeque<WorkCompletion>,
    ) -> Result<(), WcStatus> {
        let q = p.bth.psn;
        let d = psn::diff(q, self.epsn);
        if d < 0 {
            self.duplicate(p, memory);
            return Ok(());
        }
        if d > 0 {
            if !self.nak_sent {
                self.nak_sent = true;
                self.output.push_back(Output::Nak {
                    psn: self.epsn,
                    syndrome: Syndrome::Nak(NakCode::PsnSequenceError),
                    msn: self.msn,
                });
            }
            return Ok(());
        }
        self.nak_sent = false;
        match self.execute(p, memory, srq, completions) {
            Ok(()) => Ok(()),
            Err(Fatal(code)) => {
                self.final_nak = Some(Output::Nak { psn: q, syndrome: Syndrome::Nak(code), msn: self.msn });
                Err(match code {
                    NakCode::RemoteAccessError => WcStatus::LocalProtection,
                    _ => WcStatus::LocalQpOperation,
                })
            }
        }
    }

    fn execute(
        &mut self,
        p: &PacketRepr<'_>,
        memory: &mut dyn RemoteMemory,
        srq: Option<&mut VecDeque<RecvWr>>,
        completions: &mut VecDeque<WorkCompletion>,
    ) -> Result<(), Fatal> {
        // Receives come from the shared receive queue when the queue pair has one, else from its own.
        let receives = match srq {
            Some(shared) => shared,
            None => &mut self.rq,
        };
        let op = p.bth.opcode;
        let position = op.position();
        let continuing = matches!(position, Position::Middle | Position::Last);
        // Opcode sequence: a message in progress only continues; otherwise only a new message starts.
        let in_send = self.recv.is_some();
        let in_write = self.write.is_some();
        let sequence_ok = if op.is_send() {
            continuing == in_send && !in_write
        } else if op.is_write() {
            continuing == in_write && !in_send
        } else {
            !in_send && !in_write
        };
        if !sequence_ok {
            return Err(Fatal(NakCode::InvalidRequest));
        }
        // Every packet but the last of a message is exactly one MTU.
        let full = matches!(position, Position::First | Position::Middle);
        if (full && p.payload.len() != self.mtu) || p.payload.len() > self.mtu {
            return Err(Fatal(NakCode::InvalidRequest));
        }
        let last = matches!(position, Position::Last | Position::Only);
        if op.is_send() {
            if !continuing {
                let Some(wr) = receives.pop_front() else { return self.rnr(p.bth.psn) };
                self.recv = Some(RecvInProgress { wr, len: 0 });
            }
            let recv = self.recv.as_mut().expect("receive in progress");
            let end = recv.len + p.payload.len();
            if end > recv.wr.buf.len() {
                let recv = self.recv.take().expect("receive in progress");
                completions.push_back(recv_completion(recv.wr, WcStatus::LocalLength, WcOpcode::Recv, 0));
                return Err(Fatal(NakCode::InvalidRequest));
            }
            recv.wr.buf[recv.len..end].copy_from_slice(p.payload);
            recv.len = end;
            if last {
                let mut invalidated = None;
                if let Some(rkey) = p.ieth {
                    if memory.invalidate(rkey).is_err() {
                        let recv = self.recv.take().expect("receive in progress");
                        completions.push_back(recv_completion(recv.wr, WcStatus::LocalProtection, WcOpcode::Recv, 0));
                        return Err(Fatal(NakCode::InvalidRequest));
                    }
                    invalidated = Some(rkey);
                }
                let recv = self.recv.take().expect("receive in progress");
                let len = recv.len as u32;
                let mut wc = recv_completion(recv.wr, WcStatus::Success, WcOpcode::Recv, len);
                wc.imm = p.imm;
                wc.invalidated_rkey = invalidated;
                completions.push_back(wc);
                self.msn = (self.msn + 1) & MASK_24;
            }
        } else if op.is_write() {
            // WRITE with immediate consumes a receive: make sure there is one before touching memory.
            if last && p.imm.is_some() && receives.is_empty() {
                return self.rnr(p.bth.psn);
            }
            if !continuing {
                let reth = p.reth.ok_or(Fatal(NakCode::InvalidRequest))?;
                if reth.len > 0 {
                    memory
                        .check(reth.rkey, reth.va, reth.len as u64, true)
                        .map_err(|_| Fatal(NakCode::RemoteAccessError))?;
                }
                self.write = Some(WriteInProgress {
                    rkey: reth.rkey,
                    next_addr: reth.va,
                    remaining: reth.len as u64,
                    total: reth.len as u64,
                });
            }
            let w = self.write.as_mut().expect("write in progress");
            let n = p.payload.len() as u64;
            if n > w.remaining || (last && n != w.remaining) {
                self.write = None;
                return Err(Fatal(NakCode::InvalidRequest));
            }
            if n > 0 {
                memory.write(w.rkey, w.next_addr, p.payload).map_err(|_| Fatal(NakCode::RemoteAccessError))?;
            }
            w.next_addr = w.next_addr.wrapping_add(n);
            w.remaining -= n;
            if last {
                let w = self.write.take().expect("write in progress");
                if let Some(imm) = p.imm {
                    let wr = receives.pop_front().expect("checked above");
                    let mut wc = recv_completion(wr, WcStatus::Success, WcOpcode::RecvRdmaWithImm, w.total as u32);
                    wc.imm = Some(imm);
                    completions.push_back(wc);
                }
                self.msn = (self.msn + 1) & MASK_24;
            }
        } else if op == Opcode::RcRdmaReadRequest {
            // More READs in flight than the responder resources granted at connection time.
            if self.output.iter().filter(|o| matches!(o, Output::Read { replay: false, .. })).count()
                >= self.max_dest_rd_atomic
            {
                return Err(Fatal(NakCode::InvalidRdRequest));
            }
            let reth = p.reth.ok_or(Fatal(NakCode::InvalidRequest))?;
            let data =
                self.read(reth.rkey, reth.va, reth.len, memory).map_err(|_| Fatal(NakCode::RemoteAccessError))?;
            let npkts = (reth.len as usize).div_ceil(self.mtu).max(1) as u32;
            self.reads.push_back(ReadRecord {
                first_psn: p.bth.psn,
                npkts,
                va: reth.va,
                rkey: reth.rkey,
                len: reth.len,
            });
            if self.reads.len() > READ_HISTORY {
                self.reads.pop_front();
            }
            self.msn = (self.msn + 1) & MASK_24;
            self.epsn = psn::add(self.epsn, npkts);
            self.output.push_back(Output::Read {
                first_psn: p.bth.psn,
                data,
                next: 0,
                npkts,
                msn: self.msn,
                replay: false,
            });
            return Ok(());
        } else {
            // Atomics are not offered (max_dest_rd_atomic covers READs only).
            return Err(Fatal(NakCode::InvalidRequest));
        }
        self.epsn = psn::add(self.epsn, 1);
        if p.bth.ack_req {
            self.ack(p.bth.psn);
        }
        Ok(())
    }

    fn read(&self, rkey: u32, va: u64, len: u32, memory: &dyn RemoteMemory) -> Result<Vec<u8>, ()> {
        if len == 0 {
            return Ok(Vec::new());
        }
        // Check before allocating: the length comes from the peer, the region bounds it.
        memory.check(rkey, va, len as u64, false).map_err(|_| ())?;
        let mut data = vec![0u8; len as usize];
        memory.read(rkey, va, &mut data).map_err(|_| ())?;
        Ok(data)
    }

    fn rnr(&mut self, q: u32) -> Result<(), Fatal> {
        // The rest of the message is in flight behind this packet: drop it quietly (no sequence NAKs) until the
        // requester comes back to `q` after its RNR wait.
        self.nak_sent = true;
        self.output.push_back(Output::Nak {
            psn: q,
            syndrome: Syndrome::RnrNak { timer: self.min_rnr_timer },
            msn: self.msn,
        });
        Ok(())
    }

    /// Coalesces with an ACK already waiting: only the newest needs to go out.
    fn ack(&mut self, q: u32) {
        if let Some(Output::Ack { psn, msn }) = self.output.back_mut() {
            *psn = q;
            *msn = self.msn;
        } else {
            self.output.push_back(Output::Ack { psn: q, msn: self.msn });
        }
    }

    fn duplicate(&mut self, p: &PacketRepr<'_>, memory: &dyn RemoteMemory) {
        if p.bth.opcode == Opcode::RcRdmaReadRequest {
            // Answer again from the point asked for, if it lies inside a READ we executed and ends with it.
            let Some(reth) = p.reth else { return };
            let q = p.bth.psn;
            let Some(record) = self.reads.iter().rev().find(|r| psn::within(q, r.first_psn, r.npkts)).copied() else {
                return;
            };
            let skip = psn::diff(q, record.first_psn) as u64 * self.mtu as u64;
            if reth.rkey != record.rkey
                || reth.va != record.va.wrapping_add(skip)
                || reth.len as u64 != (record.len as u64).saturating_sub(skip)
            {
                return;
            }
            let Ok(data) = self.read(reth.rkey, reth.va, reth.len, memory) else { return };
            let npkts = record.npkts - psn::diff(q, record.first_psn) as u32;
            self.output.push_back(Output::Read { first_psn: q, data, next: 0, npkts, msn: self.msn, replay: true });
        } else {
            // Already executed: acknowledge again so the requester can move on (C9-105).
            self.ack(psn::sub(self.epsn, 1));
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let output = self.output.pop_front()?;
        let (packet, rest) = self.build(output);
        if let Some(rest) = rest {
            self.output.push_front(rest);
        }
        Some(packet)
    }

    pub fn poll_final_nak(&mut self) -> Option<Vec<u8>> {
        let output = self.final_nak.take()?;
        Some(self.build(output).0)
    }

    fn build(&self, output: Output) -> (Vec<u8>, Option<Output>) {
        let mut out = Vec::with_capacity(self.mtu + 32);
        let emit = |p: PacketRepr<'_>, out: &mut Vec<u8>| {
            // Cannot fail: the headers follow the opcode and the fields are 24-bit masked.
            p.emit(out).expect("responder builds well-formed packets");
        };
        match output {
            Output::Ack { psn, msn } | Output::Nak { psn, msn, .. } => {
                let syndrome = match output {
                    Output::Nak { syndrome, .. } => syndrome,
                    _ => Syndrome::ACK_NO_CREDITS,
                };
                let mut p = PacketRepr::new(Bth::new(Opcode::RcAcknowledge, self.dest_qpn, psn));
                p.aeth = Some(Aeth { syndrome, msn });
                emit(p, &mut out);
                (out, None)
            }
            Output::Read { first_psn, data, next, npkts, msn, replay } => {
                use Opcode::*;
                let opcode = match (next == 0, next + 1 == npkts) {
                    (true, true) => RcRdmaReadResponseOnly,
                    (true, false) => RcRdmaReadResponseFirst,
                    (false, true) => RcRdmaReadResponseLast,
                    (false, false) => RcRdmaReadResponseMiddle,
                };
                let start = next as usize * self.mtu;
                let end = (start + self.mtu).min(data.len());
                let mut p = PacketRepr::new(Bth::new(opcode, self.dest_qpn, psn::add(first_psn, next)));
                p.payload = &data[start..end];
                if opcode.headers().aeth {
                    p.aeth = Some(Aeth { syndrome: Syndrome::ACK_NO_CREDITS, msn });
                }
                emit(p, &mut out);
                let rest =
                    (next + 1 < npkts).then_some(Output::Read { first_psn, data, next: next + 1, npkts, msn, replay });
                (out, rest)
            }
        }
    }

    /// QP error: posted receives complete with a flush error, the one in progress included.
    pub fn flush(&mut self, completions: &mut VecDeque<WorkCompletion>) {
        self.output.clear();
        self.write = None;
        if let Some(recv) = self.recv.take() {
            completions.push_back(recv_completion(recv.wr, WcStatus::WrFlush, WcOpcode::Recv, 0));
        }
        for wr in self.rq.drain(..) {
            completions.push_back(recv_completion(wr, WcStatus::WrFlush, WcOpcode::Recv, 0));
        }
    }
}

fn recv_completion(wr: RecvWr, status: WcStatus, opcode: WcOpcode, byte_len: u32) -> WorkCompletion {
    let filled = if opcode == WcOpcode::Recv { byte_len as usize } else { 0 };
    WorkCompletion::new(wr.wr_id, status, opcode, byte_len, wr.buf, wr.sg_list, filled)
}
