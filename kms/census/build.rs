//! Compiles the etcd KV.Range subset (proto/etcd/kv.proto) with protox
//! (pure Rust, no system protoc), client only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd/kv.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
