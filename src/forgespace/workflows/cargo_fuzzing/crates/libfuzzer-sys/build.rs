//! Link the host's libFuzzer: `CUSTOM_LIBFUZZER_PATH` (the variable crates.io's libfuzzer-sys
//! reads) names the archive; the cargo_fuzzing workflow always sets it.
use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=CUSTOM_LIBFUZZER_PATH");
    println!("cargo:rerun-if-env-changed=CUSTOM_LIBFUZZER_STD_CXX");
    let archive = env::var("CUSTOM_LIBFUZZER_PATH").unwrap_or_else(|_| {
        panic!(
            "CUSTOM_LIBFUZZER_PATH is not set: it must name libFuzzer.a \
             (Debian: apt-get install libfuzzer-14-dev -> /usr/lib/llvm-14/lib/libFuzzer.a)"
        )
    });
    let archive = Path::new(&archive);
    if !archive.is_file() {
        panic!("CUSTOM_LIBFUZZER_PATH={} is not a file", archive.display());
    }
    let dir = archive.parent().expect("libFuzzer archive has a directory");
    let stem = archive.file_stem().and_then(|s| s.to_str()).expect("archive name is UTF-8");
    let name = stem.strip_prefix("lib").unwrap_or(stem);
    println!("cargo:rerun-if-changed={}", archive.display());
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static={}", name);
    // libFuzzer is C++: link the C++ runtime it was built against (libstdc++ on Debian).
    let cxx = env::var("CUSTOM_LIBFUZZER_STD_CXX").unwrap_or_else(|_| "stdc++".to_string());
    if cxx != "0" {
        println!("cargo:rustc-link-lib={}", cxx);
    }
}
