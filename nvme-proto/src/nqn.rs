//! NVMe Qualified Names.
//!
//! Two forms (NVMe Base Specification, "NVMe Qualified Names"): `nqn.yyyy-mm.reverse.domain:string`, and the
//! UUID form `nqn.2014-08.org.nvmexpress:uuid:xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`. The well-known discovery
//! NQN `nqn.2014-08.org.nvmexpress.discovery` is the one name without a `:` part. At most 223 bytes of UTF-8;
//! on the wire a 256-byte field, NUL-terminated.
//!
//! [`Nqn`] is the strict form, for names we configure or send. What a peer sends is read with
//! [`read_wire`], which checks only what the wire format requires (terminator, length, UTF-8): Linux nvmet
//! accepts any subsystem name, and a host's hostnqn is compared, not interpreted.

use crate::error::{DecodeError, Reason};
use crate::status::Status;
use crate::text;
use crate::uuid::Uuid;

/// Maximum NQN length in bytes, without the NUL (Linux `NVMF_NQN_SIZE`).
pub const NQN_MAX_LEN: usize = 223;
/// Width of an NQN field on the wire (Connect data, Identify Controller SUBNQN, discovery log entries).
pub const NQN_FIELD_LEN: usize = 256;
/// The well-known name of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
const UUID_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";

/// A validated NVMe Qualified Name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nqn(String);

impl Nqn {
    pub fn new(name: &str) -> Result<Self, DecodeError> {
        validate(name)?;
        Ok(Nqn(name.to_owned()))
    }

    /// The UUID form, `nqn.2014-08.org.nvmexpress:uuid:<uuid>`, as nvme-cli generates host NQNs.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Nqn(format!("{UUID_PREFIX}{uuid}"))
    }

    pub fn discovery() -> Self {
        Nqn(DISCOVERY_NQN.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The UUID, for a name in the UUID form.
    pub fn uuid(&self) -> Option<Uuid> {
        self.0.strip_prefix(UUID_PREFIX).and_then(|u| Uuid::parse(u).ok())
    }

    pub fn is_discovery(&self) -> bool {
        self.0 == DISCOVERY_NQN
    }

    /// The 256-byte wire field.
    pub fn to_wire(&self) -> [u8; NQN_FIELD_LEN] {
        let mut field = [0u8; NQN_FIELD_LEN];
        // Cannot fail: validate() bounded the length and UTF-8 has no interior NUL here.
        let _ = text::write_nul_terminated("NQN", &mut field, &self.0, NQN_MAX_LEN);
        field
    }
}

impl core::fmt::Display for Nqn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::str::FromStr for Nqn {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Nqn::new(s)
    }
}

impl AsRef<str> for Nqn {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Reads an NQN wire field: NUL-terminated within 224 bytes, UTF-8.
pub fn read_wire<'a>(what: &'static str, field: &'a [u8]) -> Result<&'a str, DecodeError> {
    text::read_nul_terminated(what, field, NQN_MAX_LEN)
}

/// Writes a name into an NQN wire field (NUL-terminated, NUL-padded); refuses names over 223 bytes.
pub fn write_wire(what: &'static str, field: &mut [u8], name: &str) -> Result<(), DecodeError> {
    text::write_nul_terminated(what, field, name, NQN_MAX_LEN)
}

fn validate(name: &str) -> Result<(), DecodeError> {
    let bad = |offset, why| DecodeError::new("NQN", offset, Reason::Format(why), Status::INVALID_FIELD.with_dnr());
    if name.len() > NQN_MAX_LEN {
        return Err(DecodeError::new(
            "NQN",
            0,
            Reason::TooLong { max: NQN_MAX_LEN, actual: name.len() },
            Status::INVALID_FIELD.with_dnr(),
        ));
    }
    if name.contains('\0') {
        return Err(bad(0, "contains NUL"));
    }
    if let Some(uuid) = name.strip_prefix(UUID_PREFIX) {
        return Uuid::parse(uuid).map(|_| ()).map_err(|e| e.at(UUID_PREFIX.len()));
    }
    let b = name.as_bytes();
    let rest = name.strip_prefix("nqn.").ok_or_else(|| bad(0, "must start with \"nqn.\""))?;
    let date = rest.as_bytes();
    let digits = |r: core::ops::Range<usize>| date.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !(digits(0..4) && date.get(4) == Some(&b'-') && digits(5..7)) {
        return Err(bad(4, "expected a date yyyy-mm after \"nqn.\""));
    }
    let month = (date[5] - b'0') * 10 + (date[6] - b'0');
    if !(1..=12).contains(&month) {
        return Err(bad(9, "month must be 01..12"));
    }
    if date.get(7) != Some(&b'.') {
        return Err(bad(11, "expected '.' after the date"));
    }
    let after_date = &name[12..];
    let (domain, user) = match after_date.split_once(':') {
        Some((d, u)) => (d, Some(u)),
        None => (after_date, None),
    };
    let domain_ok = !domain.is_empty()
        && !domain.starts_with(['.', '-'])
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if !domain_ok {
        return Err(bad(12, "expected a reverse domain name (letters, digits, '-', '.')"));
    }
    match user {
        Some("") => Err(bad(b.len(), "empty string after ':'")),
        Some(_) => Ok(()),
        None if name == DISCOVERY_NQN => Ok(()),
        None => Err(bad(b.len(), "expected ':' and a string after the domain")),
    }
}
