//! `kernel-flap` (filled in below in this session's next step).
