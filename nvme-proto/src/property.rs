//! Controller properties reached by Fabrics Property Get/Set: the register map and the bit fields of CAP, VS,
//! CC and CSTS (NVMe Base Specification, "Controller Registers"; Linux `enum nvme_ctrl_cap`, `NVME_CC_*`,
//! `NVME_CSTS_*`).

use crate::error::DecodeError;

/// The properties a Fabrics controller exposes, with their offsets and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// Controller Capabilities, 8 bytes at 0x00.
    Cap,
    /// Version, 4 bytes at 0x08.
    Vs,
    /// Controller Configuration, 4 bytes at 0x14.
    Cc,
    /// Controller Status, 4 bytes at 0x1c.
    Csts,
    /// NVM Subsystem Reset, 4 bytes at 0x20.
    Nssr,
}

/// Property access width (Property Get/Set ATTRIB bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertySize {
    Four,
    Eight,
}

impl PropertySize {
    pub const fn from_attrib(attrib: u8) -> Self {
        if attrib & 1 != 0 { PropertySize::Eight } else { PropertySize::Four }
    }
    pub const fn attrib(self) -> u8 {
        match self {
            PropertySize::Four => 0,
            PropertySize::Eight => 1,
        }
    }
    pub const fn bytes(self) -> usize {
        match self {
            PropertySize::Four => 4,
            PropertySize::Eight => 8,
        }
    }
}

impl Property {
    pub const ALL: [Property; 5] = [Property::Cap, Property::Vs, Property::Cc, Property::Csts, Property::Nssr];

    pub const fn offset(self) -> u32 {
        match self {
            Property::Cap => 0x00,
            Property::Vs => 0x08,
            Property::Cc => 0x14,
            Property::Csts => 0x1c,
            Property::Nssr => 0x20,
        }
    }
    pub const fn size(self) -> PropertySize {
        match self {
            Property::Cap => PropertySize::Eight,
            _ => PropertySize::Four,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Property::Cap => "CAP",
            Property::Vs => "VS",
            Property::Cc => "CC",
            Property::Csts => "CSTS",
            Property::Nssr => "NSSR",
        }
    }

    /// The property at `offset` accessed with `size`. An unknown offset or a width that does not match the
    /// register is an Invalid Field, located at the Property Get/Set command's OFSET or ATTRIB byte.
    pub fn from_wire(offset: u32, size: PropertySize) -> Result<Property, DecodeError> {
        let property = Property::ALL.into_iter().find(|p| p.offset() == offset).ok_or(DecodeError::value(
            "property offset",
            crate::fabrics::offset::PROPERTY_OFFSET,
            offset as u64,
        ))?;
        if property.size() != size {
            return Err(DecodeError::value(
                "property size",
                crate::fabrics::offset::PROPERTY_ATTRIB,
                size.attrib() as u64,
            ));
        }
        Ok(property)
    }
}

/// The value written to NSSR to request an NVM subsystem reset ("NVMe").
pub const NSSR_RESET: u32 = 0x4e56_4d65;

macro_rules! field {
    ($(#[$m:meta])* $get:ident, $set:ident, $ty:ty, $shift:expr, $bits:expr) => {
        $(#[$m])*
        pub const fn $get(self) -> $ty {
            ((self.0 >> $shift) & ((1 << $bits) - 1)) as $ty
        }
        /// Sets the field; a value wider than the field is refused (returns `None`), never truncated.
        pub const fn $set(self, value: $ty) -> Option<Self> {
            let v = value as u64;
            if v >> $bits != 0 {
                return None;
            }
            let mask = ((1u64 << $bits) - 1) << $shift;
            Some(Self(((self.0 as u64 & !mask) | (v << $shift)) as _))
        }
    };
}

/// CAP: Controller Capabilities (64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cap(pub u64);

impl Cap {
    field!(/// Maximum Queue Entries Supported, 0's based.
        mqes, set_mqes, u16, 0, 16);
    field!(/// Contiguous Queues Required.
        cqr, set_cqr, u8, 16, 1);
    field!(/// Arbitration Mechanism Supported.
        ams, set_ams, u8, 17, 2);
    field!(/// Timeout: worst-case time to CSTS.RDY, in 500 ms units.
        to, set_to, u8, 24, 8);
    field!(/// Doorbell Stride (PCIe only).
        dstrd, set_dstrd, u8, 32, 4);
    field!(/// NVM Subsystem Reset Supported.
        nssrs, set_nssrs, u8, 36, 1);
    field!(/// Command Sets Supported: bit 0 NVM, bit 6 I/O command sets, bit 7 admin only.
        css, set_css, u8, 37, 8);
    field!(/// Boot Partition Support.
        bps, set_bps, u8, 45, 1);
    field!(/// Memory Page Size Minimum: 2^(12 + MPSMIN).
        mpsmin, set_mpsmin, u8, 48, 4);
    field!(/// Memory Page Size Maximum: 2^(12 + MPSMAX).
        mpsmax, set_mpsmax, u8, 52, 4);
}

/// CAP.CSS bits.
pub mod css {
    pub const NVM: u8 = 1 << 0;
    pub const IO_COMMAND_SETS: u8 = 1 << 6;
    pub const ADMIN_ONLY: u8 = 1 << 7;
}

/// VS: Version (32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Vs(pub u32);

impl Vs {
    pub const V1_3: Vs = Vs::new(1, 3, 0);
    pub const V1_4: Vs = Vs::new(1, 4, 0);
    pub const V2_0: Vs = Vs::new(2, 0, 0);
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Vs {
        Vs((major as u32) << 16 | (minor as u32) << 8 | tertiary as u32)
    }
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

/// CC.SHN and CSTS.SHST values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownNotification {
    None = 0,
    Normal = 1,
    Abrupt = 2,
    Reserved = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownStatus {
    Normal = 0,
    Occurring = 1,
    Complete = 2,
    Reserved = 3,
}

/// CC: Controller Configuration (32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cc(pub u32);

impl Cc {
    field!(/// Enable.
        en, set_en, u8, 0, 1);
    field!(/// I/O Command Set Selected (0 NVM, 6 all supported, 7 admin only).
        css, set_css, u8, 4, 3);
    field!(/// Memory Page Size: 2^(12 + MPS).
        mps, set_mps, u8, 7, 4);
    field!(/// Arbitration Mechanism Selected.
        ams, set_ams, u8, 11, 3);
    field!(/// Shutdown Notification, raw (see [`Cc::shutdown`]).
        shn, set_shn, u8, 14, 2);
    field!(/// I/O Submission Queue Entry Size: 2^n bytes (6 → 64).
        iosqes, set_iosqes, u8, 16, 4);
    field!(/// I/O Completion Queue Entry Size: 2^n bytes (4 → 16).
        iocqes, set_iocqes, u8, 20, 4);
    field!(/// Controller Ready Independent of Media Enable.
        crime, set_crime, u8, 24, 1);

    pub const fn enabled(self) -> bool {
        self.en() != 0
    }
    pub const fn shutdown(self) -> ShutdownNotification {
        match self.shn() {
            0 => ShutdownNotification::None,
            1 => ShutdownNotification::Normal,
            2 => ShutdownNotification::Abrupt,
            _ => ShutdownNotification::Reserved,
        }
    }
}

/// CSTS: Controller Status (32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Csts(pub u32);

impl Csts {
    field!(/// Ready.
        rdy, set_rdy, u8, 0, 1);
    field!(/// Controller Fatal Status.
        cfs, set_cfs, u8, 1, 1);
    field!(/// Shutdown Status, raw (see [`Csts::shutdown`]).
        shst, set_shst, u8, 2, 2);
    field!(/// NVM Subsystem Reset Occurred.
        nssro, set_nssro, u8, 4, 1);
    field!(/// Processing Paused.
        pp, set_pp, u8, 5, 1);

    pub const fn ready(self) -> bool {
        self.rdy() != 0
    }
    pub const fn shutdown(self) -> ShutdownStatus {
        match self.shst() {
            0 => ShutdownStatus::Normal,
            1 => ShutdownStatus::Occurring,
            2 => ShutdownStatus::Complete,
            _ => ShutdownStatus::Reserved,
        }
    }
}
