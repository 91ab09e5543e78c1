//! The recipe loader on arbitrary text and `--set` arguments: it may reject, never panic.
//! Input: the recipe text, then optionally a NUL byte and `--set` arguments separated by NULs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let recipe = parts.next().unwrap_or_default();
    let sets: Vec<String> = parts.map(str::to_string).collect();
    if let Ok(r) = kiln_core::Recipe::parse(std::path::Path::new("fuzz.toml"), recipe, &sets) {
        // A recipe that loads also survives its own resolved form.
        let again = r.to_toml(&r.model);
        kiln_core::Recipe::parse(std::path::Path::new("resolved.toml"), &again, &[])
            .expect("a resolved recipe re-parses");
    }
});
