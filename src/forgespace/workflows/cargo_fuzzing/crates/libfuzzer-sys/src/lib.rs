//! A small stand-in for crates.io's `libfuzzer-sys` 0.4, for builds that cannot reach the
//! registry: the same `fuzz_target!` forms, linked against the host's libFuzzer.
//!
//! Forms accepted (as in libfuzzer-sys 0.4):
//!
//! ```ignore
//! fuzz_target!(|data: &[u8]| { ... });
//! fuzz_target!(|data: &[u8]| -> Corpus { ... });
//! fuzz_target!(|input: MyType| { ... });          // MyType: arbitrary::Arbitrary
//! fuzz_target!(|input: MyType| -> Corpus { ... });
//! fuzz_target!(init: { ... }, |data: &[u8]| { ... });
//! ```
//!
//! Typed inputs need the `arbitrary` crate, which the cargo_fuzzing workflow adds from
//! Debian's `librust-arbitrary-dev` when it is installed (it re-exports it as
//! `libfuzzer_sys::arbitrary`).
//!
//! A panic in the target prints Rust's panic message (and backtrace when `RUST_BACKTRACE` is
//! set) and then aborts, so libFuzzer records the input as a crash, as with the original.

#![allow(clippy::missing_safety_doc)]

#[cfg(feature = "arbitrary")]
#[doc(hidden)]
pub use arbitrary;

use std::sync::OnceLock;

extern "Rust" {
    // Defined by `fuzz_target!` in the fuzz target's binary.
    fn rust_fuzzer_test_input(bytes: &[u8]) -> i32;
}

/// Whether libFuzzer keeps an input in its corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// Keep the input if it found new coverage (the default).
    Keep,
    /// Never add this input to the corpus.
    Reject,
}

impl From<()> for Corpus {
    fn from(_: ()) -> Self {
        Corpus::Keep
    }
}

impl Corpus {
    #[doc(hidden)]
    pub fn to_libfuzzer_code(self) -> i32 {
        match self {
            Corpus::Keep => 0,
            Corpus::Reject => -1,
        }
    }
}

#[doc(hidden)]
pub static RUST_LIBFUZZER_DEBUG_PATH: OnceLock<String> = OnceLock::new();

#[doc(hidden)]
#[export_name = "LLVMFuzzerTestOneInput"]
pub fn test_input_wrap(data: *const u8, size: usize) -> i32 {
    let result = std::panic::catch_unwind(|| unsafe {
        let bytes: &[u8] = if size == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(data, size)
        };
        rust_fuzzer_test_input(bytes)
    });
    match result {
        Ok(code) => code,
        // The panic hook aborts first; this is for a hook the target replaced.
        Err(_) => std::process::abort(),
    }
}

#[doc(hidden)]
#[export_name = "LLVMFuzzerInitialize"]
pub fn initialize(_argc: *const isize, _argv: *const *const *const u8) -> isize {
    // Abort on panic before unwinding, so libFuzzer sees a crash and the report keeps the
    // panic's own message and location.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    if let Ok(path) = std::env::var("RUST_LIBFUZZER_DEBUG_PATH") {
        let _ = RUST_LIBFUZZER_DEBUG_PATH.set(path);
    }
    0
}

#[doc(hidden)]
pub fn write_debug(value: &dyn std::fmt::Debug) -> bool {
    match RUST_LIBFUZZER_DEBUG_PATH.get() {
        Some(path) => {
            let _ = std::fs::write(path, format!("{value:#?}"));
            true
        }
        None => false,
    }
}

/// Define the fuzz target: see the crate documentation for the accepted forms.
#[macro_export]
macro_rules! fuzz_target {
    (init: $init:expr, |$bytes:ident| $body:expr) => {
        $crate::fuzz_target!(init: $init, |$bytes: &[u8]| $body);
    };
    (init: $init:expr, |$data:ident: &[u8]| $body:expr) => {
        $crate::fuzz_target!(@bytes init: $init, |$data| -> () { $body });
    };
    (init: $init:expr, |$data:ident: &[u8]| -> $rty:ty $body:block) => {
        $crate::fuzz_target!(@bytes init: $init, |$data| -> $rty $body);
    };
    (init: $init:expr, |$data:ident: $dty:ty| $body:expr) => {
        $crate::fuzz_target!(@typed init: $init, |$data: $dty| -> () { $body });
    };
    (init: $init:expr, |$data:ident: $dty:ty| -> $rty:ty $body:block) => {
        $crate::fuzz_target!(@typed init: $init, |$data: $dty| -> $rty $body);
    };
    (|$bytes:ident| $body:expr) => {
        $crate::fuzz_target!(@bytes init: (), |$bytes| -> () { $body });
    };
    (|$data:ident: &[u8]| $body:expr) => {
        $crate::fuzz_target!(@bytes init: (), |$data| -> () { $body });
    };
    (|$data:ident: &[u8]| -> $rty:ty $body:block) => {
        $crate::fuzz_target!(@bytes init: (), |$data| -> $rty $body);
    };
    (|$data:ident: $dty:ty| $body:expr) => {
        $crate::fuzz_target!(@typed init: (), |$data: $dty| -> () { $body });
    };
    (|$data:ident: $dty:ty| -> $rty:ty $body:block) => {
        $crate::fuzz_target!(@typed init: (), |$data: $dty| -> $rty $body);
    };

    (@bytes init: $init:expr, |$data:ident| -> $rty:ty $body:block) => {
        const _: () = {
            #[no_mangle]
            pub extern "Rust" fn rust_fuzzer_test_input(bytes: &[u8]) -> i32 {
                static INIT: ::std::sync::Once = ::std::sync::Once::new();
                INIT.call_once(|| {
                    $init;
                });
                if $crate::write_debug(&bytes) {
                    return 0;
                }
                let corpus: $crate::Corpus = __libfuzzer_sys_run(bytes).into();
                corpus.to_libfuzzer_code()
            }

            // Not inlined: the target's body keeps its own frame in crash reports.
            #[inline(never)]
            fn __libfuzzer_sys_run($data: &[u8]) -> $rty {
                $body
            }
        };
    };
    (@typed init: $init:expr, |$data:ident: $dty:ty| -> $rty:ty $body:block) => {
        const _: () = {
            #[no_mangle]
            pub extern "Rust" fn rust_fuzzer_test_input(bytes: &[u8]) -> i32 {
                use $crate::arbitrary::{Arbitrary, Unstructured};
                static INIT: ::std::sync::Once = ::std::sync::Once::new();
                INIT.call_once(|| {
                    $init;
                });
                // Too short for the type: not interesting, and not worth keeping.
                if bytes.len() < <$dty as Arbitrary>::size_hint(0).0 {
                    return -1;
                }
                let u = Unstructured::new(bytes);
                let data = match <$dty as Arbitrary>::arbitrary_take_rest(u) {
                    Ok(d) => d,
                    Err(_) => return -1,
                };
                if $crate::write_debug(&data) {
                    return 0;
                }
                let corpus: $crate::Corpus = __libfuzzer_sys_run(data).into();
                corpus.to_libfuzzer_code()
            }

            #[inline(never)]
            fn __libfuzzer_sys_run($data: $dty) -> $rty {
                $body
            }
        };
    };
}
