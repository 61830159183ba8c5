//! Arbitrary bytes as a batch input file, fed to the line validator in arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| aoai_blob_batch_fuzz::validator(data));
