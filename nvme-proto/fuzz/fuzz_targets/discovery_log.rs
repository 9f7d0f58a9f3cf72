#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvme_proto::fuzzing::discovery_log(data));
