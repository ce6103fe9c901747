//! Links the kernel as a static, non-PIE ELF at 1 MiB with a PVH note (see `linker.ld`);
//! rust-lld (the x86_64-unknown-none target's linker) takes these arguments directly.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    for arg in ["-static", "--no-pie", "--build-id=none"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
