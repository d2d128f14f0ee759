//! Compiles the census crate's etcd proto (`KV.Range` only), server side,
//! for support/kine.rs with protox (no system protoc): the test endpoint
//! and the census speak the very same messages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../kms/census/proto/etcd/kv.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../kms/census/proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
