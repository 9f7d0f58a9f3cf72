//! The RC transport engine of one queue pair, sans-IO (quinn-proto style): it is fed packets
//! ([`RcQp::handle_packet`]) and time ([`RcQp::handle_timeout`]), and hands back packets to send
//! ([`RcQp::poll_transmit`]), work completions ([`RcQp::poll_completion`]) and when it next needs the clock
//! ([`RcQp::poll_timeout`]). No sockets, threads or clocks here: a driver owns those, and tests drive the engine
//! deterministically over a simulated network.
//!
//! Split as IBTA chapter 9 and rxe split it: the [`requester`] sends requests (segmentation at the path MTU,
//! PSNs, ACK requests, retransmission, RNR back-off) and the completer part of it retires them in order on
//! ACKs and READ responses; the [`responder`] executes requests (PSN checks, duplicates, NAKs, SEND into
//! posted receives, RDMA WRITE/READ through [`RemoteMemory`] with rkey, bounds and access checks).

pub mod memory;
pub mod psn;
pub mod requester;
pub mod responder;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crate::work_request::{RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion};
pub use memory::{Access, AccessError, RemoteMemory};

use crate::soft::wire::{Opcode, PacketRepr};
use requester::Requester;
use responder::Responder;

/// Path MTUs RoCE allows (IB enum 1..=5).
pub const MTUS: [usize; 5] = [256, 512, 1024, 2048, 4096];

/// Connection parameters, as a QP gets them through INIT → RTR → RTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcConfig {
    pub qpn: u32,
    pub dest_qpn: u32,
    /// Path MTU in bytes (one of [`MTUS`]).
    pub mtu: usize,
    /// First PSN this side sends.
    pub send_psn: u32,
    /// First PSN this side expects.
    pub recv_psn: u32,
    /// Transport retries on timeout or sequence error before RETRY_EXC (0..=7).
    pub retry_cnt: u8,
    /// RNR retries before RNR_RETRY_EXC; 7 means infinite.
    pub rnr_retry: u8,
    /// Local ACK timeout.
    pub ack_timeout: Duration,
    /// RNR NAK timer code this side sends when it has no receive posted (IBTA table 45; 12 = 0.64 ms).
    pub min_rnr_timer: u8,
    /// RDMA READs this side may have outstanding.
    pub max_rd_atomic: u8,
    /// RDMA READs the peer may have outstanding at this side (responder resources).
    pub max_dest_rd_atomic: u8,
    /// Packets in flight before waiting for ACKs.
    pub window: u32,
}

impl RcConfig {
    pub fn new(qpn: u32, dest_qpn: u32, send_psn: u32, recv_psn: u32) -> RcConfig {
        RcConfig {
            qpn,
            dest_qpn,
            mtu: 1024,
            send_psn,
            recv_psn,
            retry_cnt: 7,
            rnr_retry: 7,
            ack_timeout: Duration::from_millis(20),
            min_rnr_timer: 12,
            max_rd_atomic: 16,
            max_dest_rd_atomic: 16,
            window: 256,
        }
    }
}

/// What RTS adds to an RTR queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendParams {
    pub send_psn: u32,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub ack_timeout: Duration,
    pub max_rd_atomic: u8,
}

/// The QP states the engine distinguishes (the surface adds RESET and INIT, which never see packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineState {
    /// Ready to receive; sends are queued but not transmitted.
    Rtr,
    /// Ready to send and receive.
    Rts,
    /// Everything outstanding has been flushed; packets are dropped.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("path MTU {0} is not one of 256, 512, 1024, 2048, 4096")]
    Mtu(usize),
    #[error("{what} {value:#x} does not fit in 24 bits")]
    TooWide { what: &'static str, value: u32 },
}

/// Why a post was refused (nothing was queued; the buffer comes back).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("the QP is in the error state")]
    QpError,
    #[error("RDMA READ of zero bytes")]
    EmptyRead,
    #[error("message of {0} bytes exceeds 2^31")]
    TooLong(usize),
}

/// The RC engine of one queue pair.
#[derive(Debug)]
pub struct RcQp {
    config: RcConfig,
    state: EngineState,
    requester: Requester,
    responder: Responder,
    completions: VecDeque<WorkCompletion>,
    /// Why the QP went to error, once it did.
    fatal: Option<WcStatus>,
}

impl RcQp {
    /// An engine in RTS. A path MTU outside [`MTUS`] is refused: it comes from the peer's CM REQ.
    pub fn new(config: RcConfig) -> Result<RcQp, ConfigError> {
        if !MTUS.contains(&config.mtu) {
            return Err(ConfigError::Mtu(config.mtu));
        }
        for (what, value) in [
            ("QP number", config.qpn),
            ("destination QP number", config.dest_qpn),
            ("send PSN", config.send_psn),
            ("receive PSN", config.recv_psn),
        ] {
            if value > crate::soft::wire::MASK_24 {
                return Err(ConfigError::TooWide { what, value });
            }
        }
        Ok(RcQp {
            requester: Requester::new(&config),
            responder: Responder::new(&config),
            config,
            state: EngineState::Rts,
            completions: VecDeque::new(),
            fatal: None,
        })
    }

    pub fn config(&self) -> &RcConfig {
        &self.config
    }
    pub fn state(&self) -> EngineState {
        self.state
    }
    /// Why the QP entered the error state.
    pub fn error_cause(&self) -> Option<WcStatus> {
        self.fatal
    }

    pub fn set_state(&mut self, state: EngineState) {
        if state == EngineState::Error {
            self.enter_error(WcStatus::WrFlush);
        } else if self.state != EngineState::Error {
            self.state = state;
        }
    }

    /// RTR → RTS with the send side's parameters (first PSN, retries, timeout, READ depth). Nothing was sent
    /// in RTR, so the requester starts afresh with them.
    pub fn enter_rts(&mut self, send: SendParams) -> Result<(), ConfigError> {
        if send.send_psn > crate::soft::wire::MASK_24 {
            return Err(ConfigError::TooWide { what: "send PSN", value: send.send_psn });
        }
        if self.state != EngineState::Rtr {
            return Ok(());
        }
        self.config.send_psn = send.send_psn;
        self.config.retry_cnt = send.retry_cnt;
        self.config.rnr_retry = send.rnr_retry;
        self.config.ack_timeout = send.ack_timeout;
        self.config.max_rd_atomic = send.max_rd_atomic;
        self.requester = Requester::new(&self.config);
        self.state = EngineState::Rts;
        Ok(())
    }

    pub fn post_send(&mut self, mut wr: SendWr) -> Result<(), (PostError, SendWr)> {
        if self.state == EngineState::Error {
            return Err((PostError::QpError, wr));
        }
        let len = if wr.sg_list.is_empty() { wr.buf.len() } else { wr.sg_list.iter().map(|s| s.len()).sum() };
        if len > 1 << 31 {
            return Err((PostError::TooLong(len), wr));
        }
        if matches!(wr.op, SendOp::RdmaRead { .. }) && len == 0 {
            return Err((PostError::EmptyRead, wr));
        }
        crate::work_request::gather(&mut wr.buf, &wr.sg_list);
        self.requester.post(wr);
        Ok(())
    }

    pub fn post_recv(&mut self, mut wr: RecvWr) -> Result<(), (PostError, RecvWr)> {
        if self.state == EngineState::Error {
            return Err((PostError::QpError, wr));
        }
        crate::work_request::gather(&mut wr.buf, &wr.sg_list);
        self.responder.post(wr);
        Ok(())
    }

    /// Feeds one received packet addressed to this QP (ICRC already checked by the driver).
    pub fn handle_packet(&mut self, now: Instant, packet: &PacketRepr<'_>, memory: &mut dyn RemoteMemory) {
        self.handle_packet_with(now, packet, memory, None);
    }

    /// [`RcQp::handle_packet`] for a queue pair attached to a shared receive queue: SENDs consume `srq`.
    pub fn handle_packet_with(
        &mut self,
        now: Instant,
        packet: &PacketRepr<'_>,
        memory: &mut dyn RemoteMemory,
        srq: Option<&mut VecDeque<RecvWr>>,
    ) {
        if self.state == EngineState::Error || !packet.bth.opcode.is_rc() {
            return;
        }
        let outcome = if is_response(packet.bth.opcode) {
            self.requester.handle_response(now, packet, &mut self.completions)
        } else {
            self.responder.handle_request(packet, memory, srq, &mut self.completions)
        };
        if let Err(status) = outcome {
            self.enter_error(status);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == EngineState::Error {
            return;
        }
        if let Err(status) = self.requester.handle_timeout(now, &mut self.completions) {
            self.enter_error(status);
        }
    }

    /// The next packet to send (BTH through pad; the driver adds the ICRC), responder output first.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.state == EngineState::Error {
            return self.responder.poll_final_nak();
        }
        if let Some(p) = self.responder.poll_transmit() {
            return Some(p);
        }
        if self.state == EngineState::Rts {
            return self.requester.poll_transmit(now);
        }
        None
    }

    pub fn poll_completion(&mut self) -> Option<WorkCompletion> {
        self.completions.pop_front()
    }

    /// When [`RcQp::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == EngineState::Error { None } else { self.requester.poll_timeout() }
    }

    /// Requests not yet completed (send queue) and receives posted (receive queue).
    pub fn outstanding(&self) -> (usize, usize) {
        (self.requester.outstanding(), self.responder.posted())
    }

    fn enter_error(&mut self, cause: WcStatus) {
        if self.state == EngineState::Error {
            return;
        }
        self.state = EngineState::Error;
        self.fatal.get_or_insert(cause);
        self.requester.flush(&mut self.completions);
        self.responder.flush(&mut self.completions);
    }
}

fn is_response(opcode: Opcode) -> bool {
    opcode.is_read_response() || matches!(opcode, Opcode::RcAcknowledge | Opcode::RcAtomicAcknowledge)
}

/// RNR NAK timer codes to durations (IBTA table 45), in microseconds.
pub fn rnr_timer(code: u8) -> Duration {
    const MICROS: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560, 3_840, 5_120, 7_680,
        10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840, 245_760, 327_680, 491_520,
    ];
    Duration::from_micros(MICROS[(code & 0x1f) as usize])
}
