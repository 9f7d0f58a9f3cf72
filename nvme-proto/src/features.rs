//! Set / Get Features: feature identifiers and the values of the features an NVMe-oF host uses
//! (volatile write cache 0x06, number of queues 0x07, async event configuration 0x0B, keep alive timer 0x0F,
//! host identifier 0x81).

use crate::error::DecodeError;
use crate::sqe::offset;

pub mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    pub const HOST_IDENTIFIER: u8 = 0x81;
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
    pub const WRITE_PROTECT: u8 = 0x84;
}

/// Number of Queues (FID 0x07): both counts 0's based, in CDW11 of the command and DW0 of the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NumberOfQueues {
    /// Number of I/O submission queues requested/allocated, 0's based.
    pub nsqr: u16,
    /// Number of I/O completion queues requested/allocated, 0's based.
    pub ncqr: u16,
}

impl NumberOfQueues {
    /// Decodes CDW11 of Set Features; 0xFFFF in either count is invalid (it would mean 65536 queues).
    pub fn from_cdw11(cdw11: u32) -> Result<Self, DecodeError> {
        if cdw11 as u16 == 0xffff || (cdw11 >> 16) as u16 == 0xffff {
            return Err(DecodeError::value("Number of Queues", offset::CDW11, cdw11 as u64));
        }
        Ok(Self::from_dword(cdw11))
    }
    /// Decodes a completion's DW0 (no validity restriction there).
    pub const fn from_dword(dw: u32) -> Self {
        NumberOfQueues { nsqr: dw as u16, ncqr: (dw >> 16) as u16 }
    }
    pub const fn to_dword(self) -> u32 {
        self.nsqr as u32 | (self.ncqr as u32) << 16
    }
}

/// Asynchronous Event Configuration (FID 0x0B) bits in CDW11.
pub mod async_event_config {
    /// SMART / health critical warnings (bits 7:0).
    pub const SMART_MASK: u32 = 0xff;
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
    pub const TELEMETRY_LOG: u32 = 1 << 10;
    pub const ANA_CHANGE: u32 = 1 << 11;
    pub const PREDICTABLE_LATENCY: u32 = 1 << 12;
    pub const LBA_STATUS: u32 = 1 << 13;
    pub const ENDURANCE_GROUP: u32 = 1 << 14;
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// A feature value as Set Features carries it and Get Features returns it (CDW11 / DW0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    VolatileWriteCache {
        enabled: bool,
    },
    NumberOfQueues(NumberOfQueues),
    /// Bits of [`async_event_config`].
    AsyncEventConfig(u32),
    /// Keep-alive timeout in milliseconds.
    KeepAliveTimer {
        kato_ms: u32,
    },
    /// CDW11 bit 0 (EXHID): the 128-bit host identifier. NVMe-oF requires it set.
    HostIdentifier {
        extended: bool,
    },
    /// Any other feature, carried raw.
    Other {
        fid: u8,
        cdw11: u32,
    },
}

impl Feature {
    /// Decodes Set Features' FID and CDW11.
    pub fn decode(fid: u8, cdw11: u32) -> Result<Feature, DecodeError> {
        Ok(match fid {
            fid::VOLATILE_WRITE_CACHE => Feature::VolatileWriteCache { enabled: cdw11 & 1 != 0 },
            fid::NUMBER_OF_QUEUES => Feature::NumberOfQueues(NumberOfQueues::from_cdw11(cdw11)?),
            fid::ASYNC_EVENT_CONFIG => Feature::AsyncEventConfig(cdw11),
            fid::KEEP_ALIVE_TIMER => Feature::KeepAliveTimer { kato_ms: cdw11 },
            fid::HOST_IDENTIFIER => Feature::HostIdentifier { extended: cdw11 & 1 != 0 },
            _ => Feature::Other { fid, cdw11 },
        })
    }

    pub fn fid(&self) -> u8 {
        match *self {
            Feature::VolatileWriteCache { .. } => fid::VOLATILE_WRITE_CACHE,
            Feature::NumberOfQueues(_) => fid::NUMBER_OF_QUEUES,
            Feature::AsyncEventConfig(_) => fid::ASYNC_EVENT_CONFIG,
            Feature::KeepAliveTimer { .. } => fid::KEEP_ALIVE_TIMER,
            Feature::HostIdentifier { .. } => fid::HOST_IDENTIFIER,
            Feature::Other { fid, .. } => fid,
        }
    }

    pub fn cdw11(&self) -> u32 {
        match *self {
            Feature::VolatileWriteCache { enabled } => enabled as u32,
            Feature::NumberOfQueues(n) => n.to_dword(),
            Feature::AsyncEventConfig(bits) => bits,
            Feature::KeepAliveTimer { kato_ms } => kato_ms,
            Feature::HostIdentifier { extended } => extended as u32,
            Feature::Other { cdw11, .. } => cdw11,
        }
    }
}

/// Get Features SEL (CDW10 bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureSelect {
    Current = 0,
    Default = 1,
    Saved = 2,
    SupportedCapabilities = 3,
}

impl FeatureSelect {
    pub fn from_bits(sel: u8) -> Result<Self, DecodeError> {
        Ok(match sel {
            0 => FeatureSelect::Current,
            1 => FeatureSelect::Default,
            2 => FeatureSelect::Saved,
            3 => FeatureSelect::SupportedCapabilities,
            _ => {
                return Err(DecodeError::value("Get Features SEL", offset::CDW10 + 1, sel as u64));
            }
        })
    }
}
