//! NVMe completion status: the 15-bit Status Field of CQE DW3 (bits 31:17), i.e. what Linux calls
//! `le16_to_cpu(cqe->status) >> 1`: SC in bits 7:0, SCT in 10:8, CRD in 12:11, More in 13, DNR in 14.

/// Status Code Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StatusCodeType {
    Generic = 0,
    CommandSpecific = 1,
    MediaAndDataIntegrity = 2,
    PathRelated = 3,
    Reserved4 = 4,
    Reserved5 = 5,
    Reserved6 = 6,
    VendorSpecific = 7,
}

/// Which command set a status belongs to; needed only to name command-specific codes 0x80 and up, which
/// mean different things for Fabrics and I/O commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandSet {
    Admin,
    Io,
    Fabrics,
}

/// A completion status (without the phase bit).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(u16);

impl Status {
    const DNR: u16 = 1 << 14;
    const MORE: u16 = 1 << 13;

    /// Status from its 15-bit field value. Bit 15 of `raw` is not part of the field and is dropped.
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw & 0x7fff)
    }
    pub const fn raw(self) -> u16 {
        self.0
    }
    pub const fn new(sct: StatusCodeType, sc: u8) -> Self {
        Self(((sct as u16) << 8) | sc as u16)
    }
    const fn generic(sc: u8) -> Self {
        Self::new(StatusCodeType::Generic, sc)
    }
    const fn specific(sc: u8) -> Self {
        Self::new(StatusCodeType::CommandSpecific, sc)
    }
    const fn media(sc: u8) -> Self {
        Self::new(StatusCodeType::MediaAndDataIntegrity, sc)
    }
    const fn path(sc: u8) -> Self {
        Self::new(StatusCodeType::PathRelated, sc)
    }

    pub const fn sc(self) -> u8 {
        self.0 as u8
    }
    pub const fn sct(self) -> StatusCodeType {
        match (self.0 >> 8) & 7 {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaAndDataIntegrity,
            3 => StatusCodeType::PathRelated,
            4 => StatusCodeType::Reserved4,
            5 => StatusCodeType::Reserved5,
            6 => StatusCodeType::Reserved6,
            _ => StatusCodeType::VendorSpecific,
        }
    }
    /// Command Retry Delay index (0 = none, 1..3 select CRDT1..3 of Identify Controller).
    pub const fn crd(self) -> u8 {
        ((self.0 >> 11) & 3) as u8
    }
    pub const fn more(self) -> bool {
        self.0 & Self::MORE != 0
    }
    /// Do Not Retry.
    pub const fn dnr(self) -> bool {
        self.0 & Self::DNR != 0
    }
    pub const fn with_dnr(self) -> Self {
        Self(self.0 | Self::DNR)
    }
    pub const fn with_more(self) -> Self {
        Self(self.0 | Self::MORE)
    }
    /// Sets the Command Retry Delay index; only its two low bits are meaningful.
    pub const fn with_crd(self, crd: u8) -> Self {
        Self((self.0 & !(3 << 11)) | (((crd & 3) as u16) << 11))
    }
    /// The same code without DNR, More and CRD: for comparing against the named constants.
    pub const fn code(self) -> Self {
        Self(self.0 & 0x7ff)
    }
    pub const fn is_success(self) -> bool {
        self.code().0 == 0
    }

    // Generic command status (SCT 0).
    pub const SUCCESS: Self = Self::generic(0x00);
    pub const INVALID_OPCODE: Self = Self::generic(0x01);
    pub const INVALID_FIELD: Self = Self::generic(0x02);
    pub const COMMAND_ID_CONFLICT: Self = Self::generic(0x03);
    pub const DATA_TRANSFER_ERROR: Self = Self::generic(0x04);
    pub const POWER_LOSS: Self = Self::generic(0x05);
    pub const INTERNAL: Self = Self::generic(0x06);
    pub const ABORT_REQUESTED: Self = Self::generic(0x07);
    pub const SQ_DELETED: Self = Self::generic(0x08);
    pub const FUSED_FAILED: Self = Self::generic(0x09);
    pub const FUSED_MISSING: Self = Self::generic(0x0a);
    pub const INVALID_NAMESPACE: Self = Self::generic(0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Self = Self::generic(0x0c);
    pub const SGL_INVALID_LAST_SEGMENT: Self = Self::generic(0x0d);
    pub const SGL_INVALID_COUNT: Self = Self::generic(0x0e);
    pub const SGL_INVALID_DATA_LENGTH: Self = Self::generic(0x0f);
    pub const SGL_INVALID_METADATA_LENGTH: Self = Self::generic(0x10);
    pub const SGL_INVALID_TYPE: Self = Self::generic(0x11);
    pub const CMB_INVALID_USE: Self = Self::generic(0x12);
    pub const PRP_INVALID_OFFSET: Self = Self::generic(0x13);
    pub const ATOMIC_WRITE_UNIT_EXCEEDED: Self = Self::generic(0x14);
    pub const OPERATION_DENIED: Self = Self::generic(0x15);
    pub const SGL_INVALID_OFFSET: Self = Self::generic(0x16);
    pub const HOST_ID_INCONSISTENT_FORMAT: Self = Self::generic(0x18);
    pub const KEEP_ALIVE_EXPIRED: Self = Self::generic(0x19);
    pub const KEEP_ALIVE_INVALID: Self = Self::generic(0x1a);
    pub const PREEMPT_ABORT: Self = Self::generic(0x1b);
    pub const SANITIZE_FAILED: Self = Self::generic(0x1c);
    pub const SANITIZE_IN_PROGRESS: Self = Self::generic(0x1d);
    pub const SGL_INVALID_GRANULARITY: Self = Self::generic(0x1e);
    pub const COMMAND_NOT_SUPPORTED_IN_CMB: Self = Self::generic(0x1f);
    pub const NAMESPACE_WRITE_PROTECTED: Self = Self::generic(0x20);
    pub const COMMAND_INTERRUPTED: Self = Self::generic(0x21);
    pub const TRANSIENT_TRANSPORT_ERROR: Self = Self::generic(0x22);
    pub const LBA_OUT_OF_RANGE: Self = Self::generic(0x80);
    pub const CAPACITY_EXCEEDED: Self = Self::generic(0x81);
    pub const NAMESPACE_NOT_READY: Self = Self::generic(0x82);
    pub const RESERVATION_CONFLICT: Self = Self::generic(0x83);
    pub const FORMAT_IN_PROGRESS: Self = Self::generic(0x84);

    // Command specific status (SCT 1), admin.
    pub const CQ_INVALID: Self = Self::specific(0x00);
    pub const INVALID_QUEUE_ID: Self = Self::specific(0x01);
    pub const INVALID_QUEUE_SIZE: Self = Self::specific(0x02);
    pub const ABORT_LIMIT: Self = Self::specific(0x03);
    pub const AER_LIMIT_EXCEEDED: Self = Self::specific(0x05);
    pub const INVALID_FIRMWARE_SLOT: Self = Self::specific(0x06);
    pub const INVALID_FIRMWARE_IMAGE: Self = Self::specific(0x07);
    pub const INVALID_INTERRUPT_VECTOR: Self = Self::specific(0x08);
    pub const INVALID_LOG_PAGE: Self = Self::specific(0x09);
    pub const INVALID_FORMAT: Self = Self::specific(0x0a);
    pub const FIRMWARE_NEEDS_CONVENTIONAL_RESET: Self = Self::specific(0x0b);
    pub const INVALID_QUEUE_DELETION: Self = Self::specific(0x0c);
    pub const FEATURE_NOT_SAVEABLE: Self = Self::specific(0x0d);
    pub const FEATURE_NOT_CHANGEABLE: Self = Self::specific(0x0e);
    pub const FEATURE_NOT_PER_NAMESPACE: Self = Self::specific(0x0f);
    pub const NS_INSUFFICIENT_CAPACITY: Self = Self::specific(0x15);
    pub const NS_ID_UNAVAILABLE: Self = Self::specific(0x16);
    pub const NS_ALREADY_ATTACHED: Self = Self::specific(0x18);
    pub const NS_IS_PRIVATE: Self = Self::specific(0x19);
    pub const NS_NOT_ATTACHED: Self = Self::specific(0x1a);
    pub const THIN_PROVISIONING_NOT_SUPPORTED: Self = Self::specific(0x1b);
    pub const CONTROLLER_LIST_INVALID: Self = Self::specific(0x1c);
    pub const ANA_GROUP_ID_INVALID: Self = Self::specific(0x24);
    pub const ANA_ATTACH_FAILED: Self = Self::specific(0x25);

    // Command specific status (SCT 1), I/O (NVM command set).
    pub const CONFLICTING_ATTRIBUTES: Self = Self::specific(0x80);
    pub const INVALID_PROTECTION_INFO: Self = Self::specific(0x81);
    pub const WRITE_TO_READ_ONLY_RANGE: Self = Self::specific(0x82);

    // Command specific status (SCT 1), Fabrics.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Self = Self::specific(0x80);
    pub const CONNECT_CONTROLLER_BUSY: Self = Self::specific(0x81);
    pub const CONNECT_INVALID_PARAMETERS: Self = Self::specific(0x82);
    pub const CONNECT_RESTART_DISCOVERY: Self = Self::specific(0x83);
    pub const CONNECT_INVALID_HOST: Self = Self::specific(0x84);
    pub const INVALID_QUEUE_TYPE: Self = Self::specific(0x85);
    pub const DISCOVERY_RESTART: Self = Self::specific(0x90);
    pub const AUTHENTICATION_REQUIRED: Self = Self::specific(0x91);

    // Media and data integrity errors (SCT 2).
    pub const WRITE_FAULT: Self = Self::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Self = Self::media(0x81);
    pub const GUARD_CHECK: Self = Self::media(0x82);
    pub const APPTAG_CHECK: Self = Self::media(0x83);
    pub const REFTAG_CHECK: Self = Self::media(0x84);
    pub const COMPARE_FAILED: Self = Self::media(0x85);
    pub const ACCESS_DENIED: Self = Self::media(0x86);
    pub const UNWRITTEN_BLOCK: Self = Self::media(0x87);

    // Path related status (SCT 3).
    pub const INTERNAL_PATH_ERROR: Self = Self::path(0x00);
    pub const ANA_PERSISTENT_LOSS: Self = Self::path(0x01);
    pub const ANA_INACCESSIBLE: Self = Self::path(0x02);
    pub const ANA_TRANSITION: Self = Self::path(0x03);
    pub const CONTROLLER_PATH_ERROR: Self = Self::path(0x60);
    pub const HOST_PATH_ERROR: Self = Self::path(0x70);
    pub const HOST_ABORTED: Self = Self::path(0x71);

    /// The specification's name for this status. Command-specific codes 0x80 and up depend on `set`.
    pub fn name(self, set: CommandSet) -> &'static str {
        let code = self.code();
        if code.sct() == StatusCodeType::CommandSpecific && code.sc() >= 0x80 {
            let named = match set {
                CommandSet::Fabrics => FABRICS_NAMES,
                CommandSet::Io => IO_NAMES,
                CommandSet::Admin => &[],
            };
            return lookup(named, code).unwrap_or("Unknown command specific status");
        }
        lookup(NAMES, code).unwrap_or(match code.sct() {
            StatusCodeType::Generic => "Unknown generic status",
            StatusCodeType::CommandSpecific => "Unknown command specific status",
            StatusCodeType::MediaAndDataIntegrity => "Unknown media error",
            StatusCodeType::PathRelated => "Unknown path related status",
            StatusCodeType::VendorSpecific => "Vendor specific status",
            _ => "Reserved status code type",
        })
    }
}

fn lookup(table: &[(Status, &'static str)], code: Status) -> Option<&'static str> {
    table.iter().find(|(s, _)| *s == code).map(|(_, n)| *n)
}

const NAMES: &[(Status, &str)] = &[
    (Status::SUCCESS, "Successful Completion"),
    (Status::INVALID_OPCODE, "Invalid Command Opcode"),
    (Status::INVALID_FIELD, "Invalid Field in Command"),
    (Status::COMMAND_ID_CONFLICT, "Command ID Conflict"),
    (Status::DATA_TRANSFER_ERROR, "Data Transfer Error"),
    (Status::POWER_LOSS, "Commands Aborted due to Power Loss Notification"),
    (Status::INTERNAL, "Internal Error"),
    (Status::ABORT_REQUESTED, "Command Abort Requested"),
    (Status::SQ_DELETED, "Command Aborted due to SQ Deletion"),
    (Status::FUSED_FAILED, "Command Aborted due to Failed Fused Command"),
    (Status::FUSED_MISSING, "Command Aborted due to Missing Fused Command"),
    (Status::INVALID_NAMESPACE, "Invalid Namespace or Format"),
    (Status::COMMAND_SEQUENCE_ERROR, "Command Sequence Error"),
    (Status::SGL_INVALID_LAST_SEGMENT, "Invalid SGL Segment Descriptor"),
    (Status::SGL_INVALID_COUNT, "Invalid Number of SGL Descriptors"),
    (Status::SGL_INVALID_DATA_LENGTH, "Data SGL Length Invalid"),
    (Status::SGL_INVALID_METADATA_LENGTH, "Metadata SGL Length Invalid"),
    (Status::SGL_INVALID_TYPE, "SGL Descriptor Type Invalid"),
    (Status::CMB_INVALID_USE, "Invalid Use of Controller Memory Buffer"),
    (Status::PRP_INVALID_OFFSET, "PRP Offset Invalid"),
    (Status::ATOMIC_WRITE_UNIT_EXCEEDED, "Atomic Write Unit Exceeded"),
    (Status::OPERATION_DENIED, "Operation Denied"),
    (Status::SGL_INVALID_OFFSET, "SGL Offset Invalid"),
    (Status::HOST_ID_INCONSISTENT_FORMAT, "Host Identifier Inconsistent Format"),
    (Status::KEEP_ALIVE_EXPIRED, "Keep Alive Timer Expired"),
    (Status::KEEP_ALIVE_INVALID, "Keep Alive Timeout Invalid"),
    (Status::PREEMPT_ABORT, "Command Aborted due to Preempt and Abort"),
    (Status::SANITIZE_FAILED, "Sanitize Failed"),
    (Status::SANITIZE_IN_PROGRESS, "Sanitize In Progress"),
    (Status::SGL_INVALID_GRANULARITY, "SGL Data Block Granularity Invalid"),
    (Status::COMMAND_NOT_SUPPORTED_IN_CMB, "Command Not Supported for Queue in CMB"),
    (Status::NAMESPACE_WRITE_PROTECTED, "Namespace is Write Protected"),
    (Status::COMMAND_INTERRUPTED, "Command Interrupted"),
    (Status::TRANSIENT_TRANSPORT_ERROR, "Transient Transport Error"),
    (Status::LBA_OUT_OF_RANGE, "LBA Out of Range"),
    (Status::CAPACITY_EXCEEDED, "Capacity Exceeded"),
    (Status::NAMESPACE_NOT_READY, "Namespace Not Ready"),
    (Status::RESERVATION_CONFLICT, "Reservation Conflict"),
    (Status::FORMAT_IN_PROGRESS, "Format In Progress"),
    (Status::CQ_INVALID, "Completion Queue Invalid"),
    (Status::INVALID_QUEUE_ID, "Invalid Queue Identifier"),
    (Status::INVALID_QUEUE_SIZE, "Invalid Queue Size"),
    (Status::ABORT_LIMIT, "Abort Command Limit Exceeded"),
    (Status::AER_LIMIT_EXCEEDED, "Asynchronous Event Request Limit Exceeded"),
    (Status::INVALID_FIRMWARE_SLOT, "Invalid Firmware Slot"),
    (Status::INVALID_FIRMWARE_IMAGE, "Invalid Firmware Image"),
    (Status::INVALID_INTERRUPT_VECTOR, "Invalid Interrupt Vector"),
    (Status::INVALID_LOG_PAGE, "Invalid Log Page"),
    (Status::INVALID_FORMAT, "Invalid Format"),
    (Status::FIRMWARE_NEEDS_CONVENTIONAL_RESET, "Firmware Activation Requires Conventional Reset"),
    (Status::INVALID_QUEUE_DELETION, "Invalid Queue Deletion"),
    (Status::FEATURE_NOT_SAVEABLE, "Feature Identifier Not Saveable"),
    (Status::FEATURE_NOT_CHANGEABLE, "Feature Not Changeable"),
    (Status::FEATURE_NOT_PER_NAMESPACE, "Feature Not Namespace Specific"),
    (Status::NS_INSUFFICIENT_CAPACITY, "Namespace Insufficient Capacity"),
    (Status::NS_ID_UNAVAILABLE, "Namespace Identifier Unavailable"),
    (Status::NS_ALREADY_ATTACHED, "Namespace Already Attached"),
    (Status::NS_IS_PRIVATE, "Namespace Is Private"),
    (Status::NS_NOT_ATTACHED, "Namespace Not Attached"),
    (Status::THIN_PROVISIONING_NOT_SUPPORTED, "Thin Provisioning Not Supported"),
    (Status::CONTROLLER_LIST_INVALID, "Controller List Invalid"),
    (Status::ANA_GROUP_ID_INVALID, "ANA Group Identifier Invalid"),
    (Status::ANA_ATTACH_FAILED, "ANA Attach Failed"),
    (Status::WRITE_FAULT, "Write Fault"),
    (Status::UNRECOVERED_READ_ERROR, "Unrecovered Read Error"),
    (Status::GUARD_CHECK, "End-to-end Guard Check Error"),
    (Status::APPTAG_CHECK, "End-to-end Application Tag Check Error"),
    (Status::REFTAG_CHECK, "End-to-end Reference Tag Check Error"),
    (Status::COMPARE_FAILED, "Compare Failure"),
    (Status::ACCESS_DENIED, "Access Denied"),
    (Status::UNWRITTEN_BLOCK, "Deallocated or Unwritten Logical Block"),
    (Status::INTERNAL_PATH_ERROR, "Internal Path Error"),
    (Status::ANA_PERSISTENT_LOSS, "Asymmetric Access Persistent Loss"),
    (Status::ANA_INACCESSIBLE, "Asymmetric Access Inaccessible"),
    (Status::ANA_TRANSITION, "Asymmetric Access Transition"),
    (Status::CONTROLLER_PATH_ERROR, "Controller Pathing Error"),
    (Status::HOST_PATH_ERROR, "Host Pathing Error"),
    (Status::HOST_ABORTED, "Command Aborted By Host"),
];

const FABRICS_NAMES: &[(Status, &str)] = &[
    (Status::CONNECT_INCOMPATIBLE_FORMAT, "Connect Incompatible Format"),
    (Status::CONNECT_CONTROLLER_BUSY, "Connect Controller Busy"),
    (Status::CONNECT_INVALID_PARAMETERS, "Connect Invalid Parameters"),
    (Status::CONNECT_RESTART_DISCOVERY, "Connect Restart Discovery"),
    (Status::CONNECT_INVALID_HOST, "Connect Invalid Host"),
    (Status::INVALID_QUEUE_TYPE, "Invalid Queue Type"),
    (Status::DISCOVERY_RESTART, "Discover Restart"),
    (Status::AUTHENTICATION_REQUIRED, "Authentication Required"),
];

const IO_NAMES: &[(Status, &str)] = &[
    (Status::CONFLICTING_ATTRIBUTES, "Conflicting Attributes"),
    (Status::INVALID_PROTECTION_INFO, "Invalid Protection Information"),
    (Status::WRITE_TO_READ_ONLY_RANGE, "Attempted Write to Read Only Range"),
];

impl core::fmt::Debug for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Status({:#06x}: sct {} sc {:#04x}", self.0, self.sct() as u8, self.sc())?;
        if self.dnr() {
            f.write_str(" dnr")?;
        }
        if self.more() {
            f.write_str(" more")?;
        }
        f.write_str(")")
    }
}
