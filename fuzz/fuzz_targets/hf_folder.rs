//! The Hugging Face folder loader on an arbitrary `config.json` and `model.safetensors`: a
//! config that does not parse, weights that do not match it, or a config asking for more than
//! its weights hold are errors, never panics or huge allocations. What passes the checks is
//! built and loaded, as `kiln train --init-from` / `kiln predict` do.
//! Input: the config text, a NUL byte, then the safetensors bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(config) = std::str::from_utf8(config) else {
        return;
    };
    let Ok(cfg) = kiln_models::hf::parse_hf_config(config, Path::new("config.json")) else {
        return;
    };
    let Ok(pretrained) =
        kiln_models::hf::parse_pretrained(&cfg, weights, Path::new("model.safetensors"))
    else {
        return;
    };
    let varmap = candle_nn::VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(
        &varmap,
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let rng = kiln_models::SharedRng::new(0, "dropout");
    if cfg.build(vb, rng, candle_core::DType::F32).is_ok() {
        let _ = kiln_models::hf::set_pretrained(&varmap, &cfg, pretrained);
    }
});
