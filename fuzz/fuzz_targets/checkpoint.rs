//! The checkpoint loader on arbitrary bytes: corrupt or hostile safetensors files are errors,
//! never panics or huge allocations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_core::checkpoint::parse_tensors(data, &candle_core::Device::Cpu);
});
