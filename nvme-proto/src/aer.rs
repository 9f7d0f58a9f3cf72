//! Asynchronous Event Request completion DW0: event type (bits 2:0), event information (15:8), log page
//! identifier (23:16).

/// Asynchronous event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AsyncEventType {
    Error = 0,
    SmartHealth = 1,
    Notice = 2,
    Immediate = 3,
    OneShot = 4,
    IoCommandSpecific = 6,
    VendorSpecific = 7,
    Reserved = 5,
}

impl AsyncEventType {
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 7 {
            0 => AsyncEventType::Error,
            1 => AsyncEventType::SmartHealth,
            2 => AsyncEventType::Notice,
            3 => AsyncEventType::Immediate,
            4 => AsyncEventType::OneShot,
            6 => AsyncEventType::IoCommandSpecific,
            7 => AsyncEventType::VendorSpecific,
            _ => AsyncEventType::Reserved,
        }
    }
}

/// Event information values for [`AsyncEventType::Notice`].
pub mod notice {
    pub const NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    pub const TELEMETRY_LOG_CHANGED: u8 = 0x02;
    pub const ANA_CHANGE: u8 = 0x03;
    pub const DISCOVERY_LOG_CHANGE: u8 = 0xf0;
}

/// An asynchronous event, as its AER completion carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AsyncEvent {
    pub kind: AsyncEventType,
    pub info: u8,
    /// The log page the host reads to clear the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// "Namespace attribute changed": read the Changed Namespace List log (0x04).
    pub const NAMESPACE_CHANGED: AsyncEvent = AsyncEvent {
        kind: AsyncEventType::Notice,
        info: notice::NAMESPACE_ATTRIBUTE_CHANGED,
        log_page: crate::log_page::lid::CHANGED_NAMESPACES,
    };
    /// "ANA change": read the ANA log (0x0C).
    pub const ANA_CHANGED: AsyncEvent =
        AsyncEvent { kind: AsyncEventType::Notice, info: notice::ANA_CHANGE, log_page: crate::log_page::lid::ANA };
    /// "Discovery log page change": read the discovery log (0x70).
    pub const DISCOVERY_CHANGED: AsyncEvent = AsyncEvent {
        kind: AsyncEventType::Notice,
        info: notice::DISCOVERY_LOG_CHANGE,
        log_page: crate::log_page::lid::DISCOVERY,
    };

    pub const fn from_dword(dw0: u32) -> Self {
        AsyncEvent { kind: AsyncEventType::from_bits(dw0 as u8), info: (dw0 >> 8) as u8, log_page: (dw0 >> 16) as u8 }
    }
    pub const fn to_dword(self) -> u32 {
        (self.kind as u32) | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }
}
